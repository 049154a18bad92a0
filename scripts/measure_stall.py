"""What the stall of a compiled decode step with part of the experts cached is made of
(docs/performance.md, "The stall at half the experts").

    python scripts/measure_stall.py [--budget 50%] [--no-prefetch] [--rounds 6] [--tokens 48]

The embedded model, compiled, the store's plan and adapmoe's gate. Each of the engine's reads is stamped
when the manager submits it, when the loader starts it and when it ends, and each wait of the compute
thread when it begins and ends (the engine's own loader and reader, wrapped; nothing else changes). Then:
- reads and waits a decoded token; a read's time in the queue, its own time, and how long after its end
  the waiting compute thread went on (medians and 90th percentiles, µs);
- the same experts read alone in a loop, whole and in 2, 4 and 8 concurrent pieces (O_DIRECT, as the
  loader reads them): what the disk gives without the decode step around it;
- the expert kernel's calls (the experts the manager computes, runtime/expert_kernel.py) timed apart by
  whether the loader was reading at that moment: a read competes with the kernel's two threads for the
  two cores (from tmpfs, a read is the kernel copying the bytes; from a disk, mostly DMA);
- Belady's rule (evict the expert needed furthest ahead: no online policy misses less) and LRU replayed
  over the same layer calls at the plan's quotas, against the needed experts the runtime had to read.
Run on a quiet machine."""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_decode import decode  # noqa: E402

from adapmoe_cli.budget import BudgetRequest  # noqa: E402
from adapmoe_cli.model_arg import open_model  # noqa: E402
from adapmoe_cli.planning.resolve import open_engine  # noqa: E402
from adapmoe_cli.runtime.generate import compile_decode  # noqa: E402
from adapmoe_cli.settings import load_settings  # noqa: E402

#: how many reads the loader is in the middle of (`stamp`), for `time_kernel`
READING = [0]


def stamp(loader) -> tuple[list, list]:
    """Wrap the engine's loader: (finished reads, waits) lists filled as the engine runs."""
    reads, waits = [], []
    submit, read, wait = loader.submit, loader._read, loader.wait

    def submit_(layer, expert, buffer, priority):
        req = submit(layer, expert, buffer, priority)
        req.__dict__.setdefault("t_submit", time.perf_counter())
        return req

    def read_(req):
        req.__dict__.setdefault("t_start", time.perf_counter())
        READING[0] += 1
        try:
            done = read(req)
        finally:
            READING[0] -= 1
        if done:
            req.t_end = time.perf_counter()
            reads.append(req)
        return done

    def wait_(req):
        t = time.perf_counter()
        waited = wait(req)
        if waited > 0:
            waits.append((req, t, time.perf_counter()))
        return waited

    loader.submit, loader._read, loader.wait = submit_, read_, wait_
    return reads, waits


def time_kernel(engine) -> dict[bool, list[float]]:
    """Wrap the engine's expert kernel (built by now): µs of each call, by whether a read was going on."""
    from adapmoe_cli.runtime.moe_block import _MODULES

    kernel = next(m.kernel for m in list(_MODULES.values()) if m.manager is engine.manager and m.kernel)
    run, out = kernel._run, {False: [], True: []}

    def run_(inputs):
        busy = READING[0] > 0
        t = time.perf_counter()
        got = run(inputs)
        out[busy or READING[0] > 0].append((time.perf_counter() - t) * 1e6)
        return got

    kernel._run = run_
    return out


def spread(values: list[float]) -> str:
    v = sorted(values)
    return f"median {statistics.median(v):.0f}, p90 {v[9 * len(v) // 10]:.0f}" if v else "none"


def reads_alone(store, n: int = 40) -> dict[int, float]:
    """Median µs to read one expert with O_DIRECT, whole (1) or in concurrent pieces."""
    entries = list(store.experts.values())
    length = entries[0].length
    buf = mmap.mmap(-1, length)
    view = memoryview(buf)
    fds = {e.file: os.open(store.file_path(e.file), os.O_RDONLY | os.O_DIRECT) for e in entries}
    rng = random.Random(0)
    out: dict[int, list[float]] = {1: [], 2: [], 4: [], 8: []}
    with ThreadPoolExecutor(8) as pool:
        for _ in range(n):
            for pieces in out:
                e = rng.choice(entries)
                step = length // pieces
                t = time.perf_counter()
                if pieces == 1:
                    os.preadv(fds[e.file], [view], e.offset)
                else:
                    list(pool.map(lambda i, e=e, step=step: os.preadv(
                        fds[e.file], [view[i * step:(i + 1) * step]], e.offset + i * step), range(pieces)))
                out[pieces].append((time.perf_counter() - t) * 1e6)
    for fd in fds.values():
        os.close(fd)
    view.release()
    buf.close()
    return {p: statistics.median(v) for p, v in out.items()}


