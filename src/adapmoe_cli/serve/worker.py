"""The runtime's side of `serve`: requests wait in a bounded queue and run one at a time on the thread that
calls `run` (the one that built the engine: on CPU, torch run from a second thread decoded ~3 × slower here,
60 against 200 tok/s on the embedded model); each one's tokens are handed to the event loop that asked for
them. A request cancelled while it waits never starts; one cancelled while it runs stops after its current
token, so the next one starts at once."""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.generate import PrefixKV, eos_ids
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.serve import jobs
from adapmoe_cli.serve.jobs import Finished, JobSpec


class Busy(Exception):
    """The queue is full; `retry_after` is a guess in seconds at when a place frees up."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are already waiting; try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass
class Ticket:
    """A request's place in the queue and the events (`TokenEvent`s, then a `Finished` or a `Failed`) its
    handler reads on the event loop."""

    spec: JobSpec
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None

    def cancel(self) -> None:
        self.stop.set()

    def post(self, event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Counters:
    """What the server did, for /metrics (cumulative since start)."""

    requests: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0  # turned away with 429
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_tokens: int = 0
    busy_s: float = 0.0


class Worker:
    def __init__(self, engine: Engine, tokenizer: Any, max_waiting: int = 16, reuse_prefix: bool = True) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.max_waiting, self.reuse_prefix = max_waiting, reuse_prefix
        self.eos = eos_ids(engine, tokenizer)
        self.counters = Counters()
        self._prefix = PrefixKV(engine)
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = False

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> bool:
        return self._running

    def submit(self, spec: JobSpec) -> Ticket:
        """Queue a request (call on the event loop); raises `Busy` when `max_waiting` already wait."""
        with self._lock:
            if self._waiting >= self.max_waiting:
                c = self.counters
                c.rejected += 1
                per_request = c.busy_s / c.requests if c.requests else 1.0
                raise Busy(self._waiting, max(1, math.ceil(per_request * (self._waiting + 1))))
            self._waiting += 1
        ticket = Ticket(spec, asyncio.get_running_loop())
        self._queue.put(ticket)
        return ticket

    def close(self) -> None:
        """`run` returns after the requests already queued (the server drains before it calls this)."""
        self._queue.put(None)

    def run(self) -> None:
        """Run requests as they come until `close`."""
        while (ticket := self._queue.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self._running = True
            try:
                self._run(ticket)
            finally:
                self._running = False

    def _run(self, ticket: Ticket) -> None:
        ticket.started_at = time.perf_counter()
        if ticket.stop.is_set():
            self.counters.cancelled += 1
            ticket.post(Finished("cancelled", "", len(ticket.spec.prompt), 0, 0, Stats(), 0.0, 0.0))
            return
        try:
            done = jobs.run(self.engine, self.tokenizer, self._prefix, ticket.spec, self.eos, ticket.post,
                            ticket.stop.is_set, reuse=self.reuse_prefix)
        except Exception as e:  # noqa: BLE001 - a request's failure is its answer, never the server's end
            self.counters.failed += 1
            self._prefix.reset()
            ticket.post(Failed(f"{type(e).__name__}: {e}"))
            return
        finally:
            self.counters.busy_s += time.perf_counter() - ticket.started_at
        c = self.counters
        c.requests += 1
        c.cancelled += done.reason == "cancelled"
        c.prompt_tokens += done.prompt_tokens
        c.completion_tokens += done.completion_tokens
        c.reused_tokens += done.reused_tokens
        ticket.post(done)
