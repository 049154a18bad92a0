"""Counters of the offloading runtime. Counted where they happen (cache, loader, MoE block), carried as
plain numbers; nothing here estimates. `Stats.delta` gives the numbers of one token or one turn."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Stats:
    tokens: int = 0  # tokens that went through the model (prompt and generated)
    layer_tokens: int = 0  # tokens × MoE layers: the denominator of experts_per_token
    expert_activations: int = 0  # (token, layer, expert) triples computed
    expert_uses: int = 0  # (forward, layer, expert) needs: hits + prefetch_hits + misses
    hits: int = 0  # needed and already resident before this forward's prefetches
    prefetch_hits: int = 0  # needed and brought in (or in flight) by a prefetch
    misses: int = 0  # needed and loaded on demand
    fallbacks: int = 0  # misses computed with the resident low-bit copy while the full one loads
    prefetches_issued: int = 0
    wasted_prefetches: int = 0  # prefetched for a layer that then did not need it (it stays cached)
    prefetches_dropped: int = 0  # queued reads cancelled before they started (their expert was evicted; with
    #                              the miss fallback, demand reads nobody waits for too)
    loads: int = 0  # reads completed by the loader
    bytes_read: int = 0
    stall_s: float = 0.0  # time the compute thread waited for loads

    def copy(self) -> Stats:
        return Stats(**asdict(self))

    def restore(self, saved: Stats) -> None:
        """Put back the numbers of `saved` (a copy taken earlier) in place: the manager holds this object."""
        for f in fields(self):
            setattr(self, f.name, getattr(saved, f.name))

    def add(self, other: Stats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def delta(self, before: Stats) -> Stats:
        return Stats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    @property
    def experts_per_token(self) -> float:
        return self.expert_activations / self.layer_tokens if self.layer_tokens else 0.0

    @property
    def hit_rate(self) -> float:
        """Share of needed experts that did not wait for a demand load (hits and prefetch hits)."""
        return (self.hits + self.prefetch_hits) / self.expert_uses if self.expert_uses else 0.0

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = dict(asdict(self))
        d["experts_per_token"] = self.experts_per_token
        d["hit_rate"] = self.hit_rate
        return d