def replay(calls: list[tuple[int, ...]], slots: int, belady: bool, held: list[int]) -> int:
    """Misses of one layer's calls with `slots` slots, starting with the experts `held`: Belady's rule or
    LRU; a call's own experts are never evicted for each other (a call needing more than the slots evicts
    the furthest/oldest anyway)."""
    cache: OrderedDict[int, None] = OrderedDict.fromkeys(held)
    misses = 0
    for i, need in enumerate(calls):
        for e in need:
            if e in cache:
                cache.move_to_end(e)
                continue
            misses += 1
            if len(cache) >= slots:
                free = [x for x in cache if x not in need] or list(cache)
                if belady:
                    ahead = calls[i + 1:]
                    victim = max(free, key=lambda x: next((j for j, c in enumerate(ahead) if x in c), len(ahead)))
                else:
                    victim = free[0]
                del cache[victim]
            cache[e] = None
    return misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = load_settings(overrides={"cache.budget": BudgetRequest.parse(args.budget, "--budget"),
                                        "compile": True, "prefetch": not args.no_prefetch})
    with open_engine(open_model(None), settings) as engine:
        compile_decode(engine)
        decode(engine, 32)
        reads, waits = stamp(engine.manager.loader)
        kernel = time_kernel(engine)
        before, seconds = engine.stats.copy(), 0.0
        for _ in range(args.rounds):
            seconds += decode(engine, args.tokens)
        n = args.rounds * args.tokens
        st = engine.stats.delta(before)
        print(f"budget {args.budget}, prefetch {'off' if args.no_prefetch else 'on'}: step {seconds / n * 1e3:.2f} ms, "
              f"stall {st.stall_s / n * 1e3:.2f} ms a token (prompts' reads included below)")
        print(f"reads a token {len(reads) / n:.2f}, waits a token {len(waits) / n:.2f}")
        print(f"µs in the queue: {spread([(r.t_start - r.t_submit) * 1e6 for r in reads])}; "
              f"reading: {spread([(r.t_end - r.t_start) * 1e6 for r in reads])}; "
              f"waited: {spread([(b - a) * 1e6 for _, a, b in waits])}; "
              "went on after the read's end: "
              f"{spread([(b - r.t_end) * 1e6 for r, _, b in waits if hasattr(r, 't_end')])}")
        print("expert kernel, µs a call: " + "; ".join(
            f"{'a read going on' if busy else 'no read'} {spread(v)} ({len(v) / n:.2f} calls a token)"
            for busy, v in kernel.items()))
        alone = reads_alone(engine.store)
        print("one expert read alone, µs (median of 40): " + ", ".join(
            f"{'whole' if p == 1 else f'{p} pieces at once'} {v:.0f}" for p, v in alone.items()))
        calls: list[tuple[int, tuple[int, ...]]] = []
        engine.manager.on_layer.append(lambda layer, needed: calls.append((layer, tuple(needed))))
        engine.manager.drain()
        quotas = engine.budget.quotas
        held = {q: engine.cache.resident(q) for q in quotas}
        before = engine.stats.copy()
        for _ in range(args.rounds):
            decode(engine, args.tokens)
        st = engine.stats.delta(before)
        per_layer = {q: [c for layer, c in calls if layer == q] for q in quotas}
        best = sum(replay(c, quotas[q], True, held[q]) for q, c in per_layer.items())
        lru = sum(replay(c, quotas[q], False, held[q]) for q, c in per_layer.items())
        print(f"needed experts read, same calls (prompts included): runtime {st.misses + st.prefetch_hits} "
              f"({st.misses} misses + {st.prefetch_hits} prefetch hits; {st.loads} reads), "
              f"Belady {best}, LRU {lru}")


if __name__ == "__main__":
    main()
