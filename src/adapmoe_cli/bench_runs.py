"""How one timed run of the bench is run (`Runner`): in this process (`in_process`), in a worker process
inside a memory cap (`capped_runner`, bench_worker.py + memcap.py), or a peer program on the same model and
prompts (`llamacpp_runner`, peers/llamacpp.py). Each gives an `Outcome`: the timing, or why there is none."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapmoe_cli.runtime.measure import DecodeTiming, Setup, run_setup
from adapmoe_cli.store import Store
from adapmoe_cli.units import format_bytes


def worker_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "adapmoe_cli.bench_worker"]


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


@dataclass
class Outcome:
    """One timed run: its timing, or why there is none (killed by the memory cap, failed), and the peak
    memory of its process group when it ran capped."""

    timing: DecodeTiming | None
    peak_bytes: int | None = None
    failure: str | None = None


Runner = Callable[[Store, Setup, list[list[int]], int], Outcome]
PeerRun = Callable[[list[list[int]], int], Outcome]  # a peer program over the prompts, decoding N tokens


def in_process(store: Store, setup: Setup, prompts: list[list[int]], tokens: int) -> Outcome:
    return Outcome(run_setup(store, setup, prompts, tokens))


def capped_runner(cap: int) -> Runner:
    """Each run in a worker process of its own inside a memory cgroup capped at `cap` bytes, the store's
    pages dropped from the page cache first (a cold start, nothing charged elsewhere). With `--compile`, a
    setup's first run is preceded by one uncapped, untimed, over the first prompt: it compiles the decode step
    and leaves the kernels in inductor's cache on disk, so the capped runs find them there. Compiling a graph
    afresh runs a C++ compiler and takes several hundred MiB for a while (the full-size store's adapmoe at a
    90 % cap: 1,196 MiB at its peak against 868 from the cache); inside the cap it killed a run that fits,
    on a machine whose cache was cold. Like building llama.cpp, compiling is a once-per-machine cost."""
    from adapmoe_cli import bench_worker
    from adapmoe_cli.memcap import run_capped

    compiled: set[str] = set()

    def run(store: Store, setup: Setup, prompts: list[list[int]], tokens: int) -> Outcome:
        if setup.settings.compile:
            first = bench_worker.job(store, setup, prompts[:1], tokens)
            if first not in compiled:
                compiled.add(first)
                compile_outside_cap(first)
        drop_store_pages(store)
        r = run_capped(worker_argv(), cap, input=bench_worker.job(store, setup, prompts, tokens))
        if r.killed_for_memory:
            return Outcome(None, r.peak_bytes, f"killed by the memory cap ({format_bytes(cap)})")
        if r.returncode != 0:
            return Outcome(None, r.peak_bytes, f"failed: {last_line(r.stderr)}")
        return Outcome(bench_worker.timing_from(r.stdout), r.peak_bytes)

    return run


def compile_outside_cap(job: str) -> None:
    """Run a worker's `job` once, uncapped and untimed, for what it leaves behind: its compiled decode step in
    inductor's cache on disk (`capped_runner`, `bench.runtime_baseline`). A failure shows again in the run
    that follows."""
    from adapmoe_cli.memcap import run_capped

    run_capped(worker_argv(), None, input=job)


def drop_store_pages(store: Store) -> None:
    from adapmoe_cli.store.reader import drop_page_cache

    for f in store.path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            try:
                drop_page_cache(f)
            except OSError:
                pass


def llamacpp_runner(store: Store, tokenizer: Any, cap: int | None, width: str,
                    note: Callable[[str], None] | None = None) -> PeerRun:
    """llama.cpp on a GGUF of `store` at `width` (made once), one `llama-completion` process per prompt, each
    from a cold page cache, inside a memory cap of `cap` bytes (None: uncapped, its peak still measured in
    a group of its own when one can be made; with llama.cpp's warmup pass: its ceiling). The prompts are
    our token ids, given as the text that tokenizes to them; a different prompt length, or a run the cap
    kills, is a failure, not a number."""
    import torch

    from adapmoe_cli.memcap import run_capped, why_unavailable
    from adapmoe_cli.peers import llamacpp
    from adapmoe_cli.runtime.stats import Stats
    from adapmoe_cli.store.reader import drop_page_cache

    gguf = llamacpp.gguf_for(store, width, note)
    group = cap if cap is not None else (None if why_unavailable() else ram_bytes())

    def run(prompts: list[list[int]], tokens: int) -> Outcome:
        total, peak = DecodeTiming(stats=Stats()), 0
        for ids in prompts:
            # the KV cache for this prompt only (not the model's whole context); capped, no warmup pass over
            # every expert first (it starts as cold as our runtime does) and no repacking of quantized
            # weights into a copy of its own (the copy is not page cache: under a cap it is killed instead)
            argv = llamacpp.completion_argv(gguf, llamacpp.prompt_text(tokenizer, ids), tokens + 1,
                                            threads=torch.get_num_threads(), context=len(ids) + tokens + 1,
                                            warmup=cap is None, repack=cap is None)
            for attempt in range(3):  # its log thread sometimes loses the timings' lines at exit
                drop_page_cache(gguf)
                r = run_capped(argv, group)
                peak = max(peak, r.peak_bytes or 0)
                if r.killed_for_memory:
                    return Outcome(None, r.peak_bytes, f"killed by the memory cap ({format_bytes(cap or 0)})")
                try:
                    t = llamacpp.parse_timings(r.stdout, r.stderr)
                    break
                except llamacpp.TimingsLost:
                    if attempt == 2:
                        return Outcome(None, peak or None, "llama.cpp lost its timings three times")
                except llamacpp.PeerError as e:
                    return Outcome(None, peak or None, f"failed: {e}")
            if t["prompt_tokens"] != len(ids):
                return Outcome(None, peak or None, f"llama.cpp read the prompt as {t['prompt_tokens']} tokens, "
                                                   f"ours is {len(ids)}: not the same prompt")
            total.add(DecodeTiming(int(t["prompt_tokens"]), float(t["prefill_s"]), int(t["decode_tokens"]),
                                   float(t["decode_s"]), Stats()))
        return Outcome(total, peak or None)

    return run


def ram_bytes() -> int:
    """This machine's memory: the cap of a group that only measures a run's peak."""
    import psutil

    return int(psutil.virtual_memory().total)
