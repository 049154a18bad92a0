"""The module put in place of a family's `experts` module — the seam every transformers 5 MoE family
calls as `experts(hidden_states, top_k_index, top_k_weights)` (`transformers.integrations.moe`). The
family's own block stays: its router, shared experts and their gates, and everything around the layer
(attention, norms, KV cache) are transformers'. Glue only: ranks the router's choice, applies the
adaptive gate (adding the dropped experts' mean outputs where the policy compensates), asks the manager
to prefetch what the next layer's router predicts from this hidden state, and computes each needed
expert from the slot the manager hands it. In a compiled decode step the experts are computed inside the
graph from the layer's slots (`_from_slots`): for a settled layer (every expert read, nothing left for the
manager but to count hits) with no call out of the graph at all; for an ungated call of a layer the
manager still loads into (small experts), after one opaque call (`resolve_experts`) that keeps the books,
loads and waits, and answers where each expert's slot lies."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapmoe_cli.runtime.gating import GatePolicy, adaptive_keep, compensation, costs, rank, reweigh
from adapmoe_cli.runtime.manager import ExpertManager


@dataclass
class LayerRecord:
    """What one MoE layer call saw, handed to observers (the profiler, trace recorders)."""

    layer: int
    hidden: torch.Tensor  # [T, H] entering the experts
    weights: torch.Tensor  # [T, k] each expert's share of the router's weights (sum 1), descending, before the gate
    ids: torch.Tensor  # [T, k]
    keep: torch.Tensor  # [T, k] bool: what the gate kept
    output: torch.Tensor  # [T, H] the routed experts' output (in the autograd graph when grad is on)
    expert_outputs: torch.Tensor | None  # [T, k, H] unweighted expert outputs, when requested
    mass: torch.Tensor | None = None  # [T] the total of the router's weights (1 for a renormalising top-k)
    renormalises: bool = True  # whether the router gives the kept experts the whole total


@dataclass
class Observers:
    """Callbacks shared by all blocks of an engine; `expert_outputs` asks blocks to keep per-expert outputs."""

    callbacks: list[Callable[[LayerRecord], None]] = field(default_factory=list)
    expert_outputs: bool = False


def gated_activation(kind: str, experts: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(gate, up) → the expert's hidden activation, as the family's own experts module computes it."""
    if kind == "clamped_swiglu":  # GPT-OSS (GptOssExperts._apply_gate, on de-interleaved halves)
        alpha, limit = float(experts.alpha), float(experts.limit)

        def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            gate = gate.clamp(max=limit)
            return (up.clamp(min=-limit, max=limit) + 1) * (gate * torch.sigmoid(gate * alpha))
        return swiglu
    if kind != "act":
        raise ValueError(f"unknown gated activation {kind!r}")
    act = experts.act_fn
    return lambda gate, up: act(gate) * up


