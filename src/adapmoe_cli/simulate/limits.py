"""The limits no policy of the runtime can beat, for the simulator only (they know the future):

- `Belady`: optimal offline eviction for one layer's demand cache: evict the resident expert whose next
  use is farthest away (never one the current call still needs). A pure policy over expert ids like
  those in runtime/policy.py, told the current step by the simulator.
- `oracle_routing`: the routing with a perfect prefetcher: the prediction for layer l+1 is exactly the
  set layer l+1 then needs.
- `io_floor_s`: seconds of transfer per token if only the bytes Belady must read were moved."""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace

from adapmoe_cli.planning.replay import Routing
from adapmoe_cli.runtime.eviction import EvictionPolicy

NEVER = float("inf")


class Belady(EvictionPolicy):
    """Farthest next use first. `future[t]` is the set of experts the layer needs at step t; the
    simulator sets `now` to the first step whose use is still ahead before each call that may evict."""

    name = "belady"

    def __init__(self, future: Sequence[Iterable[int]]):
        self._uses: dict[int, list[int]] = {}
        for t, experts in enumerate(future):
            for e in experts:
                self._uses.setdefault(e, []).append(t)
        self._resident: dict[int, None] = {}  # insertion order breaks ties
        self.now = 0

    def next_use(self, expert: int) -> float:
        uses = self._uses.get(expert, [])
        i = bisect.bisect_left(uses, self.now)
        return uses[i] if i < len(uses) else NEVER

    def insert(self, expert: int) -> None:
        self._resident[expert] = None

    def touch(self, expert: int) -> None:
        pass

    def remove(self, expert: int) -> None:
        self._resident.pop(expert, None)

    def victim(self, keep: Collection[int] = ()) -> int | None:
        cands = [e for e in self._resident if e not in keep]
        if not cands:
            return None
        return max(cands, key=self.next_use)  # max keeps the first (oldest) among equals

    def residents(self) -> Iterable[int]:
        return list(self._resident)


def layer_futures(routing: Routing) -> list[list[tuple[int, ...]]]:
    """[layer index][step] → experts needed: what each layer's Belady policy is told."""
    return [[step[i] for step in routing.needed] for i in range(len(routing.layers))]


def oracle_routing(routing: Routing) -> Routing:
    """Predictions replaced by the truth for every decode step (single-row steps) and layer after the first."""
    predicted = []
    for step, need_row in enumerate(routing.needed):
        decode = routing.rows[step] == 1
        predicted.append([need_row[i] if decode and i > 0 else None for i in range(len(routing.layers))])
    return replace(routing, predicted=predicted)


def io_floor_s(misses: int, tokens: int, slot_bytes: int, link_bandwidth: float) -> float:
    """Transfer seconds per token of the loads a perfect demand cache cannot avoid (no latency, all channels)."""
    return misses * slot_bytes / link_bandwidth / tokens if tokens else 0.0
