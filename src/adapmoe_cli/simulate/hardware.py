"""Hardware descriptions for the simulator: the link experts cross on a miss (bandwidth, per-read
latency, channels) and the memory the compute reads them from (effective bandwidth, per-call overheads).
One YAML file per machine in `configs/hardware/`, plus `this-machine` as measured by `--calibrate`
under ADAPMOE_HOME (the shipped file of that name is an uncalibrated template). Knows nothing of models."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from adapmoe_cli.errors import UsageError
from adapmoe_cli.paths import home
from adapmoe_cli.safe_io import MAX_YAML_BYTES, read_capped, write_atomic
from adapmoe_cli.settings import parse_yaml
from adapmoe_cli.versioned import integer

THIS_MACHINE = "this-machine"


#: bounds on a hardware description (a faster or slower machine is a typo; 65,536 channels took minutes to
#: simulate, a latency of 10^300 us gave 10^-300 tok/s)
MAX_CHANNELS = 64
MIN_BANDWIDTH, MAX_BANDWIDTH = 1e6, 1e13  # 1 MB/s … 10 TB/s
MAX_TIME_S = 1.0


@dataclass(frozen=True)
class Hardware:
    """Numbers in SI units (bytes per second, seconds). `link_bandwidth` is the whole link's: with
    `channels` transfers in flight, each runs at `link_bandwidth / channels`."""

    name: str
    description: str
    link_bandwidth: float  # bytes/s, slow tier → fast tier (disk → RAM, or host RAM → GPU)
    link_latency_s: float  # fixed cost of one expert transfer
    memory_bandwidth: float  # bytes/s the compute effectively streams weights at (decode is memory bound)
    channels: int = 1
    expert_overhead_s: float = 0.0  # per expert call (kernel launches, dispatch)
    layer_overhead_s: float = 0.0  # per layer's dense part (attention, norms, router)
    load_overhead_s: float = 0.0  # compute-thread time per expert load (bookkeeping, wake-up, cold memory)
    predict_overhead_s: float = 0.0  # per layer when prefetching: the next layer's router on this layer's input
    # compute time lost per transfer that completes while the compute runs (the CPU that drives the read
    # is the one that computes: syscalls, interrupts, the loader thread's wake-up); ~0 for DMA to a GPU
    interference_s: float = 0.0
    # a transfer that starts after the link has been idle `link_idle_s` or longer costs `link_wakeup_s`
    # more (an idle I/O thread and vCPU must wake up); 0 on the shipped machines
    link_wakeup_s: float = 0.0
    link_idle_s: float = 1e-3
    sources: tuple[str, ...] = ()
    calibrated: bool | None = None  # None: a published machine; False: the uncalibrated template
    path: str = ""
    measured: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        numbers = (self.link_bandwidth, self.memory_bandwidth, self.link_latency_s, self.expert_overhead_s,
                   self.layer_overhead_s, self.load_overhead_s, self.predict_overhead_s, self.interference_s,
                   self.link_wakeup_s, self.link_idle_s)
        if not all(math.isfinite(x) for x in numbers):
            raise UsageError(f"hardware {self.name!r}: bandwidths, latencies and overheads must be finite numbers")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise UsageError(f"hardware {self.name!r}: channels must be between 1 and {MAX_CHANNELS}")
        if not (MIN_BANDWIDTH <= self.link_bandwidth <= MAX_BANDWIDTH
                and MIN_BANDWIDTH <= self.memory_bandwidth <= MAX_BANDWIDTH):
            raise UsageError(f"hardware {self.name!r}: link_GBps and memory_GBps must be from {MIN_BANDWIDTH / 1e9:g} "
                             f"to {MAX_BANDWIDTH / 1e9:g} GB/s")
        times = (self.link_latency_s, self.expert_overhead_s, self.layer_overhead_s, self.load_overhead_s,
                 self.predict_overhead_s, self.interference_s, self.link_wakeup_s, self.link_idle_s)
        if min(times) < 0 or max(times) > MAX_TIME_S:
            raise UsageError(f"hardware {self.name!r}: latencies and overheads (the *_us keys) must be from 0 to "
                             f"{MAX_TIME_S * 1e6:,.0f} us")

    def transfer_s(self, nbytes: int) -> float:
        """One expert over one channel."""
        return self.link_latency_s + nbytes * self.channels / self.link_bandwidth

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = list(self.sources)
        return d


def shipped_dir() -> Path:
    return Path(str(resources.files("adapmoe_cli").joinpath("configs", "hardware")))


def calibrated_path() -> Path:
    return home() / "hardware" / f"{THIS_MACHINE}.yaml"


def known() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


def from_dict(d: dict[str, Any], path: str = "") -> Hardware:
    """The YAML keys use human units: GB/s (10⁹ bytes/s) and microseconds."""
    try:
        return Hardware(
            name=str(d["name"]), description=str(d.get("description", "")),
            link_bandwidth=float(d["link_GBps"]) * 1e9, link_latency_s=float(d.get("link_latency_us", 0)) * 1e-6,
            memory_bandwidth=float(d["memory_GBps"]) * 1e9,
            channels=integer(d.get("channels", 1), "channels", UsageError),
            expert_overhead_s=float(d.get("expert_overhead_us", 0)) * 1e-6,
            layer_overhead_s=float(d.get("layer_overhead_us", 0)) * 1e-6,
            load_overhead_s=float(d.get("load_overhead_us", 0)) * 1e-6,
            predict_overhead_s=float(d.get("predict_overhead_us", 0)) * 1e-6,
            interference_s=float(d.get("interference_us", 0)) * 1e-6,
            link_wakeup_s=float(d.get("link_wakeup_us", 0)) * 1e-6,
            link_idle_s=float(d.get("link_idle_us", 1000)) * 1e-6,
            sources=tuple(str(s) for s in d.get("sources", ())),
            calibrated=d.get("calibrated") if isinstance(d.get("calibrated"), bool) else None, path=path,
            measured=_mapping(d.get("measured", {}), "measured"),
        )
    except UsageError as e:
        raise UsageError(f"{path}: {e}" if path else str(e)) from None
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise UsageError(f"hardware file {path or d.get('name')!r} is malformed ({e!r}); see docs/simulate.md"
                         ) from None


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{key} must be a mapping of names to numbers, got {type(value).__name__}")
    return dict(value)


def to_dict(hw: Hardware) -> dict[str, Any]:
    return {
        "name": hw.name, "description": hw.description, "calibrated": hw.calibrated,
        "link_GBps": hw.link_bandwidth / 1e9, "link_latency_us": hw.link_latency_s * 1e6, "channels": hw.channels,
        "memory_GBps": hw.memory_bandwidth / 1e9, "expert_overhead_us": hw.expert_overhead_s * 1e6,
        "layer_overhead_us": hw.layer_overhead_s * 1e6, "load_overhead_us": hw.load_overhead_s * 1e6,
        "predict_overhead_us": hw.predict_overhead_s * 1e6, "interference_us": hw.interference_s * 1e6,
        "link_wakeup_us": hw.link_wakeup_s * 1e6, "link_idle_us": hw.link_idle_s * 1e6,
        "sources": list(hw.sources), "measured": hw.measured,
    }


def read_file(path: Path) -> Hardware:
    what = f"hardware file {path}"
    d = parse_yaml(read_capped(Path(path), MAX_YAML_BYTES, what, UsageError, follow=True), what)
    if not isinstance(d, dict):
        raise UsageError(f"hardware file {path} is not a YAML mapping")
    return from_dict(d, str(path))


def load_hardware(name_or_file: str) -> Hardware:
    """A shipped name, `this-machine` (the calibrated file when there is one), or a YAML file."""
    if name_or_file == THIS_MACHINE and calibrated_path().exists():
        return read_file(calibrated_path())
    p = Path(name_or_file).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise UsageError(f"hardware file {p} does not exist")
        return read_file(p)
    shipped = shipped_dir() / f"{name_or_file}.yaml"
    if not shipped.exists():
        raise UsageError(f"unknown hardware {name_or_file!r}: choose one of {', '.join(known())} or give a YAML file")
    return read_file(shipped)


def write_calibrated(hw: Hardware) -> Path:
    return write_atomic(calibrated_path(), yaml.safe_dump(to_dict(hw), sort_keys=False, allow_unicode=True))
