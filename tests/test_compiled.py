"""The compiled decode step (`--compile`, runtime/compiled.py) against the eager one on the same store and
budget: the same greedy tokens — transformers' own, with the same gate on its routers — and the same
counters (hits, prefetch hits, misses, reads, wasted prefetches) with the adaptive gate on, prefetch on
and half the experts cached; a second engine in the same process computes with its own experts; observed
steps run eagerly; and where compiling is impossible (no C++ compiler) the CLI says so in one line and
answers eagerly (found out before tracing), and a compile that fails after tracing is tried once more with a
simpler model, then runs eagerly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from dataclasses import asdict, replace

import torch

from adapmoe_cli.runtime import engine, moe_block
from adapmoe_cli.runtime.expert_kernel import ExpertKernel
from adapmoe_cli.runtime.gating import ExpertStats, GatePolicy
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import greedy, ref_greedy, reference_models, runtime_engine
from tests.test_gate import PROMPT, gated_routers, thresholds_for

SPEC = TinySpec(num_hidden_layers=3, num_local_experts=6, hidden_size=48, intermediate_size=80,
                num_attention_heads=4, num_key_value_heads=1)


def _counts(stats) -> dict:
    """What the routing alone decides. Whether a queued prefetch is dropped (evicted before its read started)
    or read depends on the loader thread's timing, so reads are compared as issued: loaded + dropped."""
    timed = ("stall_s", "loads", "bytes_read", "prefetches_dropped")
    return {**{k: v for k, v in asdict(stats).items() if k not in timed},
            "reads": stats.loads + stats.prefetches_dropped}


def _run(store: Store, compile: bool, gate: GatePolicy | None, notes: list[str], then=None, quotas=None
         ) -> tuple[list[int], dict, object]:
    overrides = {"cache.budget": SPEC.num_hidden_layers * SPEC.num_local_experts // 2, "prefetch": True,
                 "prefetch_precision": 0.0, "compile": compile}
    with runtime_engine(store, overrides, gate=gate, quotas=quotas) as eng:
        eng.decode.note = notes.append
        tokens = greedy(eng, PROMPT, 20) + greedy(eng, PROMPT[:4], 12)  # a second sequence: a new KV cache
        eng.manager.drain()
        if then is not None:
            then(eng)
        return tokens, _counts(eng.stats), eng.decode


def test_compiled_decode_gives_the_eager_tokens_and_counts(make_store, make_checkpoint, monkeypatch):
    store = Store.open(make_store(SPEC, dtype=torch.float32))
    ref = reference_models(make_checkpoint, {"tiny": SPEC}, experts_implementation="eager")("tiny")
    thresholds = thresholds_for(ref)  # two layers gated, one plain top-k, no threshold on a knife edge
    with gated_routers(ref, thresholds), torch.no_grad():
        expected = ref_greedy(ref, PROMPT, 20) + ref_greedy(ref, PROMPT[:4], 12)
    gate = GatePolicy(thresholds, rule="test")
    notes: list[str] = []
    eager_switched: list = []
    # 7 of the 18 experts; layer 0 with one slot, fewer than a token's two experts: its manager computes them,
    # as in layer 2, gated, where the graph would compute each of the two; layer 1 routes plain top-k
    quotas = {0: 1, 1: 3, 2: 3}
    assert set(thresholds) == {0, 2}
    eager_tokens, eager_counts, _ = _run(store, False, gate, notes, then=_switch(eager_switched), quotas=quotas)
    kernel_outputs = _count_kernel_outputs(monkeypatch)
    resolved = _count_resolved(monkeypatch)
    switched: list = []
    tokens, counts, step = _run(store, True, gate, notes, then=_switch(switched), quotas=quotas)
    assert notes == [] and step.failure is None and step.compile_s is not None  # it did compile
    assert tokens == eager_tokens == expected  # = transformers' model with the same gate on its routers
    assert counts == eager_counts
    # the compiled step keeps the guards on what changes its graph (compiled.py drops only those on module
    # hooks and shadowed attributes, and between the steps of a generation checks only tensor and size guards
    # until the engine says its state changed): another gate and prefetch off, mid-generation, give the
    # eager tokens
    assert switched == eager_switched and switched[0] != tokens[:12] and switched[1] == 0
    # steps that checked only tensor and size guards: of the first generation's 19 steps, all but the one that
    # compiled and the next (every guard checked, nothing compiled); of the second's 11, all but the first; of
    # the switched run's 11, all but the first and, after the switch, the one that recompiled and the next
    assert step.unguarded_steps == (19 - 2) + (11 - 1) + (11 - 3)
    # every expert a decode step computed was computed in the graph from the slot the manager named
    # (moe_block.resolve_experts) in layer 1, and by the expert kernel (expert_kernel.py) in layers 0 and 2;
    # the prompts ran eagerly
    with runtime_engine(store, {"cache.budget": SPEC.num_hidden_layers * SPEC.num_local_experts}, gate=gate) as eng:
        for prompt in (PROMPT, PROMPT[:4], PROMPT):  # the prompts' forwards only (the switch came after its
            greedy(eng, prompt, 1)  # prompt)
        prompt_activations = eng.stats.expert_activations
    assert set(resolved) == {1} and resolved[1] > 0 and kernel_outputs["tensor"] > 0 and kernel_outputs["none"] == 0
    assert kernel_outputs["tensor"] + resolved[1] == counts["expert_activations"] - prompt_activations
    assert counts["misses"] > 0 and counts["prefetch_hits"] > 0  # 7 of 18 experts: loads happened
    assert counts["expert_activations"] < counts["layer_tokens"] * SPEC.num_experts_per_tok  # the gate dropped some

    # a second engine in the same process compiles its own step — even where the compiler keeps a single
    # entry per code (the first engine's went with it) — and runs eagerly while someone watches each layer
    calls = _CountingModules(moe_block._MODULES)
    monkeypatch.setattr(moe_block, "_MODULES", calls)
    records = []

    def watch(eng) -> None:  # an observer of each layer call (the profiler, bench --simulate) sees decode steps too
        eng.observers.callbacks.append(lambda rec: records.append(rec.layer))
        greedy(eng, PROMPT, 5)

    with torch._dynamo.config.patch(recompile_limit=1):
        tokens, _, step = _run(store, True, gate, notes, then=watch)
    assert notes == [] and step.compile_s is not None and tokens == expected
    assert calls.lookups == (20 - 1 + 12 - 1) * SPEC.num_hidden_layers  # every decode step ran compiled
    assert records == list(range(SPEC.num_hidden_layers)) * 5  # watched: the prompt and 4 steps, eagerly


