"""Cache slots per layer by exact dynamic programming: given per-layer cost curves cost_l(s) for
s = 1 … E slots, choose s_l with Σ s_l = budget minimising Σ cost_l(s_l). The cost separates by layer,
so the DP over (layers, slots used) is exact: O(L · budget · E). Derivation in docs/plan.md."""

from __future__ import annotations

import math
from collections.abc import Sequence


def allocate(curves: Sequence[Sequence[float]], budget: int) -> list[int]:
    """curves[l][s-1] = cost of layer l with s slots. Returns slots per layer (each ≥ 1)."""
    L = len(curves)
    if L == 0:
        return []
    max_per = [len(c) for c in curves]
    if budget < L or budget > sum(max_per):
        raise ValueError(f"budget {budget} outside [{L}, {sum(max_per)}]")
    inf = math.inf
    # best[b] = minimal cost of the layers so far using exactly b slots; choice[l][b] = slots of layer l
    best = [0.0] + [inf] * budget
    choice: list[list[int]] = []
    for l_idx in range(L):
        new = [inf] * (budget + 1)
        pick = [0] * (budget + 1)
        for b in range(budget + 1):
            if best[b] == inf:
                continue
            for s in range(1, max_per[l_idx] + 1):
                nb = b + s
                if nb > budget:
                    break
                v = best[b] + curves[l_idx][s - 1]
                if v < new[nb] - 1e-15:
                    new[nb], pick[nb] = v, s
        best = new
        choice.append(pick)
    slots, b = [0] * L, budget
    for l_idx in range(L - 1, -1, -1):
        s = choice[l_idx][b]
        slots[l_idx], b = s, b - s
    return slots


def total_cost(curves: Sequence[Sequence[float]], slots: Sequence[int]) -> float:
    return sum(c[s - 1] for c, s in zip(curves, slots, strict=True))
