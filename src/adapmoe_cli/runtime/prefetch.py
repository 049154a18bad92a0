"""Which predicted experts are worth prefetching (`PrefetchAdmission`): a pure object the manager asks
before it starts a read. No tensors, no I/O, no clock.

A prefetch that turns out right hides part of a read; one that turns out wrong costs a whole read of a
link that demand loads need, and evicts an expert that may be needed next. Where a read is long against
the compute it can hide behind (a disk, experts of megabytes: one layer computes in ~2 ms, a 16 MiB read
takes 9–12 ms), only predictions that are almost always right pay; where it is short, most do.

So each prediction the manager could act on (an expert predicted for layer l, at rank r of the gated
prediction, with no slot in layer l) is a *candidate*, and the admission keeps, per (layer, rank), how many
candidates there were and how many the layer's next call needed — every candidate is scored, prefetched
or not, so a rank switched off keeps learning. A candidate is prefetched when that estimate
(`(needed + 1) / (candidates + 2)`, Laplace's rule) reaches `min_precision`. The counts follow from the
routing and the cache's contents alone, never from I/O timing: the planner's replay and the simulator
make the same choices as the runtime. `min_precision` 0 prefetches every prediction (mixtral-offloading's
rule: the `lru+prefetch` baseline)."""

from __future__ import annotations

from collections.abc import Iterable

#: chosen, not fitted: predictions right this often cost nothing measurable on the full-size store, where
#: reading every prediction costs 28 % (docs/bench.md); there no precision makes a prefetch pay either
DEFAULT_MIN_PRECISION = 0.85


class PrefetchAdmission:
    def __init__(self, min_precision: float = DEFAULT_MIN_PRECISION):
        if not 0 <= min_precision <= 1:
            raise ValueError(f"the prefetch precision must be between 0 and 1, got {min_precision}")
        self.min_precision = min_precision
        self._pending: dict[int, list[tuple[int, int]]] = {}  # layer → [(rank, expert)] awaiting its call
        self._seen: dict[tuple[int, int], list[int]] = {}  # (layer, rank) → [candidates, needed]

    def precision(self, layer: int, rank: int) -> float:
        """The estimated share of (layer, rank) candidates the layer's next call needs."""
        n, k = self._seen.get((layer, rank), (0, 0))
        return (k + 1) / (n + 2)

    def choose(self, layer: int, candidates: Iterable[tuple[int, int]]) -> list[int]:
        """Of `candidates` — (rank in the prediction, expert), experts with no slot in `layer` — those to
        prefetch, in rank order. All of them are remembered and scored at the layer's next call."""
        cands = sorted(candidates)
        self._pending[layer] = cands
        if self.min_precision <= 0:
            return [e for _, e in cands]
        return [e for r, e in cands if self.precision(layer, r) >= self.min_precision]

    def outcome(self, layer: int, needed: Iterable[int]) -> None:
        """`layer` is called and needs `needed`: score the candidates predicted for this call."""
        cands = self._pending.pop(layer, None)
        if not cands:
            return
        need = set(needed)
        for r, e in cands:
            seen = self._seen.setdefault((layer, r), [0, 0])
            seen[0] += 1
            seen[1] += e in need

    def table(self) -> dict[str, list[int]]:
        """(layer, rank) → [candidates, needed] so far, for reports."""
        return {f"{layer}:{rank}": list(v) for (layer, rank), v in sorted(self._seen.items())}
