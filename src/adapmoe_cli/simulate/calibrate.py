"""`calibrate()`: measures this machine for the simulator and writes `this-machine` under ADAPMOE_HOME.

The runtime is timed at its two ends on the given store (`decode_times`): every expert resident (the
compute of a token), and nothing cached across tokens (every needed expert loaded on demand: the time a
load takes as the runtime sees it, and what each load costs the compute thread besides its wait). Micro-
measurements add the disk's O_DIRECT bandwidth (`store.reader.read_bandwidth`), the memory bandwidth a
matrix-vector product reaches, one expert's compute from a real slot, and the block's next-layer
prediction. The overheads written are what the measured times hold beyond bytes over bandwidth, so the
same file projects other models' sizes. `bench --simulate` builds the same description from the bench's
own `resident` and `naive` runs instead (`simulate.check`)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from adapmoe_cli import budget as budgets
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.measure import timed_decode
from adapmoe_cli.settings import Settings, replace
from adapmoe_cli.simulate.hardware import THIS_MACHINE, Hardware, write_calibrated
from adapmoe_cli.simulate.model_spec import from_store
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


@dataclass(frozen=True)
class DecodeTimes:
    """Seconds per decode token of the runtime at its two ends (fastest of interleaved runs)."""

    resident_token_s: float | None  # every expert resident; None when they do not fit in memory
    demand_token_s: float  # nothing cached across tokens: every needed expert loaded on demand
    demand_stall_s: float  # of which the compute thread waited for loads
    demand_loads: float  # loads per token

    @property
    def load_s(self) -> float:
        """One expert load as the compute thread waits for it."""
        return self.demand_stall_s / self.demand_loads

    @property
    def load_overhead_s(self) -> float | None:
        """What each load costs the compute thread beyond its wait (bookkeeping, wake-up, cold memory)."""
        if self.resident_token_s is None:
            return None
        return max(0.0, (self.demand_token_s - self.demand_stall_s - self.resident_token_s) / self.demand_loads)


def _fits(store: Store) -> bool:
    return budgets.fits(store.cache_shape)


class Engines:
    """The two engines calibration decodes with, each built once and reused (building one costs more than
    a decode on a small model): every expert resident, with prefetch switched per measurement, and top-k
    slots per layer with no eviction policy (every needed expert loaded on demand)."""

    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, replace(settings, prefetch=False)
        self._resident: Engine | None = None
        self._demand: Engine | None = None

    def resident(self, prefetch: bool = False) -> Engine:
        if self._resident is None:
            self._resident = Engine(self.store, self.settings, budgets.all_experts(self.store.cache_shape),
                                    verify=False)
            for layer in self.store.shape.moe_layers:
                self._resident.manager.preload(layer, range(self.store.shape.num_experts))
        self._resident.use_prefetch(prefetch)
        return self._resident

    def demand(self) -> Engine:
        if self._demand is None:
            settings = replace(self.settings, cache=replace(self.settings.cache, policy="none"))
            shape = self.store.cache_shape
            self._demand = Engine(self.store, settings, budgets.per_layer(shape, shape.top_k, "top-k per layer"),
                                  verify=False)
        return self._demand

    def close(self) -> None:
        for eng in (self._resident, self._demand):
            if eng is not None:
                eng.close()

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(engine: Engine, tokens: int) -> tuple[float, float, int]:
    """(seconds per token, stall seconds per token, loads) of `engine` decoding `tokens` tokens after a
    warm-up token, on a fresh KV cache."""
    run = timed_decode(engine, [1, 2, 3, 4], tokens, warmup=1)
    return run.decode_s / tokens, run.stats.stall_s / tokens, run.stats.misses


def decode_times(engines: Engines, tokens: int = 48, rounds: int = 3, max_demand_bytes: int = 2 << 30
                 ) -> DecodeTimes:
    """Time the real engine decoding with every expert resident and with top-k slots and no eviction
    policy (`bench`'s naive), alternately, `rounds` times each, prefetch off; keep each end's fastest
    round (the least disturbed by the rest of the machine). The on-demand decode reads about
    `max_demand_bytes` per round at most (at least 2 tokens), so large models calibrate in seconds."""
    store = engines.store
    shape = store.shape
    fits = _fits(store)
    per_token = len(shape.moe_layers) * shape.top_k * store.slot_bytes
    demand_tokens = max(2, min(tokens, max_demand_bytes // per_token))
    resident, demand = [], []
    for _ in range(rounds):
        if fits:
            resident.append(_decode(engines.resident(), tokens))
        demand.append(_decode(engines.demand(), demand_tokens))
    fastest = min(demand)
    return DecodeTimes(resident_token_s=min(resident)[0] if fits else None, demand_token_s=fastest[0],
                       demand_stall_s=fastest[1], demand_loads=fastest[2] / demand_tokens)


def memory_bandwidth(dtype: torch.dtype, nbytes: int = 128 << 20) -> float:
    """Bytes/s a matrix-vector product streams a matrix larger than the caches at (decode's access pattern)."""
    cols = 4096
    rows = max(1, nbytes // (cols * torch.tensor([], dtype=dtype).element_size()))
    w = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    F.linear(x, w)  # warm-up
    return w.numel() * w.element_size() / _best(lambda: F.linear(x, w), 5)


def expert_compute_s(store: Store) -> float:
    """One expert on one token, computed as the MoE block computes it, from real weights in an aligned slot."""
    from adapmoe_cli.experts_format import by_part
    from adapmoe_cli.runtime.moe_block import expert_output
    from adapmoe_cli.store.reader import ExpertReader, aligned_buffer, expert_views

    entry = next(iter(store.experts.values()))
    buf = aligned_buffer(store.slot_bytes)
    with ExpertReader(store) as reader:
        reader.read_into(entry.layer, entry.expert, buf)
    fmt = store.experts_format
    w = by_part(expert_views(buf, entry, fused=not fmt.quantized))
    x = torch.randn(1, store.shape.hidden_size).to(store.dtype)

    def lin(v: torch.Tensor, part: dict[str, torch.Tensor]) -> torch.Tensor:
        return fmt.linear(v, part, "bfloat16")

    def run() -> None:
        expert_output(lin, lambda gate, up: F.silu(gate) * up, False, x, w)

    run()
    return _best(run, 20)


def predict_overhead_s(engines: Engines, tokens: int = 32, rounds: int = 5) -> float:
    """What prefetching adds per layer before any load: the block's next-layer prediction and the
    manager's prefetch call, measured in place as the median of paired differences between decodes with
    every expert resident, prefetch on and off (so nothing is ever loaded). 0 when the store does not fit."""
    shape = engines.store.shape
    if len(shape.moe_layers) < 2 or not _fits(engines.store):
        return 0.0
    diffs = []
    for _ in range(rounds):
        off = _decode(engines.resident(prefetch=False), tokens)[0]
        on = _decode(engines.resident(prefetch=True), tokens)[0]
        diffs.append(on - off)
    return max(0.0, statistics.median(diffs) / (len(shape.moe_layers) - 1))


def _read_beside(store: Store, keys: list[tuple[int, int]], gap_s: float, stop: Any, reads: list[int]) -> None:
    """Read one expert after another through a loader of its own, `gap_s` apart, until `stop` is set."""
    from adapmoe_cli.runtime.loader import DEMAND, Loader
    from adapmoe_cli.store.reader import ExpertReader, aligned_buffer

    buf = aligned_buffer(store.slot_bytes)
    loader = Loader(ExpertReader(store))
    try:
        while not stop.is_set():
            loader.wait(loader.submit(*keys[reads[0] % len(keys)], buf, DEMAND))
            reads[0] += 1
            time.sleep(gap_s)
    finally:
        loader.close()
        buf.close()


def link_wakeup_s(engines: Engines, loads: int = 32) -> float:
    """What a load costs beyond a back-to-back one when it follows a token's compute (the I/O thread and
    its CPU have gone idle while the engine's threads computed): the difference of the medians of single
    loads through the runtime's loader, back to back and after each token of a decode with every expert
    resident. 0 when the store does not fit."""
    from adapmoe_cli.runtime.loader import DEMAND, Loader
    from adapmoe_cli.store.reader import ExpertReader, aligned_buffer

    store = engines.store
    if not _fits(store):
        return 0.0
    keys = sorted(store.experts)
    buf = aligned_buffer(store.slot_bytes)
    loader = Loader(ExpertReader(store))

    def load(i: int) -> float:
        t0 = time.perf_counter()
        loader.wait(loader.submit(*keys[(i * 7919) % len(keys)], buf, DEMAND))
        return time.perf_counter() - t0

    try:
        load(0)  # the thread is up, the files are open
        back_to_back = [load(i) for i in range(loads)]
        after_compute: list[float] = []
        timed_decode(engines.resident(), [1, 2, 3, 4], loads, after_step=lambda n: after_compute.append(load(n)))
    finally:
        loader.close()
        buf.close()
    return max(0.0, statistics.median(after_compute) - statistics.median(back_to_back))


def interference_s(engines: Engines, tokens: int = 48, rounds: int = 6, gap_s: float = 1e-3) -> float:
    """Compute time lost per expert read running beside it: decodes with every expert resident, alone and
    while a second loader reads one expert every `gap_s` (prefetch-like spacing), paired and interleaved;
    the median over rounds of the slowdown per read. 0 when the store does not fit."""
    import threading

    store = engines.store
    if not _fits(store):
        return 0.0
    keys = sorted(store.experts)
    per_read = []
    for _ in range(rounds):
        alone = _decode(engines.resident(), tokens)[0]
        stop, reads = threading.Event(), [0]
        th = threading.Thread(target=_read_beside, args=(store, keys, gap_s, stop, reads), daemon=True)
        t0 = time.perf_counter()
        th.start()
        beside = _decode(engines.resident(), tokens)[0]
        elapsed = time.perf_counter() - t0
        stop.set()
        th.join()
        reads_per_token = reads[0] / elapsed * beside
        if reads_per_token > 0:
            per_read.append((beside - alone) / reads_per_token)
    return max(0.0, statistics.median(per_read)) if per_read else 0.0


def measured_hardware(store: Store, settings: Settings, disk: float, direct: bool, times: DecodeTimes, how: str,
                      progress: Progress | None = None, engines: Engines | None = None, tokens: int = 48
                      ) -> Hardware:
    """`this-machine` from the disk bandwidth and the runtime's decode times at its two ends (`how` says
    where they came from), plus memory bandwidth, one expert's compute and the block's prediction,
    measured here and now, each decode of these `tokens` long at most (a bench passes its own length). Without
    a resident time the dense part is estimated from its bytes."""
    say = progress or (lambda _msg: None)
    say("memory bandwidth")
    mem = memory_bandwidth(store.dtype)
    say("expert compute")
    expert_s = expert_compute_s(store)
    with contextlib.nullcontext(engines) if engines else Engines(store, settings) as eng:
        say("next-layer prediction")
        predict_s = predict_overhead_s(eng, tokens=min(32, tokens))
        say("reads beside compute")
        interfere_s = interference_s(eng, tokens=tokens)
        say("a load after idle compute")
        wakeup_s = link_wakeup_s(eng, loads=min(32, tokens))
    model = from_store(store)
    head_s = model.head_bytes / mem
    moe = len(store.shape.moe_layers)
    if times.resident_token_s is not None:
        dense_s = max(0.0, (times.resident_token_s - head_s - moe * store.shape.top_k * expert_s) / moe)
    else:
        dense_s = model.dense_bytes_per_layer / mem
    # a load as the runtime waits for it = latency + bytes / bandwidth; a load faster than the sequential
    # measurement (disk noise) lowers the bandwidth's share rather than making the latency negative
    link = max(disk, model.slot_bytes / times.load_s)
    latency = max(0.0, times.load_s - model.slot_bytes / disk)
    return Hardware(
        name=THIS_MACHINE, description=f"measured on {store.path.name} ({store.dtype_name})",
        link_bandwidth=link, link_latency_s=latency, memory_bandwidth=mem, channels=1,
        expert_overhead_s=max(0.0, expert_s - model.slot_bytes / mem),
        layer_overhead_s=max(0.0, dense_s - model.dense_bytes_per_layer / mem),
        load_overhead_s=times.load_overhead_s or 0.0, predict_overhead_s=predict_s, interference_s=interfere_s,
        link_wakeup_s=wakeup_s,
        sources=(how + "; a matrix-vector product over 128 MiB, one expert's maths from a real slot, decodes with "
                 "prefetch on and off, alone and beside a loader reading every 1 ms, and single loads back to back and "
                 "after each token of a decode",),
        calibrated=True,
        measured={"store": str(store.path.resolve()), "o_direct": direct, "disk_bytes_per_s": disk,
                  "load_s": times.load_s, "memory_bytes_per_s": mem, "slot_bytes": model.slot_bytes,
                  "expert_compute_s": expert_s, "predict_s": predict_s, "interference_s": interfere_s,
                  "link_wakeup_s": wakeup_s,
                  "decode_token_s_all_resident": times.resident_token_s,
                  "decode_token_s_on_demand": times.demand_token_s, "stall_s_on_demand": times.demand_stall_s,
                  "loads_per_token_on_demand": times.demand_loads, "load_overhead_s": times.load_overhead_s,
                  "dense_layer_s": dense_s, "torch_threads": torch.get_num_threads()},
    )


def calibrate(store: Store, settings: Settings, max_read_bytes: int = 256 << 20, tokens: int = 48,
              progress: Progress | None = None) -> tuple[Hardware, str]:
    """Measure, write `this-machine`, return it and the path written."""
    from adapmoe_cli.store.reader import read_bandwidth

    say = progress or (lambda _msg: None)
    say("disk bandwidth (O_DIRECT)")
    disk, direct = read_bandwidth(store, max_bytes=max_read_bytes)
    with Engines(store, settings) as engines:
        say("decode: every expert resident, and every expert loaded on demand")
        times = decode_times(engines, tokens)
        hw = measured_hardware(store, settings, disk, direct, times, "adapmoe simulate --calibrate: "
                               "store.reader.read_bandwidth (O_DIRECT sequential reads), the engine's decode with "
                               "every expert resident and with every expert loaded on demand", say, engines, tokens)
    return hw, str(write_calibrated(hw))
