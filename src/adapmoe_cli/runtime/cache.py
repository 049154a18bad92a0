"""A fixed pool of preallocated expert slots with per-layer quotas. Maps (layer, expert) → slot, asks
each layer's eviction policy for victims, and never allocates after construction: resident expert
bytes are at most `slots × stride` by construction. Single-threaded: only the compute thread calls it;
the loader only fills buffers it is handed."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Collection, Mapping
from typing import Any

from adapmoe_cli.runtime.eviction import EvictionPolicy, RoutingModel, make_policy

FREE, LOADING, READY = 0, 1, 2


class ExpertCache:
    def __init__(
        self,
        quotas: Mapping[int, int],
        stride: int,
        policy: str = "lru",
        make_views: Callable[[mmap.mmap], Any] | None = None,
        routing: RoutingModel | None = None,
        experts: int | None = None,
    ):
        """`policy`: an eviction policy's name (runtime/eviction.py), one per layer; `routing`: what the
        policies that predict (`markov`, `learned`) predict from; `experts`: how many a layer has (for
        `holds_all`)."""
        from adapmoe_cli.store.reader import aligned_buffer

        if any(q < 1 for q in quotas.values()):
            raise ValueError("every layer needs at least one slot")
        self.quotas = dict(quotas)
        self.stride = stride
        self.experts = experts
        self.buffers: list[mmap.mmap | None] = []
        self.views: list[Any] = []
        self._layer_slots: dict[int, list[int]] = {}
        for layer, q in self.quotas.items():
            ids = []
            for _ in range(q):
                buf = aligned_buffer(stride) if stride else None  # stride 0: bookkeeping only (simulator)
                ids.append(len(self.buffers))
                self.buffers.append(buf)
                self.views.append(make_views(buf) if make_views and buf is not None else None)
            self._layer_slots[layer] = ids
        self._state = [FREE] * len(self.buffers)
        self._slot_of: dict[int, dict[int, int]] = {layer: {} for layer in self.quotas}
        self.policies: dict[int, EvictionPolicy] = {layer: make_policy(policy, layer, routing) for layer in self.quotas}

    @property
    def num_slots(self) -> int:
        return len(self.buffers)

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.stride

    def holds_all(self, layer: int) -> bool:
        """Every expert of `layer` has a slot (ready or loading): a prefetch for it would do nothing."""
        return self.experts is not None and len(self._slot_of[layer]) >= self.experts

    def slot(self, layer: int, expert: int) -> int | None:
        return self._slot_of[layer].get(expert)

    def is_ready(self, layer: int, expert: int) -> bool:
        s = self._slot_of[layer].get(expert)
        return s is not None and self._state[s] == READY

    def is_loading(self, layer: int, expert: int) -> bool:
        s = self._slot_of[layer].get(expert)
        return s is not None and self._state[s] == LOADING

    def resident(self, layer: int) -> list[int]:
        return [e for e, s in self._slot_of[layer].items() if self._state[s] == READY]

    def reserve(self, layer: int, expert: int, keep: Collection[int] = ()) -> tuple[int, int | None] | None:
        """A slot for `expert`, marked LOADING: a free one, else the policy's victim among the layer's
        experts not in `keep` (loading or not: the cache's contents never depend on I/O timing).
        Returns (slot, evicted expert or None), or None when every expert of the layer is kept."""
        assert expert not in self._slot_of[layer], "expert already has a slot"
        mapping = self._slot_of[layer]
        used = set(mapping.values())
        free = next((s for s in self._layer_slots[layer] if s not in used), None)
        evicted = None
        if free is None:
            evicted = self.policies[layer].victim(set(keep))
            if evicted is None:
                return None
            free = mapping.pop(evicted)
            self.policies[layer].remove(evicted)
        mapping[expert] = free
        self._state[free] = LOADING
        self.policies[layer].insert(expert)
        return free, evicted

    def mark_ready(self, layer: int, expert: int) -> None:
        self._state[self._slot_of[layer][expert]] = READY

    def release(self, layer: int, expert: int) -> None:
        """Give back a slot whose load failed."""
        s = self._slot_of[layer].pop(expert)
        self._state[s] = FREE
        self.policies[layer].remove(expert)

    def touch(self, layer: int, expert: int) -> None:
        self.policies[layer].touch(expert)

    def close(self) -> None:
        self.views.clear()
        for b in self.buffers:
            try:
                if b is not None:
                    b.close()
            except BufferError:
                pass  # a tensor view still exists; the mapping goes with the last reference
        self.buffers.clear()

