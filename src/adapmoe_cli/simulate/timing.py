"""The timing model: a simulated loader with the runtime loader's interface (`submit`, `promote`,
`demote`, `cancel`, `wait`, `close`) on a simulated clock, and the compute times of one token.

Link: each transfer costs `latency + bytes / (bandwidth / channels)` on one of `channels` channels;
queued requests start in priority order (demand, prefetch, demoted), FIFO within a class, as soon as a
channel is free (an idle channel first pays `link_wakeup`); a started transfer is never preempted.
Compute advances the same clock (dense part of a layer, then each needed expert as it becomes
resident), so loads overlap compute and `wait` returns the simulated seconds the compute stalled.
Decode is memory bound: a part's compute time is its bytes over the effective memory bandwidth plus a
per-call overhead. Where one CPU both computes and drives the reads, loading also costs the compute:
`load_overhead` per load waited on (the link pauses meanwhile) and `interference` per transfer that
finishes while the compute runs. Derivation and sources in docs/simulate.md."""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Any

from adapmoe_cli.runtime.loader import LoadRequest, RequestQueue
from adapmoe_cli.simulate.hardware import Hardware
from adapmoe_cli.simulate.model_spec import ModelSpec


@dataclass(frozen=True)
class ComputeTimes:
    """Seconds of compute per decode token: each layer's dense part, each expert call, the output head,
    and (when prefetching) each layer's prediction of the next layer's experts."""

    dense_layer_s: float
    expert_s: float
    head_s: float
    predict_s: float = 0.0

    @staticmethod
    def of(hw: Hardware, model: ModelSpec) -> ComputeTimes:
        bw = hw.memory_bandwidth
        return ComputeTimes(dense_layer_s=model.dense_bytes_per_layer / bw + hw.layer_overhead_s,
                            expert_s=model.slot_bytes / bw + hw.expert_overhead_s,
                            head_s=model.head_bytes / bw, predict_s=hw.predict_overhead_s)

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
        self.load_overhead = hw.load_overhead_s
        self.interference = hw.interference_s
        self.wakeup, self.idle = hw.link_wakeup_s, hw.link_idle_s
        self._used: weakref.WeakSet[LoadRequest] = weakref.WeakSet()  # loads the compute has waited on
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
        free = self._free_at
        c = min(range(len(free)), key=free.__getitem__)
        start = max(free[c], self._queued_since)
        if start > limit:
            return None
        self._queue.pop()
        end = start + self.duration
        if self.wakeup and start - free[c] >= self.idle:
            end += self.wakeup  # the channel sat idle: its reader has to wake up first
        free[c] = end
        self._finish[id(req)] = end
        heapq.heappush(self._running, (end, next(self._seq), req))
        self.transfers += 1
        return req

    def _complete(self, upto: float) -> int:
        """Finish the transfers that end by `upto`; how many."""
        n = 0
        while self._running and self._running[0][0] <= upto:
            _, _, req = heapq.heappop(self._running)
            req.nbytes = self.nbytes
            self._queue.forget(req)
            req.done.set()
            n += 1
        return n

    def sync(self) -> int:
        """Run the link up to the compute clock; later queue changes happen at `clock.now`. Returns the
        transfers that finished. (Called at every step of the replay: where nothing queued can start and
        nothing ends by now, it only moves `_queued_since`.)"""
        now = self.clock.now
        if self._queue.peek() is not None and max(min(self._free_at), self._queued_since) <= now:
            while self._start_next(now) is not None:  # (the first can start: a channel is free by now)
                pass
        done = self._complete(now) if self._running and self._running[0][0] <= now else 0
        if now > self._queued_since:
            self._queued_since = now
        return done

    def compute(self, seconds: float) -> None:
        """The compute thread works for `seconds` while the link keeps transferring; each transfer that
        finishes meanwhile takes `interference` more compute time."""
        self.clock.now += seconds
        done = self.sync()
        while done and self.interference:
            self.clock.now += done * self.interference
            done = self.sync()

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
        the simulated seconds the compute stalled. The first wait on a load then costs the compute
        `load_overhead` more (bookkeeping, wake-up, the first touch of the loaded bytes), not a stall,
        during which the link pauses."""
        self.sync()
        while not req.started:
            if self._start_next(math.inf) is None:
                raise AssertionError("waiting on a request that is not queued")
        end = self._finish[id(req)]
        waited = max(0.0, end - self.clock.now)
        self.clock.now += waited
        self.sync()  # what finished during the stall is done before any pause
        if req not in self._used:
            self._used.add(req)
            self._pause(self.load_overhead)
            self.sync()
        return waited

    def _pause(self, seconds: float) -> None:
        """The compute thread works `seconds` on a load's behalf and the link makes no progress meanwhile
        (measured on this machine: the second of two demand loads waits a whole transfer after the first)."""
        if seconds <= 0:
            return
        now = self.clock.now
        self._running = [(end + seconds, seq, req) for end, seq, req in self._running]  # order kept: still a heap
        for end, _, req in self._running:
            self._finish[id(req)] = end
        self._free_at = [f + seconds if f > now else f for f in self._free_at]
        self._queued_since = max(self._queued_since, now + seconds)
        self.clock.now = now + seconds

    def flush(self) -> None:
        """Finish every transfer (so that nothing is left pending when the manager closes)."""
        while self._start_next(math.inf) is not None:
            pass
        self._complete(math.inf)

    def close(self) -> None:
        self.flush()
