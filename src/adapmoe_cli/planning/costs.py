"""Per-layer cost curves: cost_l(s) = demand loads (stalls) per token at layer l with s slots, measured by
replaying the routing trace through the runtime's manager (same gate, same prefetching, same eviction
policy). Layers have their own slots and their own predictions, so one replay with s slots in every
layer gives every layer's point at s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapmoe_cli.planning.replay import Routing, replay_misses
from adapmoe_cli.runtime.eviction import RoutingModel


@dataclass(frozen=True)
class CostCurves:
    layers: list[int]
    curves: list[list[float]]  # [layer index][s - 1] stalls per token
    uses_per_token: list[float]  # needed experts per token per layer (the hit-rate denominator)

    def hit_rate(self, i: int, slots: int) -> float:
        uses = self.uses_per_token[i]
        return 1.0 - self.curves[i][slots - 1] / uses if uses else 1.0


def cost_curves(routing: Routing, num_experts: int, policy: str = "lru", prefetch: bool = True,
                progress: Callable[[int, int], None] | None = None, model: RoutingModel | None = None,
                prefetch_precision: float = 0.0) -> CostCurves:
    L = len(routing.layers)
    curves = [[0.0] * num_experts for _ in range(L)]
    tokens = sum(routing.rows)
    for s in range(1, num_experts + 1):
        misses = replay_misses(routing, {layer: s for layer in routing.layers}, policy=policy, prefetch=prefetch,
                               model=model, prefetch_precision=prefetch_precision)
        for i in range(L):
            curves[i][s - 1] = misses[i] / tokens
        if progress:
            progress(s, num_experts)
    uses = [sum(len(step[i]) for step in routing.needed) / tokens for i in range(L)]
    return CostCurves(list(routing.layers), curves, uses)