def test_a_compensating_gate_compiles_to_the_eager_tokens_and_counts(make_store):
    """The compensating gate (dropped experts replaced by their mean outputs, shares weighed by spreads) in
    the compiled step: the eager step's tokens and counts; and the means reach the tokens (zero ones, the
    same rule, answer otherwise)."""
    store = Store.open(make_store(SPEC, dtype=torch.float32))
    g = torch.Generator().manual_seed(1)
    layers = range(SPEC.num_hidden_layers)
    n, h = SPEC.num_local_experts, SPEC.hidden_size
    stats = ExpertStats({i: 0.5 * torch.randn(n, h, generator=g) for i in layers},
                        {i: 0.3 + 1.4 * torch.rand(n, generator=g) for i in layers})
    gate = GatePolicy({0: 0.3, 1: 0.25}, rule="test", mode="tail", stats=stats, spreads=True)
    notes: list[str] = []
    eager_tokens, eager_counts, _ = _run(store, False, gate, notes)
    tokens, counts, step = _run(store, True, gate, notes)
    assert notes == [] and step.failure is None and step.compile_s is not None
    assert tokens == eager_tokens and counts == eager_counts
    assert counts["expert_activations"] < counts["layer_tokens"] * SPEC.num_experts_per_tok
    zero = ExpertStats({i: torch.zeros(n, h) for i in layers}, stats.spread)
    assert _run(store, False, replace(gate, stats=zero), notes)[0] != tokens


