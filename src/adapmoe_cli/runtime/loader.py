"""Loaders: what `ExpertManager` asks to bring experts in (`ExpertLoader`), and two of them — `Loader`,
the runtime's background I/O worker, and `InstantLoader`, the planner's (every read done at once, nothing
read); the simulator's `SimLoader` (simulate/timing.py) is the third. All order requests with one
`RequestQueue`: demand loads ahead of prefetches ahead of demoted prefetches, FIFO within each class,
one outstanding request per (layer, expert), promotion and cancellation before a read starts.
The worker touches no cache state: it only fills buffers."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapmoe_cli.store.reader import ExpertReader

DEMAND, PREFETCH, BACKGROUND = 0, 1, 2  # BACKGROUND: prefetches that turned out not needed


@dataclass(eq=False)
class LoadRequest:
    layer: int
    expert: int
    buffer: Any
    priority: int
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    nbytes: int = 0
    position: int = 0  # bytes read so far (a paused read resumes here)


class RequestQueue:
    """The loader's queue, without threads or I/O: demand before prefetch before demoted, FIFO within a
    class; one outstanding request per (layer, expert); promotion, demotion and cancellation leave stale
    heap entries that are skipped. `Loader` drives it from its I/O thread, the simulator's loader from a
    simulated clock, so both order reads the same way. Callers hold whatever lock they need."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, LoadRequest]] = []
        self._seq = itertools.count()
        self._inflight: dict[tuple[int, int], LoadRequest] = {}

    def _push(self, req: LoadRequest, priority: int) -> None:
        req.priority = priority
        heapq.heappush(self._heap, (priority, next(self._seq), req))

    def add(self, layer: int, expert: int, buffer: Any, priority: int) -> LoadRequest:
        """Queue a read; an outstanding request for the same expert is returned instead (raised to
        `priority` if that is more urgent and it has not started)."""
        req = self._inflight.get((layer, expert))
        if req is not None:
            if priority < req.priority and not req.started:
                self._push(req, priority)
            return req
        req = LoadRequest(layer, expert, buffer, priority)
        self._inflight[(layer, expert)] = req
        self._push(req, priority)
        return req

    def promote(self, req: LoadRequest) -> None:
        """Make a request a demand load: queued, it moves ahead; being read, it no longer steps aside."""
        if req.cancelled or req.priority == DEMAND:
            return
        if req.started:
            req.priority = DEMAND
        else:
            self._push(req, DEMAND)

    def demote(self, req: LoadRequest) -> None:
        if not req.started and not req.cancelled and req.priority < BACKGROUND:
            self._push(req, BACKGROUND)

    def cancel(self, req: LoadRequest) -> bool:
        """True if the request had not started (it never will); a started one runs to its end without
        stepping aside again (its buffer may already be queued for another read, which must come after
        it). Either way it is forgotten for de-duplication, so a later request for the expert gets a new
        read."""
        self.forget(req)
        if req.done.is_set():
            return False
        started = req.started
        req.cancelled = True
        return not started

    def forget(self, req: LoadRequest) -> None:
        if self._inflight.get((req.layer, req.expert)) is req:
            del self._inflight[(req.layer, req.expert)]

    def peek(self) -> LoadRequest | None:
        """The next request to start, dropping stale entries; None when nothing is queued."""
        while self._heap:
            prio, _, req = self._heap[0]
            if not (req.started or req.cancelled or prio != req.priority):
                return req
            heapq.heappop(self._heap)
        return None

    def pop(self) -> LoadRequest | None:
        """Take the next request and mark it started."""
        req = self.peek()
        if req is not None:
            heapq.heappop(self._heap)
            req.started = True
        return req

    def demand_waiting(self) -> bool:
        """Whether a demand load is queued (a prefetch being read should step aside)."""
        req = self.peek()
        return req is not None and req.priority == DEMAND

    def pause(self, req: LoadRequest) -> None:
        """Put a started read back in the queue at its priority (it resumes at `position`); until it resumes
        it can be promoted, demoted and cancelled like one that never started."""
        req.started = False
        self._push(req, req.priority)


