"""Replays a routing trace through the runtime's own `ExpertManager`, `ExpertCache` and eviction policy —
the one replay loop, shared by the planner (instant loader: no I/O, no threads, no clock) and the
simulator (simulated loader and clock, through `ReplayHooks`): the counts of hits, misses and prefetch
hits are those the runtime would count for the same routing, budget and gate. Steps group trace rows
processed in one forward (one row per decode step; a prompt's rows together)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from adapmoe_cli.profiling.trace import Trace
from adapmoe_cli.runtime.cache import ExpertCache
from adapmoe_cli.runtime.eviction import RoutingModel
from adapmoe_cli.runtime.gating import GatePolicy, apply_gate
from adapmoe_cli.runtime.loader import InstantLoader
from adapmoe_cli.runtime.manager import ExpertManager
from adapmoe_cli.runtime.prefetch import PrefetchAdmission


@dataclass(frozen=True)
class Routing:
    """Per step and layer: the experts the gate keeps, and (decode steps) the gated prediction for it."""

    needed: list[list[tuple[int, ...]]]  # [step][layer index]
    activations: list[list[int]]  # [step][layer index] (token, expert) pairs computed
    predicted: list[list[tuple[int, ...] | None]]  # [step][layer index], rank order; None: layer 0 / prefill
    rows: list[int]  # trace rows per step
    layers: list[int]

    def part(self, start: int, stop: int | None = None) -> Routing:
        """Steps start … stop-1 (a held-out split: fit on one part, measure on another)."""
        return replace(self, needed=self.needed[start:stop], activations=self.activations[start:stop],
                       predicted=self.predicted[start:stop], rows=self.rows[start:stop])


def prepare(trace: Trace, gate: GatePolicy, steps: list[int] | None = None) -> Routing:
    """Apply the gate to the whole trace at once. `steps[r]` is the step of row r (default: one row each)."""
    n, L = trace.num_tokens, len(trace.layers)
    step_of = steps if steps is not None else list(range(n))
    groups: dict[int, list[int]] = {}
    for r, st in enumerate(step_of):
        groups.setdefault(st, []).append(r)
    kept_ids, kept_pred = [], []
    for i, layer in enumerate(trace.layers):
        _, ids, keep = apply_gate(trace.weights[:, i].float(), trace.ids[:, i].long(), gate.threshold(layer),
                                 gate.mode, gate.spread(layer))
        kept_ids.append(torch.where(keep, ids, torch.full_like(ids, -1)).tolist())
        _, pids, pkeep = apply_gate(trace.pred_weights[:, i].float(), trace.pred_ids[:, i].long(),
                                    gate.threshold(layer), gate.mode, gate.spread(layer))
        kept_pred.append(torch.where(pkeep, pids, torch.full_like(pids, -1)).tolist())
    needed, acts, predicted, rows = [], [], [], []
    for st in sorted(groups):
        rs = groups[st]
        need_row, act_row, pred_row = [], [], []
        for i in range(L):
            ids = {e for r in rs for e in kept_ids[i][r] if e >= 0}
            need_row.append(tuple(sorted(ids)))
            act_row.append(sum(1 for r in rs for e in kept_ids[i][r] if e >= 0))
            if i > 0 and len(rs) == 1 and trace.pred_ids[rs[0], i, 0] >= 0:
                pred_row.append(tuple(dict.fromkeys(e for e in kept_pred[i][rs[0]] if e >= 0)))  # rank order
            else:
                pred_row.append(None)
        needed.append(need_row)
        acts.append(act_row)
        predicted.append(pred_row)
        rows.append(len(rs))
    del n
    return Routing(needed, acts, predicted, rows, list(trace.layers))


class ReplayHooks:
    """What a replay does around the manager's calls, at each point where the runtime computes something.
    The planner's does nothing; the simulator's advances its clock (simulate/simulator.py)."""

    def layer(self, step: int, i: int) -> None:
        """Layer i starts: its dense part (attention, router)."""

    def predict(self, step: int, i: int) -> None:
        """Layer i's experts are about to be prefetched (layer i's router on layer i-1's input)."""

    def experts(self, step: int, i: int) -> None:
        """Layer i's experts are about to be made resident and computed."""

    def compute(self, expert: int, views: object) -> None:
        """One needed expert, resident now, is computed."""

    def step_end(self, step: int) -> None:
        """The step's forward pass ends (the output head); its tokens are counted."""


def replay(routing: Routing, manager: ExpertManager, prefetch: bool = True, hooks: ReplayHooks | None = None
           ) -> list[int]:
    """Run `routing` through `manager` as the MoE blocks would: per step and layer, prefetch the next
    layer's prediction, then the layer's needed experts. Counts go to `manager.stats` (the manager counts
    as it does in the runtime); returns the demand loads (misses) of each layer."""
    hooks = hooks or ReplayHooks()
    stats, layers = manager.stats, routing.layers
    misses = [0] * len(layers)
    for step, need_row in enumerate(routing.needed):
        n = routing.rows[step]
        for i, layer in enumerate(layers):
            hooks.layer(step, i)
            nxt = routing.predicted[step][i + 1] if i + 1 < len(layers) else None
            then = None
            if prefetch and nxt is not None:
                hooks.predict(step, i + 1)
                then = (layers[i + 1], list(nxt))
            hooks.experts(step, i)
            before = stats.misses
            manager.run_layer(layer, list(need_row[i]), hooks.compute, tokens=n,
                              activations=routing.activations[step][i], then_prefetch=then)
            misses[i] += stats.misses - before
        stats.tokens += n
        hooks.step_end(step)
    return misses


def replay_misses(routing: Routing, quotas: dict[int, int], policy: str = "lru", prefetch: bool = True,
                  model: RoutingModel | None = None, prefetch_precision: float = 0.0) -> list[int]:
    """Demand loads per layer of `routing` through a fresh manager with an instant loader and these slots
    (`model`: what a predicting eviction policy predicts from; `prefetch_precision`: the admission's, as the
    runtime's settings give it)."""
    manager = ExpertManager(ExpertCache(quotas, stride=0, policy=policy, routing=model), InstantLoader(0),
                            admission=PrefetchAdmission(prefetch_precision))
    try:
        return replay(routing, manager, prefetch)
    finally:
        manager.close()