def test_settled_layers_compute_their_experts_in_the_graph(make_store, make_checkpoint, monkeypatch):
    """With a slot for every expert of a layer — and of the next layer, where it prefetches — the manager
    has nothing to decide there but to count hits: a compiled engine reads those layers' experts before the
    first token and its step computes them inside the graph from the cache's slots (moe_block
    .OffloadedExperts._from_slots) instead of calling the manager: the same tokens as eagerly and as
    transformers (the gate on, dropping experts), and the same books (each such expert a hit, counted in the
    graph). Every layer whole (the `resident` policy), and some: a layer that prefetches into a layer with
    fewer slots than experts stays with the manager. With large experts (`GRAPH_EXPERT_BYTES`) a layer the
    gate drops experts from goes to the manager, which computes only the kept ones."""
    store = Store.open(make_store(SPEC, dtype=torch.float32))
    ref = reference_models(make_checkpoint, {"tiny": SPEC}, experts_implementation="eager")("tiny")
    thresholds = thresholds_for(ref)
    with gated_routers(ref, thresholds), torch.no_grad():
        expected = ref_greedy(ref, PROMPT, 20) + ref_greedy(ref, PROMPT[:4], 12)
    gate = GatePolicy(thresholds, rule="test")
    e = SPEC.num_local_experts
    steps = 20 - 1 + 12 - 1  # decode steps
    overrides = {"prefetch": True, "prefetch_precision": 0.0}
    whole, small = {0: e, 1: e, 2: e}, engine.GRAPH_EXPERT_BYTES
    for quotas, in_graph, large in ((whole, {0, 1, 2}, False), ({0: e, 1: e, 2: e // 2}, {0}, False),
                                    (whole, {0, 1, 2}, True)):
        monkeypatch.setattr(engine, "GRAPH_EXPERT_BYTES", 0 if large else small)
        computed = in_graph - set(thresholds) if large else in_graph  # large: the gated layers leave the graph
        assert not large or 0 < len(computed) < len(in_graph)  # (some layers gated, some not)
        runs = {}
        for compile in (False, True):
            with runtime_engine(store, overrides | {"compile": compile}, gate=gate, quotas=quotas) as eng:
                if not compile:  # what the compiled engine reads before the first token, for the same books
                    for layer in in_graph | {layer + 1 for layer in in_graph if layer + 1 in quotas}:
                        eng.manager.preload(layer, range(e))
                graph: list[int] = []
                eng.decode.after = _counting(eng, graph)
                tokens = greedy(eng, PROMPT, 20) + greedy(eng, PROMPT[:4], 12)
                eng.manager.drain()
                runs[compile] = tokens, _counts(eng.stats), sum(graph), eng.decode.failure, eng._graph_layers
        (eager_tokens, eager_counts, none, _, _), (tokens, counts, calls, failure, layers) = runs[False], runs[True]
        assert failure is None and none == 0
        assert tokens == eager_tokens == expected and counts == eager_counts
        assert layers == in_graph and calls == steps * len(computed)  # each decode step's calls there
        assert counts["expert_activations"] < counts["layer_tokens"] * SPEC.num_experts_per_tok  # the gate dropped
        if len(in_graph) < 3:
            assert counts["misses"] > 0 and counts["prefetch_hits"] > 0  # the manager still at work in layer 2
    # `none` keeps nothing between layer calls (it reloads every expert): never in the graph
    with runtime_engine(store, {"compile": True, "cache.policy": "none"}, quotas={0: e, 1: e, 2: e}) as eng:
        assert eng._graph_layers == frozenset() and eng.cache.settled_layers == frozenset()


def _counting(eng, graph: list[int]):
    """An engine's `decode.after` that first puts each step's layer calls computed in the graph in `graph`."""
    count = eng.decode.after

    def after() -> None:
        graph.append(int(eng._graph_counts[0]))
        count()
    return after


def _switch(out: list):
    """After a run: 12 tokens, and after the 4th — between two steps on the same KV cache, where the compiled
    step checks only tensor and size guards — the top-1 gate in every layer and prefetch off; `out` gets the
    tokens and the prefetches issued after the switch."""
    def then(eng) -> None:
        issued = []

        def switch(i: int) -> None:
            if i == 4:
                eng.use_gate(GatePolicy.top1(range(SPEC.num_hidden_layers)))
                eng.use_prefetch(False)
                issued.append(eng.stats.prefetches_issued)
        out.extend([greedy(eng, PROMPT, 12, after=switch), eng.stats.prefetches_issued - issued[0]])
    return then


def _count_kernel_outputs(monkeypatch) -> dict[str, int]:
    """Counts of the expert kernel's answers from now on: a tensor, or None (computed eagerly instead)."""
    counts = {"tensor": 0, "none": 0}
    call = ExpertKernel.__call__

    def counted(self, *args):
        out = call(self, *args)
        counts["none" if out is None else "tensor"] += 1
        return out

    monkeypatch.setattr(ExpertKernel, "__call__", counted)
    return counts


def _count_resolved(monkeypatch) -> dict[int, int]:
    """Layer → the experts whose slots the manager has named to a compiled graph from now on."""
    counts: dict[int, int] = {}
    resolve = moe_block.OffloadedExperts._resolve

    def counted(self, ids, predicted):
        counts[self.layer] = counts.get(self.layer, 0) + int((ids >= 0).sum())
        return resolve(self, ids, predicted)

    monkeypatch.setattr(moe_block.OffloadedExperts, "_resolve", counted)
    return counts


class _CountingModules(weakref.WeakValueDictionary):
    """The registry the compiled graph's expert calls look their module up in, counting the lookups."""

    def __init__(self, other: weakref.WeakValueDictionary) -> None:
        super().__init__(other)
        self.lookups = 0

    def __getitem__(self, key: int):
        self.lookups += 1
        return super().__getitem__(key)


def test_without_a_compiler_it_says_so_and_answers_eagerly(make_store, tmp_path):
    from adapmoe_cli.conversation import Conversation, load_tokenizer
    from adapmoe_cli.planning.resolve import open_engine
    from adapmoe_cli.settings import load_settings

    store = make_store(SPEC, dtype=torch.float32)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    r = subprocess.run([sys.executable, "-m", "adapmoe_cli", "chat", str(store), "--prompt", "hi", "--json",
                        "--max-new-tokens", "6", "--raw", "--compile"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "--compile" in line]
    assert len(lines) == 1 and "running eagerly" in lines[0] and "Traceback" not in r.stderr
    assert "No working C++ compiler" in lines[0] and "install a C++ compiler" in lines[0]  # what, and what to do
    # the answer is what chat answers eagerly
    settings = load_settings(overrides={"generation.max_new_tokens": 6})
    with open_engine(Store.open(store), settings) as eng:
        conv = Conversation(eng, load_tokenizer(eng.store), settings.generation, raw=True)
        eager = list(conv.send("hi"))[-1].token_ids
    assert json.loads(r.stdout)["token_ids"] == eager



class _Window(torch.nn.Module):
    """A decode step whose graph depends on the KV cache's length, as a sliding window's mask does."""

    def forward(self, input_ids: torch.Tensor, cache, use_cache: bool) -> torch.Tensor:
        n = cache.get_seq_length()
        cache.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 0)
        return input_ids.float() * (5.0 if n >= 6 else 3.0)  # the window is full from 6 positions on


def test_a_step_that_skips_guards_is_refused_when_the_length_crosses_a_branch():
    """Between the steps of one generation the compiled step checks only tensor and size guards (the other
    changes come through the engine: the mid-generation switch above): a length crossing a branch of the
    graph makes the size guard refuse the skipped step, which then runs with every guard and recompiles —
    the answer is what the model computes eagerly (GPT-OSS's sliding window does this at its window;
    scripts/check_compiled_families.py runs every family's tiny checkpoint compiled)."""
    from transformers import DynamicCache

    from adapmoe_cli.runtime.compiled import DecodeStep

    step = DecodeStep(_Window(), compile=True)
    kv, ref = DynamicCache(), DynamicCache()
    for cache in (kv, ref):
        cache.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), 0)  # a 4-token prompt
    ids = torch.tensor([[7]])
    got = [step(ids, kv).item() for _ in range(6)]  # lengths 4 … 9
    assert step.failure is None and step.compile_s is not None
    assert got == [_Window()(ids, ref, True).item() for _ in range(6)] == [21.0] * 2 + [35.0] * 4
    # after the compiling step (length 4) and a checked one (5), the skipped step at 6 was refused and rerun
    # with every guard (it recompiled), 7 was checked (nothing compiled), 8 and 9 skipped
    assert step.unguarded_steps == 2


