"""The adaptive gate against a reference built from transformers' own modules only: each router's
`(logits, weights, indices)` is post-processed as the method says — a non-top-1 expert whose normalised
weight is below the layer's threshold gets the skip index `num_experts` (transformers' experts module
skips it), the kept weights are renormalised — and the runtime must give the same greedy tokens and
logits at every budget, with per-layer thresholds that drop some but not all second experts, for top-2
and top-3 routing. Prefetch follows the gate: what the runtime asks to prefetch is exactly the next
layer's gated experts, computed here from the next router's weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import greedy, ref_greedy, reference_models, runtime_engine

SHAPES = {
    "top2": TinySpec(num_hidden_layers=3, num_local_experts=6, hidden_size=48, intermediate_size=64,
                     num_attention_heads=4, num_key_value_heads=2),
    "top3": TinySpec(num_hidden_layers=3, num_local_experts=7, num_experts_per_tok=3, hidden_size=48,
                     intermediate_size=80, num_attention_heads=4, num_key_value_heads=1),
}
PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 12]
STEPS = 16
# quantiles of each layer's non-top-1 weights on the prompt: a different share dropped in every layer,
# and layer 1 left ungated (a layer without a threshold routes plain top-k)
QUANTILES = {0: 0.5, 2: 0.3}


def reference_gate(weights: torch.Tensor, ids: torch.Tensor, threshold: float | None, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The method on a router's output, written independently of runtime/gating.py: weights [T, k] are
    descending and sum to 1; a non-top-1 expert below `threshold` is skipped (index `num_experts`)."""
    if threshold is None:
        return weights, ids
    drop = weights < threshold
    drop[:, 0] = False
    kept = weights.masked_fill(drop, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True), ids.masked_fill(drop, num_experts)


@contextmanager
def gated_routers(model, thresholds: dict[int, float]) -> Iterator[dict[int, list[int]]]:
    """Wrap each decoder layer's router (transformers' `MixtralTopKRouter`) with `reference_gate`; yields
    per layer [non-top-1 choices seen, dropped], counted over every forward."""
    counts = {i: [0, 0] for i in range(len(model.model.layers))}
    saved = []
    for i, layer in enumerate(model.model.layers):
        router = layer.mlp.gate
        orig = router.forward

        def forward(x, orig=orig, i=i, n=router.num_experts):
            logits, weights, ids = orig(x)  # [T, E], [T, k], [T, k]
            w, kept_ids = reference_gate(weights, ids, thresholds.get(i), n)
            counts[i][0] += ids[:, 1:].numel()
            counts[i][1] += int((kept_ids == n).sum())
            return logits, w, kept_ids

        saved.append((router, orig))
        router.forward = forward
    try:
        yield counts
    finally:
        for router, orig in saved:
            router.forward = orig


@pytest.fixture(scope="module")
def reference(make_checkpoint):
    # eager experts: transformers' default on CPU (grouped_mm) leaves the rows of a skipped expert (index
    # num_experts, what the gate sets) uninitialised outside expert parallelism, so the reference read
    # whatever memory held (wrong tokens, NaN logits now and then, under load most)
    return reference_models(make_checkpoint, SHAPES, experts_implementation="eager")


