"""Eviction policies: pure objects over expert ids of one layer, with no tensors, threads or clocks, so
the runtime's cache, the planner and the trace simulator run the very same code.

A policy is told when an expert becomes resident (`insert`), is used (`touch`) or leaves (`remove`),
and asked which resident expert to give up (`victim`), never one in `keep`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable


class EvictionPolicy:
    name = "base"
    #: False: the layer forgets its experts after each call (no cache across tokens)
    retains = True

    def insert(self, expert: int) -> None:
        raise NotImplementedError

    def touch(self, expert: int) -> None:
        raise NotImplementedError

    def remove(self, expert: int) -> None:
        raise NotImplementedError

    def victim(self, keep: Collection[int] = ()) -> int | None:
        """The resident expert to evict, skipping `keep`; None when every resident one is kept."""
        raise NotImplementedError

    def residents(self) -> Iterable[int]:
        raise NotImplementedError


class LRU(EvictionPolicy):
    """Least recently used first (mixtral-offloading's per-layer policy)."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def insert(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def touch(self, expert: int) -> None:
        if expert in self._order:
            self._order.move_to_end(expert)

    def remove(self, expert: int) -> None:
        self._order.pop(expert, None)

    def victim(self, keep: Collection[int] = ()) -> int | None:
        return next((e for e in self._order if e not in keep), None)

    def residents(self) -> Iterable[int]:
        return list(self._order)


class LFU(EvictionPolicy):
    """Least frequently used first (counts survive eviction, so popular experts win back their slot);
    ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._lru = LRU()

    def insert(self, expert: int) -> None:
        self._lru.insert(expert)

    def touch(self, expert: int) -> None:
        self._count[expert] = self._count.get(expert, 0) + 1
        self._lru.touch(expert)

    def remove(self, expert: int) -> None:
        self._lru.remove(expert)

    def victim(self, keep: Collection[int] = ()) -> int | None:
        order = [e for e in self._lru.residents() if e not in keep]
        if not order:
            return None
        return min(order, key=lambda e: (self._count.get(e, 0), order.index(e)))

    def residents(self) -> Iterable[int]:
        return self._lru.residents()


class NoCache(LRU):
    """Keep nothing between layer calls: every needed expert is loaded on demand (the naive baseline)."""

    name = "none"
    retains = False


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU, "none": NoCache}


def make_policy(name: str) -> EvictionPolicy:
    from adapmoe_cli.errors import UsageError

    try:
        return POLICIES[name]()
    except KeyError:
        raise UsageError(f"unknown eviction policy {name!r}: choose one of {', '.join(POLICIES)}") from None