class _Scale(torch.nn.Module):
    """A decode step that grows the KV cache by one position and scales the token id (by a factor of its own,
    so its kernels are new to inductor's caches)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, input_ids: torch.Tensor, cache, use_cache: bool) -> torch.Tensor:
        cache.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), 0)
        return input_ids.float() * self.factor


def test_a_compile_that_fails_is_tried_simpler_once_then_runs_eagerly(tmp_path):
    """A C++ compiler that answers `--version` but builds nothing (so the step's check before tracing finds
    one, and the failure comes from inductor after dynamo traced): the step asks for a simpler model once (the
    engine: every layer's experts through the manager), fails again, says so once and answers eagerly, the KV
    cache holding exactly the fed positions."""
    import secrets

    from adapmoe_cli.runtime.compiled import DecodeStep
    from adapmoe_cli.runtime.kv_cache import GrowingCache

    fake = tmp_path / "c++"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fake 1.0"; exit 0; }\nexit 1\n')
    fake.chmod(0o755)
    factor = 2.0 + secrets.randbelow(1 << 20) / (1 << 20)
    asked: list[int] = []
    notes: list[str] = []
    step = DecodeStep(_Scale(factor), compile=True, note=notes.append,
                      simpler=lambda: asked.append(1) is None)
    kv = GrowingCache()  # the runtime's (room made for each compiled step's position: runtime/kv_cache.py)
    kv.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), 0)  # a 4-token prompt
    with torch._inductor.config.patch({"cpp.cxx": (str(fake),), "fx_graph_cache": False}):
        out = [step(torch.tensor([[7]]), kv).item() for _ in range(2)]
    assert out == [(torch.tensor([[7]]).float() * factor).item()] * 2 and kv.get_seq_length() == 6  # (float32)
    assert step.failure is not None and step.compile_s is None and asked == [1]
    assert len(notes) == 1 and "compiling the decode step failed" in notes[0] and "running eagerly" in notes[0]