def predict(router: nn.Module, x: torch.Tensor, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What `router` (a family's own router module) would choose for hidden states x [T, H]: (shares, ids),
    descending. Its `forward` is called directly, so hooks counting the model's routing do not see a
    prediction."""
    _, weights, ids = router.forward(x)
    shares, ids, _ = rank(weights, ids, ordered)
    return shares, ids


class OffloadedExperts(nn.Module):
    def __init__(
        self,
        layer: int,
        manager: ExpertManager,
        glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        gate_policy: Callable[[], GatePolicy],
        observers: Observers,
        renormalises: bool = True,
        ordered: bool = False,
        next_layer: int | None = None,
        next_router: nn.Module | None = None,
        prefetch: bool = True,
        linear: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
        biases: bool = False,
        kernel: Callable[[torch.Tensor, dict[str, Any], torch.Tensor], torch.Tensor | None] | None = None,
    ):
        super().__init__()
        self.layer = layer
        self.manager = manager
        self.glu = glu  # (gate, up) → hidden (gated_activation)
        self.biases = biases  # the experts have b1, b3, b2 (added after w1, w3, w2)
        self.gate_policy = gate_policy
        self.observers = observers
        self.renormalises = renormalises
        self.ordered = ordered  # the router's k weights come descending (families/base.py)
        self.next_layer = next_layer
        # the next layer's router, held without registering the module twice
        self._next_router = [next_router] if next_router is not None else []
        self.prefetch_enabled = prefetch and next_router is not None
        #: x × one expert part's weights (a part's tensors: `{"": w}` natively; quantized, experts_format.py)
        self.linear = linear or (lambda x, w: F.linear(x, w[""]))
        #: (x, an expert's parts, its weight) → the weighted output, in a compiled step; None: compute eagerly
        self.kernel = kernel
        self.key = next(_KEYS)  # how a compiled graph names this module (`offloaded_experts`)
        _MODULES[self.key] = self
        #: a compiled step's experts of this layer, computed inside its graph from the cache's slots
        #: (`compute_in_graph`, `resolve_in_graph`); None: by the manager, in `offloaded_experts`
        self.stacked: Callable[..., torch.Tensor] | None = None
        #: what the graph computed itself, not yet in the manager's Stats: [layer calls, experts computed]
        #: (one tensor shared by the engine's blocks); None where the manager counts (`resolve_in_graph`)
        self.graph_counts: torch.Tensor | None = None
        #: a call the gate may drop experts from is computed in the graph too (every one of the k, a dropped
        #: one's output zeroed); False: such a call goes to the manager, which computes the kept ones only
        self.gated_in_graph = True

    def compute_in_graph(self, stacked: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None,
                         counts: torch.Tensor | None = None, gated: bool = True) -> None:
        """In a compiled step, compute this layer's experts with `stacked` (expert_kernel.StackedExperts) in
        the graph, adding [1, experts computed] to `counts` each call; None: through the manager. Only for a
        settled layer (the cache: every expert of it read, nothing in flight) whose next layer,
        where it prefetches, holds every expert (the manager would prefetch nothing): then the manager's books
        are only counts, each kept expert a hit. `gated`: also where the gate is on (`gated_in_graph`). The
        graph is specialised on this choice: the engine makes it (`Engine._in_graph`) and says so to the
        compiled step."""
        self.stacked, self.graph_counts, self.gated_in_graph = stacked, counts, gated

    def resolve_in_graph(self, stacked: Callable[..., torch.Tensor]) -> None:
        """In a compiled step, compute this layer's experts with `stacked` in the graph, each from the slot the
        manager names (`resolve_experts`: it keeps the books, loads what is missing and waits for it, as for
        any call, and computes nothing). Only for a layer with at least as many slots as a token picks experts,
        whose eviction policy keeps them and whose misses wait for their read (no fallback copy): then every
        expert the call needs is in memory at once when the manager returns, and stays there until the
        layer's next call. A call the gate may drop experts from still goes to the manager, which computes
        the kept ones only: the call out of the graph is made either way, and the graph would compute all k."""
        self.stacked, self.graph_counts, self.gated_in_graph = stacked, None, False

    def predict_next(self, x: torch.Tensor) -> list[int]:
        """Experts the next layer would keep, from its router applied to the hidden state entering this
        layer's experts and the next layer's adaptive gate (prefetch follows the gate), in rank order
        (a token's highest share first)."""
        return ranked(self._predicted(x))

    def _predicted(self, x: torch.Tensor) -> torch.Tensor:
        """`predict_next` as tensor ops (a compiled step keeps it in its graph): [T·k] ids, -1 where the next
        layer's gate would drop the expert."""
        policy = self.gate_policy()
        threshold = policy.threshold(self.next_layer)
        if threshold is None:  # plain top-k: no shares needed
            return self._next_router[0].forward(x)[2].reshape(-1)
        shares, ids = predict(self._next_router[0], x, self.ordered)
        keep = adaptive_keep(costs(shares, ids, policy.spread(self.next_layer)), threshold, policy.mode)
        return ids.masked_fill(~keep, -1).reshape(-1)

    def _gated(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, policy: GatePolicy
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The router's choice through the adaptive gate, as tensor ops: (ids [T, k], -1 where dropped; the
        weights the kept experts get, in the router's dtype; what replaces the dropped ones [T, H] float32,
        or None)."""
        threshold = policy.threshold(self.layer)
        if threshold is None:
            return top_k_index, top_k_weights, None
        _, ids, _, keep, kept, extra = self._ranked_gate(top_k_index, top_k_weights, policy, threshold)
        return ids.masked_fill(~keep, -1), kept.to(top_k_weights.dtype), extra

    def _ranked_gate(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, policy: GatePolicy,
                     threshold: float | None) -> tuple[torch.Tensor, ...]:
        """The router's choice ranked and gated: (shares, ids and the router's weights [T, k] in rank order;
        the keep mask; the weights the kept experts get, float32; what replaces the dropped ones [T, H] or
        None)."""
        shares, ids, weights = rank(top_k_weights, top_k_index, self.ordered)
        keep = adaptive_keep(costs(shares, ids, policy.spread(self.layer)), threshold, policy.mode)
        mean = policy.mean(self.layer)
        extra = compensation(weights, ids, keep, mean) if mean is not None else None
        kept = reweigh(weights, shares, keep, self.renormalises and extra is None)
        return shares, ids, weights, keep, kept, extra

    def _one_token(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   predicted: torch.Tensor | None, compiled: bool = False) -> torch.Tensor:
        """One token (a decode step), gated (`_gated`), nobody watching: the books and the arithmetic of
        `forward`, in the same order (each expert's weighted output added as it is computed), with no
        per-expert gather, scatter or zero-filled output: a decode step's cost here is the number of small
        ops. `predicted`: the next layer's prediction (`_predicted`), prefetched unless every expert of that
        layer already has a slot. `compiled`: called from a compiled step, whose experts are computed by
        the engine's expert kernel where it has one (runtime/expert_kernel.py)."""
        position = {e: k for k, e in enumerate(ids[0].tolist()) if e >= 0}
        nxt = self._then_prefetch(predicted)
        row = weights[0]
        lin, glu, biases = self.linear, self.glu, self.biases
        kernel = self.kernel if compiled else None
        total: list[torch.Tensor] = []

        def compute(expert: int, w: dict[str, dict[str, torch.Tensor]]) -> None:
            scale = row[position[expert]]
            y = kernel(x, w, scale) if kernel is not None else None
            if y is None:
                y = (expert_output(lin, glu, biases, x, w) * scale).to(x.dtype)  # [1, H]
            total.append(total.pop() + y if total else y)

        self.manager.run_layer(self.layer, sorted(position), compute, tokens=1, activations=len(position),
                               then_prefetch=nxt)
        return total[0] if total else torch.zeros_like(x)

    def _from_slots(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gated: bool,
                    slots: torch.Tensor | None = None) -> torch.Tensor:
        """One token's experts computed in a compiled graph from the cache's slots, added in ascending order
        as the manager computes them. `slots`: where each of them lies, in that order (`resolve_experts`: the
        manager has counted them; an ungated call); None: a settled layer (`compute_in_graph`), whose experts
        the graph finds itself and counts in `graph_counts`, each kept expert a hit as the manager would count
        it. `gated`: the gate may drop experts (id -1): each of the k is computed and a dropped one's output
        replaced by zeros — the graph has one shape whatever the gate keeps, so it is free of data-dependent
        branches (which the compiler cannot cache); in a settled layer a dropped one is computed with the
        last kept expert's weights, just read, rather than another expert's from memory (paired 0.976 and
        0.981 a step with every expert held, docs/performance.md)."""
        ascending, order = ids[0].sort()
        scales = weights[0].index_select(0, order)
        kept = ascending >= 0
        if gated and slots is None:
            # a dropped one (-1, first in ascending order) is computed with the weights of the token's last
            # kept expert, computed right after it, so they are read from memory once
            ascending = torch.where(kept, ascending, ascending[-1].clamp(min=0))
        out = None
        for j in range(ascending.shape[0]):
            if slots is not None:
                y = self.stacked(x, slots[j], scales[j], by_slot=True)
            else:
                y = self.stacked(x, ascending[j], scales[j])  # (no -1 left: replaced above)
            if gated:
                y = torch.where(kept[j], y, 0.0)
            out = y if out is None else out + y
        if slots is None:
            self.graph_counts.add_(torch.stack((torch.ones_like(order[0]), kept.sum())))
        return out

    def _then_prefetch(self, predicted: torch.Tensor | None) -> tuple[int, list[int]] | None:
        """What a decode step's call prefetches once its demand loads are queued: (the next layer, the
        prediction `_predicted` made, ranked), or None — prefetch off, or every expert of that layer has a slot."""
        if predicted is None or not self.prefetch_enabled or self.manager.cache.holds_all(self.next_layer):
            return None
        return self.next_layer, ranked(predicted)

    def _resolve(self, ids: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """One ungated token's layer call with the manager computing nothing (`resolve_in_graph`): the books,
        the loads and the next layer's prefetch as in `_one_token`; when it returns, every expert the token
        needs is in memory. Answers each one's place in the layer's arena, in ascending order of their ids."""
        needed = sorted(ids[0].tolist())
        nxt = self._then_prefetch(predicted)
        self.manager.run_layer(self.layer, needed, _nothing, tokens=1, activations=len(needed), then_prefetch=nxt)
        cache = self.manager.cache
        assert all(cache.is_ready(self.layer, e) for e in needed), "an expert the graph reads is not in memory"
        return torch.tensor([cache.position(self.layer, e) for e in needed], dtype=torch.long)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        x = hidden_states  # [T, H]
        h = x.shape[-1]
        policy = self.gate_policy()
        threshold = policy.threshold(self.layer)
        observed = bool(self.observers.callbacks)
        if torch.compiler.is_compiling():  # a compiled decode step (compiled.py): the gate and the prediction
            # in its graph, the manager's work in one opaque call (none in a settled layer)
            ids, weights, extra = self._gated(top_k_index, top_k_weights, policy)
            gated = threshold is not None
            in_graph = self.stacked is not None and (self.gated_in_graph or not gated)
            if in_graph and self.graph_counts is not None:  # settled: the graph alone
                return _plus(self._from_slots(x, ids, weights, gated), extra)
            predicted = self._predicted(x) if self.prefetch_enabled else top_k_index.new_empty(0)
            if in_graph:  # the manager resolves the slots, the graph computes
                slots = resolve_experts(ids, predicted, self.key)
                return _plus(self._from_slots(x, ids, weights, gated, slots), extra)
            return _plus(offloaded_experts(x, ids, weights, predicted, self.key), extra)
        if x.shape[0] == 1 and not observed:
            ids, weights, extra = self._gated(top_k_index, top_k_weights, policy)
            predicted = (self._predicted(x) if self.prefetch_enabled
                         and not self.manager.cache.holds_all(self.next_layer) else None)
            return _plus(self._one_token(x, ids, weights, predicted), extra)
        extra = None
        if threshold is None and not observed:  # plain top-k, nobody watching: the router's choice as it is
            gated_w, gated_ids, activations = top_k_weights, top_k_index, top_k_index.numel()
            needed = sorted(set(top_k_index.view(-1).tolist()))
        else:
            shares, ids, weights, keep, kept, extra = self._ranked_gate(top_k_index, top_k_weights, policy,
                                                                        threshold)
            if threshold is None:  # ungated, watched: the router's weights as they are
                gated_w, gated_ids = weights.to(top_k_weights.dtype), ids
            else:
                gated_w, gated_ids = kept.to(top_k_weights.dtype), ids.masked_fill(~keep, -1)
            activations = int(keep.sum())
            needed = sorted(set(gated_ids[keep].tolist()))
        nxt = None
        if self.prefetch_enabled and x.shape[0] == 1 and not self.manager.cache.holds_all(self.next_layer):
            # (once every expert of the next layer has a slot the prediction would change nothing; skipping it
            # is 10 % of a resident step on the embedded model, docs/performance.md)
            nxt = (self.next_layer, self.predict_next(x))
        out = torch.zeros_like(x)
        record = self.observers.expert_outputs and observed
        expert_out = x.new_zeros((x.shape[0], gated_ids.shape[1], h)) if record else None

        lin, glu, biases = self.linear, self.glu, self.biases

        def compute(expert: int, w: dict[str, dict[str, torch.Tensor]]) -> None:
            token_idx, k_pos = torch.where(gated_ids == expert)
            y = expert_output(lin, glu, biases, x[token_idx], w)  # [t, H]
            if expert_out is not None:
                expert_out[token_idx, k_pos] = y.detach()
            out.index_add_(0, token_idx, (y * gated_w[token_idx, k_pos, None]).to(out.dtype))

        self.manager.run_layer(self.layer, needed, compute, tokens=x.shape[0], activations=activations,
                               then_prefetch=nxt)
        out = _plus(out, extra)
        if observed:
            rec = LayerRecord(self.layer, x, shares, ids, keep, out, expert_out, weights.sum(-1), self.renormalises)
            for fn in self.observers.callbacks:
                fn(rec)
        return out


def _plus(out: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """The experts' output plus what replaces the dropped ones (`OffloadedExperts._gated`), if anything."""
    return out if extra is None else out + extra.to(out.dtype)


def expert_output(lin: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
                  glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], biases: bool, x: torch.Tensor,
                  w: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """Tokens x [t, H] through one expert's parts `w`: the family's gated activation of x × w1 and x × w3,
    times w2, each with its bias where the experts have them (`lin` computes x × a part)."""
    gate, up = gate_up(lin, x, w)  # [t, I]
    if biases:
        gate, up = gate + w["b1"][""], up + w["b3"][""]
    y = lin(glu(gate, up), w["w2"])  # [t, H]
    if biases:
        y = y + w["b2"][""]
    return y


def gate_up(lin: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor], x: torch.Tensor,
            w: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """x × w1 and x × w3: one product with their fused view `w13` where the slot has it (store/reader.py;
    transformers' `gate_up_proj` computes the same way), else two."""
    if "w13" in w:
        return lin(x, w["w13"]).chunk(2, dim=-1)
    return lin(x, w["w1"]), lin(x, w["w3"])


def ranked(predicted: torch.Tensor) -> list[int]:
    """A prediction's ids ([T·k], -1 where the gate drops) without the dropped ones and repeats, in order."""
    return list(dict.fromkeys(e for e in predicted.tolist() if e >= 0))


_KEYS = itertools.count()
_MODULES: weakref.WeakValueDictionary[int, OffloadedExperts] = weakref.WeakValueDictionary()


#: the two calls a compiled step makes out of its graph, defined on torch.library directly rather than with
#: `torch.library.custom_op`, whose Python wrapper (autograd, devices) doubles what leaving the graph costs:
#: 22–29 against 13–16 µs a layer (scripts/measure_op_boundary.py). Neither ever needs a gradient.
_LIB = torch.library.Library("adapmoe", "DEF")
_LIB.define("offloaded_experts(Tensor x, Tensor ids, Tensor weights, Tensor predicted, int key) -> Tensor")
_LIB.define("resolve_experts(Tensor ids, Tensor predicted, int key) -> Tensor")


def _offloaded_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, predicted: torch.Tensor,
                       key: int) -> torch.Tensor:
    """One token through the experts of the `OffloadedExperts` numbered `key`, gated (ids, weights) and with
    the next layer's prediction, in a compiled graph: opaque to the compiler (it runs the manager: loads,
    waits, counts), called once per layer and token."""
    if x.shape[0] != 1:
        raise NotImplementedError("a compiled step feeds one token at a time; longer inputs run eagerly")
    return _MODULES[key]._one_token(x, ids, weights, predicted, compiled=True)


def _resolve_experts(ids: torch.Tensor, predicted: torch.Tensor, key: int) -> torch.Tensor:
    """One token's layer call of the `OffloadedExperts` numbered `key` in a compiled graph, the manager
    computing nothing (`OffloadedExperts._resolve`): opaque to the compiler, once per layer and token; the
    graph then computes the experts from the slots it answers."""
    return _MODULES[key]._resolve(ids, predicted)


_LIB.impl("offloaded_experts", _offloaded_experts, "CompositeExplicitAutograd")
_LIB.impl("resolve_experts", _resolve_experts, "CompositeExplicitAutograd")


@torch.library.register_fake("adapmoe::offloaded_experts")
def _(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, predicted: torch.Tensor, key: int
      ) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.register_fake("adapmoe::resolve_experts")
def _(ids: torch.Tensor, predicted: torch.Tensor, key: int) -> torch.Tensor:
    return ids.new_empty(ids.shape[-1])


offloaded_experts = torch.ops.adapmoe.offloaded_experts.default
resolve_experts = torch.ops.adapmoe.resolve_experts.default


def _nothing(expert: int, views: Any) -> None:
    """The compute a `_resolve` call hands the manager: the graph computes after it."""
