"""Replays a routing trace through the runtime's own `ExpertManager`, `ExpertCache` and eviction policy,
with an instant loader (no I/O, no threads): the counts of hits, misses and prefetch hits are those the
runtime would count for the same routing, budget and gate. Steps group trace rows processed in one
forward (one row per decode step; a prompt's rows together)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapmoe_cli.profiling.trace import Trace
from adapmoe_cli.runtime.cache import ExpertCache
from adapmoe_cli.runtime.gating import GatePolicy, apply_gate
from adapmoe_cli.runtime.loader import InstantLoader
from adapmoe_cli.runtime.manager import ExpertManager
from adapmoe_cli.runtime.stats import Stats


@dataclass(frozen=True)
class Routing:
    """Per step and layer: the experts the gate keeps, and (decode steps) the gated prediction for it."""

    needed: list[list[tuple[int, ...]]]  # [step][layer index]
    activations: list[list[int]]  # [step][layer index] (token, expert) pairs computed
    predicted: list[list[tuple[int, ...] | None]]  # [step][layer index]; None for layer 0 / prefill steps
    rows: list[int]  # trace rows per step
    layers: list[int]


def prepare(trace: Trace, gate: GatePolicy, steps: list[int] | None = None) -> Routing:
    """Apply the gate to the whole trace at once. `steps[r]` is the step of row r (default: one row each)."""
    n, L = trace.num_tokens, len(trace.layers)
    step_of = steps if steps is not None else list(range(n))
    groups: dict[int, list[int]] = {}
    for r, st in enumerate(step_of):
        groups.setdefault(st, []).append(r)
    kept_ids, kept_pred = [], []
    for i, layer in enumerate(trace.layers):
        _, ids, keep = apply_gate(trace.weights[:, i].float(), trace.ids[:, i].long(), gate.threshold(layer))
        kept_ids.append(torch.where(keep, ids, torch.full_like(ids, -1)).tolist())
        _, pids, pkeep = apply_gate(trace.pred_weights[:, i].float(), trace.pred_ids[:, i].long(),
                                    gate.threshold(layer))
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
                pred_row.append(tuple(sorted({e for e in kept_pred[i][rs[0]] if e >= 0})))
            else:
                pred_row.append(None)
        needed.append(need_row)
        acts.append(act_row)
        predicted.append(pred_row)
        rows.append(len(rs))
    del n
    return Routing(needed, acts, predicted, rows, list(trace.layers))


@dataclass
class ReplayResult:
    stats: Stats
    misses_per_layer: list[int]
    steps: int
    tokens: int


def replay(routing: Routing, quotas: dict[int, int], policy: str = "lru", prefetch: bool = True,
           stride: int = 0) -> ReplayResult:
    """Run the routing through a fresh manager with the given per-layer slot quotas."""
    cache = ExpertCache(quotas, stride=0, policy=policy)
    manager = ExpertManager(cache, InstantLoader(stride))
    stats = manager.stats
    layers = routing.layers
    misses = [0] * len(layers)

    def noop(expert: int, views: object) -> None:
        pass

    for step, need_row in enumerate(routing.needed):
        n = routing.rows[step]
        for i, layer in enumerate(layers):
            nxt = routing.predicted[step][i + 1] if i + 1 < len(layers) else None
            if prefetch and nxt is not None:
                manager.prefetch(layers[i + 1], nxt)
            stats.layer_tokens += n
            stats.expert_activations += routing.activations[step][i]
            before = stats.misses
            manager.run_layer(layer, list(need_row[i]), noop)
            misses[i] += stats.misses - before
        stats.tokens += n
    return ReplayResult(stats, misses, len(routing.needed), sum(routing.rows))