class ExpertLoader(Protocol):
    """What the manager needs of a loader. `wait` returns the seconds the compute thread stalled."""

    def submit(self, layer: int, expert: int, buffer: Any, priority: int) -> LoadRequest: ...

    def promote(self, req: LoadRequest) -> None: ...

    def demote(self, req: LoadRequest) -> None: ...

    def cancel(self, req: LoadRequest) -> bool: ...

    def wait(self, req: LoadRequest) -> float: ...

    def close(self) -> None: ...


#: a prefetch is read in chunks of this size; between chunks a queued demand load goes first
CHUNK_BYTES = 4 << 20


class Loader:
    """The runtime's loader: one worker thread reads queued requests with the store reader. A prefetch is
    read `CHUNK_BYTES` at a time and steps aside for a demand load queued meanwhile (it resumes where it
    stopped), so a mispredicted prefetch no longer holds the disk in front of a needed expert — unless it
    was cancelled while being read: its slot, and so its buffer, may then be queued for another read, so it
    is read to its end first."""

    def __init__(self, reader: ExpertReader):
        self.reader = reader
        self._queue = RequestQueue()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="adapmoe-loader", daemon=True)
        self._thread.start()

    def submit(self, layer: int, expert: int, buffer: Any, priority: int) -> LoadRequest:
        """Queue a read (see `RequestQueue.add`)."""
        with self._cv:
            req = self._queue.add(layer, expert, buffer, priority)
            self._cv.notify()
            return req

    def promote(self, req: LoadRequest) -> None:
        with self._cv:
            self._queue.promote(req)
            self._cv.notify()

    def demote(self, req: LoadRequest) -> None:
        """Send a queued request behind every demand load and fresh prefetch."""
        with self._cv:
            self._queue.demote(req)

    def cancel(self, req: LoadRequest) -> bool:
        """Drop a request: True if its read had not started (nothing is read). A started read runs to the
        end, but is forgotten for de-duplication, so a later request for the expert gets a new read."""
        with self._cv:
            return self._queue.cancel(req)

    def wait(self, req: LoadRequest) -> float:
        """Block until the read is done; return the seconds waited. Re-raises the read's error."""
        if req.done.is_set():
            waited = 0.0
        else:
            t0 = time.perf_counter()
            req.done.wait()
            waited = time.perf_counter() - t0
        if req.error is not None:
            raise req.error
        return waited

    def _run(self) -> None:
        while True:
            with self._cv:
                req = self._queue.pop()
                while req is None and not self._closed:
                    self._cv.wait()
                    req = self._queue.pop()
                if self._closed:
                    return
            try:
                if not self._read(req):
                    continue  # paused for a demand load
            except BaseException as e:  # handed to the waiting compute thread
                req.error = e
            with self._cv:
                self._queue.forget(req)
            req.done.set()

    def _read(self, req: LoadRequest) -> bool:
        """Read the request from where it stands; False when it stepped aside for a demand load (re-queued),
        True when the expert is read and checked."""
        length = self.reader.store.experts[(req.layer, req.expert)].length
        while True:
            stop = length if req.priority == DEMAND else min(length, req.position + CHUNK_BYTES)
            end = self.reader.read_range(req.layer, req.expert, req.buffer, req.position, stop)
            short = end < stop
            req.position = end
            if short or end >= length:
                req.nbytes = self.reader.finish(req.layer, req.expert, req.buffer, end).length
                return True
            with self._cv:
                if req.priority != DEMAND and not req.cancelled and self._queue.demand_waiting():
                    self._queue.pause(req)
                    return False

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        self.reader.close()


class InstantLoader:
    """The planner's loader: every request is complete when submitted and nothing is read (`nbytes` is the
    slot size). With it, `ExpertManager` replays a trace without a store, threads or a clock."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def submit(self, layer: int, expert: int, buffer: Any, priority: int) -> LoadRequest:
        req = LoadRequest(layer, expert, buffer, priority, started=True, nbytes=self.nbytes)
        req.done.set()
        return req

    def promote(self, req: LoadRequest) -> None:
        pass

    def demote(self, req: LoadRequest) -> None:
        pass

    def cancel(self, req: LoadRequest) -> bool:
        return False

    def wait(self, req: LoadRequest) -> float:
        return 0.0

    def close(self) -> None:
        pass