def thresholds_for(model) -> dict[int, float]:
    """Per-layer thresholds near a quantile of that layer's non-top-1 weights on the prompt (plain top-k
    routing), so that some but not all of them are dropped: halfway between the two weights around the
    quantile, never on one. A threshold equal to a weight is a knife edge: a last-bit difference in the
    router's sums (another BLAS blocking, as a busy machine gives another process) flips the decision, and
    the reference and the runtime part ways for a reason that is not the method's."""
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    th = {}
    for i, q in QUANTILES.items():
        w = torch.topk(torch.softmax(out.router_logits[i].float(), -1), k, dim=-1).values
        w = w / w.sum(-1, keepdim=True)
        second = torch.sort(w[:, 1:].flatten()).values
        at = min(int(q * (len(second) - 1)), len(second) - 2)
        while at + 2 < len(second) and second[at + 1] - second[at] < 1e-4:  # a gap wide enough to be robust
            at += 1
        th[i] = float((second[at] + second[at + 1]) / 2)
    return th


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("slots", ["one", "half", "all"])
def test_gated_runtime_equals_transformers_with_the_gate_on_its_routers(make_store, reference, name, slots):
    spec = SHAPES[name]
    per_layer = {"one": 1, "half": spec.num_local_experts // 2, "all": spec.num_local_experts}[slots]
    ref = reference(name)
    th = thresholds_for(ref)
    with gated_routers(ref, th) as counts, torch.no_grad():
        expected = ref_greedy(ref, PROMPT, STEPS)
        theirs = ref(torch.tensor([PROMPT])).logits
    for i in range(spec.num_hidden_layers):
        seen, dropped = counts[i]
        if i in th:
            assert 0 < dropped < seen, (i, dropped, seen)  # some, not all, non-top-1 experts dropped
        else:
            assert dropped == 0
    gate = GatePolicy(th, rule="test")
    store = Store.open(make_store(spec, dtype=torch.float32))
    budget = per_layer * spec.num_hidden_layers
    with runtime_engine(store, {"cache.budget": budget, "prefetch": True, "prefetch_precision": 0.0}, gate=gate) as eng:
        assert greedy(eng, PROMPT, STEPS) == expected
        with torch.no_grad():
            before = eng.stats.expert_activations
            ours = eng.model(torch.tensor([PROMPT])).logits
            prompt_activations = eng.stats.expert_activations - before
        assert (ours - theirs).abs().max().item() <= 1e-4
        # the experts computed on the prompt are exactly the ones the reference kept on it
        assert prompt_activations == len(PROMPT) * (spec.num_hidden_layers * spec.num_experts_per_tok) - sum(
            _dropped_on_prompt(ref, th).values())


def _dropped_on_prompt(ref, th: dict[int, float]) -> dict[int, int]:
    with gated_routers(ref, th) as counts, torch.no_grad():
        ref(torch.tensor([PROMPT]))
    return {i: c[1] for i, c in counts.items()}


def test_top1_gate_computes_one_expert_per_token(make_store):
    spec = SHAPES["top3"]
    store = Store.open(make_store(spec, dtype=torch.float32))
    with runtime_engine(store, gate=GatePolicy.top1(range(spec.num_hidden_layers))) as eng, torch.no_grad():
        eng.model(torch.tensor([PROMPT]))
        assert eng.stats.experts_per_token == 1.0


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_prefetch_asks_for_exactly_the_next_layers_gated_experts(make_store, reference, name):
    """Each decode step, block l asks the manager to prefetch layer l+1's experts as the gate will keep
    them: the next router on the hidden state entering block l, top-k, the reference gate."""
    spec = SHAPES[name]
    ref = reference(name)
    th = thresholds_for(ref)
    th[1] = th[0]  # every layer that can be prefetched (1, 2) is gated
    store = Store.open(make_store(spec, dtype=torch.float32))
    k, n = spec.num_experts_per_tok, spec.num_local_experts
    with runtime_engine(store, {"cache.budget": 2 * spec.num_hidden_layers, "prefetch": True,
                                "prefetch_precision": 0.0},
                        gate=GatePolicy(th, rule="test")) as eng:
        fam = eng.store.family
        experts = [fam.experts(eng.model, i) for i in range(spec.num_hidden_layers)]
        asked: list[tuple[int, list[int]]] = []
        expected: list[tuple[int, list[int]]] = []
        real_prefetch = eng.manager.prefetch

        def prefetch(layer, experts):
            asked.append((layer, sorted(set(experts))))
            return real_prefetch(layer, experts)

        def entering(module, args):
            x = args[0]  # [T, H], entering layer l's experts
            if x.shape[0] != 1 or module.layer + 1 >= spec.num_hidden_layers:
                return  # the prompt pass prefetches nothing; the last layer has no next
            nxt = module.layer + 1
            probs = torch.softmax(F.linear(x, fam.router(eng.model, nxt).weight).float(), -1)  # [1, E]
            w, ids = torch.topk(probs, k, dim=-1)
            _, ids = reference_gate(w / w.sum(-1, keepdim=True), ids, th.get(nxt), n)
            expected.append((nxt, sorted(e for e in ids[0].tolist() if e != n)))

        eng.manager.prefetch = prefetch
        hooks = [e.register_forward_pre_hook(entering) for e in experts]
        try:
            greedy(eng, PROMPT, STEPS)
        finally:
            for hk in hooks:
                hk.remove()
        assert len(expected) == (STEPS - 1) * (spec.num_hidden_layers - 1)
        assert asked == expected
        # the gate dropped some predicted experts, so following it is not the same as plain top-k
        assert sum(len(e) for _, e in expected) < len(expected) * k
        eng.manager.drain()
        s = eng.stats
        assert s.prefetch_hits + s.wasted_prefetches == s.prefetches_issued > 0
