"""`calibrate()`: measures this machine for the simulator and writes `this-machine` under ADAPMOE_HOME:
disk bandwidth with O_DIRECT (`store.reader.read_bandwidth`), the latency of one expert read, the
memory bandwidth a matrix-vector product reaches, and, by timing the real engine on the given store,
the compute time of one expert and of one layer's dense part per decode token. The per-call overheads
are what the measured times hold beyond their bytes over the memory bandwidth."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from adapmoe_cli.settings import Settings
from adapmoe_cli.simulate.hardware import THIS_MACHINE, Hardware, write_calibrated
from adapmoe_cli.simulate.models import from_store
from adapmoe_cli.store import Store

Progress = Callable[[str], None]


def _best(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` runs (seconds): the least disturbed by other processes."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_latency(store: Store, bandwidth: float, reads: int = 32) -> float:
    """Mean time of single-expert O_DIRECT reads beyond their bytes over the sequential bandwidth."""
    from adapmoe_cli.store.reader import ExpertReader, aligned_buffer

    keys = sorted(store.experts)
    keys = [keys[(i * 7919) % len(keys)] for i in range(min(reads, len(keys)))]  # spread over the files
    buf = aligned_buffer(store.expert_stride)
    try:
        with ExpertReader(store) as reader:
            t0 = time.perf_counter()
            for layer, expert in keys:
                reader.read_into(layer, expert, buf)
            per_read = (time.perf_counter() - t0) / len(keys)
    finally:
        buf.close()
    return max(0.0, per_read - store.expert_stride / bandwidth)


def memory_bandwidth(dtype: torch.dtype, nbytes: int = 128 << 20) -> float:
    """Bytes/s a matrix-vector product streams a matrix larger than the caches at (decode's access pattern)."""
    cols = 4096
    rows = max(1, nbytes // (cols * torch.tensor([], dtype=dtype).element_size()))
    w = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    F.linear(x, w)  # warm-up
    return w.numel() * w.element_size() / _best(lambda: F.linear(x, w), 5)


def _decode_token_s(store: Store, settings: Settings, tokens: int) -> float | None:
    """Median seconds per decode token of the real engine with every expert resident; None when they do not fit."""
    import psutil

    from adapmoe_cli.runtime.cache import even_quotas
    from adapmoe_cli.runtime.engine import Budget, Engine
    from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
    from adapmoe_cli.settings import GenerationSettings

    shape = store.shape
    if len(store.experts) * store.expert_stride + store.dense_bytes > 0.5 * psutil.virtual_memory().available:
        return None
    full = Budget(even_quotas(shape.moe_layers, len(store.experts), shape.num_experts), "all experts")
    gen = GenerationSettings(max_new_tokens=tokens + 2, temperature=0.0, repetition_penalty=1.0)
    with Engine(store, settings, budget=full, verify=False) as eng:
        for layer in shape.moe_layers:
            eng.manager.preload(layer, range(shape.num_experts))
        times: list[float] = []
        t0 = time.perf_counter()
        for n, _ in enumerate(generate_step(eng, [1, 2, 3, 4], new_kv_cache(eng), gen)):
            t1 = time.perf_counter()
            if n >= 2:  # after the prefill and one warm-up token
                times.append(t1 - t0)
            if len(times) == tokens:
                return statistics.median(times)  # robust to other processes' spikes
            t0 = t1
    return None


def expert_compute_s(store: Store) -> float:
    """One expert on one token, computed as the MoE block computes it, from real weights in an aligned slot."""
    from adapmoe_cli.store.reader import ExpertReader, aligned_buffer, expert_views

    entry = next(iter(store.experts.values()))
    buf = aligned_buffer(store.expert_stride)
    with ExpertReader(store) as reader:
        reader.read_into(entry.layer, entry.expert, buf)
    w = expert_views(buf, entry)
    x = torch.randn(1, store.shape.hidden_size).to(w["w1"].dtype)

    def run() -> None:
        h = F.silu(F.linear(x, w["w1"])) * F.linear(x, w["w3"])
        F.linear(h, w["w2"])

    run()
    return _best(run, 20)


def calibrate(store: Store, settings: Settings, max_read_bytes: int = 256 << 20, tokens: int = 96,
              progress: Progress | None = None) -> tuple[Hardware, str]:
    """Measure, write `this-machine`, return it and the path written."""
    from adapmoe_cli.store.reader import read_bandwidth

    say = progress or (lambda _msg: None)
    say("disk bandwidth (O_DIRECT)")
    disk, direct = read_bandwidth(store, max_bytes=max_read_bytes)
    say("read latency")
    latency = read_latency(store, disk)
    say("memory bandwidth")
    mem = memory_bandwidth(store.dtype)
    say("expert compute")
    expert_s = expert_compute_s(store)
    say("decode with every expert resident")
    token_s = _decode_token_s(store, settings, tokens)
    model = from_store(store)
    head_s = model.head_bytes / mem
    if token_s is not None:
        moe = len(store.shape.moe_layers)
        dense_s = max(0.0, (token_s - head_s - moe * store.shape.top_k * expert_s) / moe)
    else:
        dense_s = model.dense_bytes_per_layer / mem
    hw = Hardware(
        name=THIS_MACHINE, description=f"measured on {store.path.name} ({store.dtype_name})",
        link_bandwidth=disk, link_latency_s=latency, memory_bandwidth=mem, channels=1,
        expert_overhead_s=max(0.0, expert_s - model.expert_bytes / mem),
        layer_overhead_s=max(0.0, dense_s - model.dense_bytes_per_layer / mem),
        sources=("adapmoe simulate --calibrate: store.reader.read_bandwidth (O_DIRECT sequential reads), timed "
                 "single-expert reads, a matrix-vector product over 128 MiB, the engine's decode with every expert "
                 "resident",),
        calibrated=True,
        measured={"store": str(store.path.resolve()), "o_direct": direct, "disk_bytes_per_s": disk,
                  "read_latency_s": latency, "memory_bytes_per_s": mem, "expert_bytes": model.expert_bytes,
                  "expert_compute_s": expert_s,
                  "decode_token_s_all_resident": token_s, "dense_layer_s": dense_s,
                  "torch_threads": torch.get_num_threads()},
    )
    return hw, str(write_calibrated(hw))
