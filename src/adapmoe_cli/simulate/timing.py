"""The timing model: a simulated loader with the runtime loader's interface (`submit`, `promote`,
`demote`, `cancel`, `wait`, `close`) on a simulated clock, and the compute times of one token.

Link: each transfer costs `latency + bytes / (bandwidth / channels)` on one of `channels` channels;
queued requests start in priority order (demand, prefetch, demoted), FIFO within a class, as soon as a
channel is free; a started transfer is never preempted. Compute advances the same clock (dense part of
a layer, then each needed expert as it becomes resident), so loads overlap compute and `wait` returns
the simulated seconds the compute stalled. Decode is memory bound: a part's compute time is its bytes
over the effective memory bandwidth plus a per-call overhead. Derivation and sources in docs/simulate.md."""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Any

from adapmoe_cli.runtime.loader import LoadRequest, RequestQueue
from adapmoe_cli.simulate.hardware import Hardware
from adapmoe_cli.simulate.models import ModelSpec


@dataclass(frozen=True)
class ComputeTimes:
    """Seconds of compute per decode token: each layer's dense part, each expert call, the output head."""

    dense_layer_s: float
    expert_s: float
    head_s: float

    @staticmethod
    def of(hw: Hardware, model: ModelSpec) -> ComputeTimes:
        bw = hw.memory_bandwidth
        return ComputeTimes(dense_layer_s=model.dense_bytes_per_layer / bw + hw.layer_overhead_s,
                            expert_s=model.expert_bytes / bw + hw.expert_overhead_s,
                            head_s=model.head_bytes / bw)

    def token_s(self, layers: int, experts_per_token: float) -> float:
        """A token with every expert resident (the compute floor)."""
        return self.head_s + layers * (self.dense_layer_s + experts_per_token * self.expert_s)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0


class SimLoader:
    """Drop-in for `runtime.loader.Loader` whose reads take simulated time. Single-threaded: the state
    of the link is brought up to `clock.now` lazily, at each call and at `sync()`."""

    def __init__(self, hw: Hardware, nbytes: int, clock: Clock):
        self.clock = clock
        self.nbytes = nbytes
        self.duration = hw.transfer_s(nbytes)
        self._free_at = [0.0] * hw.channels
        self._queue = RequestQueue()
        self._seq = itertools.count()
        self._finish: dict[int, float] = {}  # id(request) → finish time, for started requests
        self._running: list[tuple[float, int, LoadRequest]] = []  # started, not yet done (heap by finish)
        self._queued_since = 0.0  # the queue's content is what it is since this time
        self.transfers = 0  # transfers started

    # -- the link ----------------------------------------------------------------------------------
    def _start_next(self, limit: float) -> LoadRequest | None:
        """Start the queue's first request if a channel frees up by `limit`; None otherwise."""
        req = self._queue.peek()
        if req is None:
            return None
        c = min(range(len(self._free_at)), key=self._free_at.__getitem__)
        start = max(self._free_at[c], self._queued_since)
        if start > limit:
            return None
        self._queue.pop()
        end = start + self.duration
        self._free_at[c] = end
        self._finish[id(req)] = end
        heapq.heappush(self._running, (end, next(self._seq), req))
        self.transfers += 1
        return req

    def _complete(self, upto: float) -> None:
        while self._running and self._running[0][0] <= upto:
            _, _, req = heapq.heappop(self._running)
            req.nbytes = self.nbytes
            self._queue.forget(req)
            req.done.set()

    def sync(self) -> None:
        """Run the link up to the compute clock; later queue changes happen at `clock.now`."""
        now = self.clock.now
        while self._start_next(now) is not None:
            pass
        self._complete(now)
        self._queued_since = max(self._queued_since, now)

    def compute(self, seconds: float) -> None:
        """The compute thread works for `seconds` while the link keeps transferring."""
        self.clock.now += seconds
        self.sync()

    # -- the loader interface ----------------------------------------------------------------------
    def submit(self, layer: int, expert: int, buffer: Any, priority: int) -> LoadRequest:
        self.sync()
        req = self._queue.add(layer, expert, buffer, priority)
        self.sync()
        return req

    def promote(self, req: LoadRequest) -> None:
        self.sync()
        self._queue.promote(req)
        self.sync()

    def demote(self, req: LoadRequest) -> None:
        self.sync()
        self._queue.demote(req)

    def cancel(self, req: LoadRequest) -> bool:
        self.sync()
        return self._queue.cancel(req)

    def wait(self, req: LoadRequest) -> float:
        """Advance the clock to the end of `req`'s transfer (starting it when channels free up); return
        the simulated seconds the compute stalled."""
        self.sync()
        while not req.started:
            if self._start_next(math.inf) is None:
                raise AssertionError("waiting on a request that is not queued")
        end = self._finish[id(req)]
        waited = max(0.0, end - self.clock.now)
        self.clock.now += waited
        self.sync()
        return waited

    def flush(self) -> None:
        """Finish every transfer (so that nothing is left pending when the manager closes)."""
        while self._start_next(math.inf) is not None:
            pass
        self._complete(math.inf)

    def close(self) -> None:
        self.flush()
