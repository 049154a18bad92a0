"""A fixed pool of preallocated expert slots with per-layer quotas. Maps (layer, expert) → slot, asks
each layer's eviction policy for victims, and never allocates after construction: resident expert
bytes are at most `slots × stride` by construction. A layer's slots lie back to back in one arena, so a
compiled decode step can read them as one tensor per part (`stacked`) and pick an expert by a tensor
index (`place`) once the layer is `settled`, or at the place the manager answers (`position`)
(moe_block.OffloadedExperts._from_slots). Single-threaded:
only the compute thread calls it; the loader only fills buffers it is handed."""

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
        from adapmoe_cli.store.manifest import ALIGNMENT
        from adapmoe_cli.store.reader import aligned_buffer

        if any(q < 1 for q in quotas.values()):
            raise ValueError("every layer needs at least one slot")
        self.quotas = dict(quotas)
        self.stride = stride
        self.experts = experts
        #: a slot's place in its layer's arena: the stride rounded up to the alignment O_DIRECT reads need
        self.slot_bytes = -(-stride // ALIGNMENT) * ALIGNMENT
        self.buffers: list[memoryview | None] = []
        self.views: list[Any] = []
        self._arenas: dict[int, mmap.mmap] = {}  # layer → one mapping holding its slots back to back
        self._layer_slots: dict[int, list[int]] = {}
        for layer, q in self.quotas.items():
            ids = []
            arena = aligned_buffer(q * self.slot_bytes) if stride else None  # stride 0: bookkeeping only
            if arena is not None:
                self._arenas[layer] = arena
            for i in range(q):
                buf = memoryview(arena)[i * self.slot_bytes:(i + 1) * self.slot_bytes] if arena is not None else None
                ids.append(len(self.buffers))
                self.buffers.append(buf)
                self.views.append(make_views(buf) if make_views and buf is not None else None)
            self._layer_slots[layer] = ids
        self._state = [FREE] * len(self.buffers)
        self._slot_of: dict[int, dict[int, int]] = {layer: {} for layer in self.quotas}
        self.policies: dict[int, EvictionPolicy] = {layer: make_policy(policy, layer, routing) for layer in self.quotas}
        # what a compiled decode step reads to compute a layer's experts in its graph (runtime/compiled.py):
        # expert → its slot's place in the layer's arena, and the layers marked settled, every expert read
        # (`settle`) (kept where there are weights and a known number of experts: not in the planner's replay
        # or simulator)
        self._tracked = experts is not None and stride > 0
        self.place: dict[int, Any] = {}
        self._settled: set[int] = set()
        if self._tracked:
            import torch

            self.place = {layer: torch.zeros(experts, dtype=torch.long) for layer in self.quotas}

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

    def position(self, layer: int, expert: int) -> int:
        """Where `expert`'s slot lies in its layer's arena (its index in `stacked`), as `place` says."""
        return self._slot_of[layer][expert] - self._layer_slots[layer][0]

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
        free = None
        if len(mapping) < self.quotas[layer]:  # (else every slot is taken: no need to look for a free one)
            used = set(mapping.values())
            free = next(s for s in self._layer_slots[layer] if s not in used)
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
        if self._tracked:
            self.place[layer][expert] = free - self._layer_slots[layer][0]
            self._changed(layer)
        return free, evicted

    def mark_ready(self, layer: int, expert: int) -> None:
        self._state[self._slot_of[layer][expert]] = READY

    def release(self, layer: int, expert: int) -> None:
        """Give back a slot whose load failed."""
        s = self._slot_of[layer].pop(expert)
        self._state[s] = FREE
        self.policies[layer].remove(expert)
        if self._tracked:
            self._changed(layer)

    def _changed(self, layer: int) -> None:
        """A slot of `layer` changed hands: it is no longer settled."""
        self._settled.discard(layer)

    @property
    def settled_layers(self) -> frozenset[int]:
        return frozenset(self._settled)

    def settle(self, layer: int) -> bool:
        """Mark `layer` settled when every expert of it is read (the engine, once it has read a whole layer
        for its compiled step: `Engine._in_graph`); True when it is. Any slot changing hands unsettles it."""
        if layer in self._settled:
            return True
        if not self._tracked or not self.holds_all(layer):
            return False
        if any(self._state[s] != READY for s in self._slot_of[layer].values()):
            return False
        self._settled.add(layer)
        return True

    def stacked(self, layer: int) -> dict[str, Any] | None:
        """The layer's slots as one tensor per part (`views` of a slot, each [slots, ...] over the arena), or
        None where a slot's views are not plain tensors (quantized parts, no arena)."""
        import torch

        arena, first = self._arenas.get(layer), self.views[self._layer_slots[layer][0]]
        if arena is None or not isinstance(first, dict):
            return None
        out: dict[str, Any] = {}
        for part, tensors in first.items():
            if not isinstance(tensors, dict) or set(tensors) != {""} or not isinstance(tensors[""], torch.Tensor):
                return None
            t = tensors[""]
            base = torch.frombuffer(arena, dtype=t.dtype)
            size = t.element_size()
            if self.slot_bytes % size or (t.data_ptr() - base.data_ptr()) % size:
                return None
            out[part] = {"": base.as_strided((self.quotas[layer], *t.shape), (self.slot_bytes // size, *t.stride()),
                                             (t.data_ptr() - base.data_ptr()) // size)}
        return out

    def touch(self, layer: int, expert: int) -> None:
        self.policies[layer].touch(expert)

    def close(self) -> None:
        self.views.clear()
        for b in self.buffers:
            try:
                if b is not None:
                    b.release()
            except BufferError:
                pass  # a tensor view still exists; the mapping goes with the last reference
        self.buffers.clear()
        for arena in self._arenas.values():
            try:
                arena.close()
            except BufferError:
                pass
        self._arenas.clear()

