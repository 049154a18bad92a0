"""Memory caps that count the page cache: one process run in a memory cgroup of its own (v1
`memory.limit_in_bytes` or v2 `memory.max`), so a run that maps its weights (llama.cpp) and one that reads
them with O_DIRECT (ours) are held to the same bytes. Needs root (or a delegated cgroup); `why_unavailable`
says when there is none. Reports the group's peak usage, its peak working set (usage less the inactive
file pages: what the kernel does not reclaim first under the cap, the measure Kubernetes calls the working set)
and whether the kernel killed the process for memory. Knows nothing of models."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
#: seconds between two samples of a capped run's working set
SAMPLE_S = 0.05
_counter = itertools.count()


@dataclass(frozen=True)
class CappedRun:
    returncode: int
    stdout: str
    stderr: str
    cap_bytes: int | None
    peak_bytes: int | None  # the group's max usage, page cache included (None: not capped, or not reported)
    killed_for_memory: bool
    #: the largest working set sampled (usage less inactive file pages, every SAMPLE_S): the page cache a run
    #: read once and left (imports, the compiler's cache files) is not in it
    peak_working_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.killed_for_memory


def _version() -> int | None:
    if (V1 / "memory.limit_in_bytes").exists():
        return 1
    controllers = V2 / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return 2
    return None


def why_unavailable() -> str | None:
    """None when a capped group can be made here; else why not, in one line."""
    version = _version()
    if version is None:
        return "this system has no cgroup memory controller"
    root = V1 if version == 1 else V2
    if not os.access(root, os.W_OK):
        return f"making a memory cgroup under {root} needs root (or a delegated cgroup); run as root"
    return None


class _Group:
    """A memory cgroup of our own, removed on exit."""

    def __init__(self, cap: int):
        self.version = _version()
        root = V1 if self.version == 1 else V2
        self.path = root / f"adapmoe-{os.getpid()}-{next(_counter)}"
        self.path.mkdir()
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(cap))
            try:
                (self.path / "memory.swappiness").write_text("0")
            except OSError:
                pass
        else:
            (self.path / "memory.max").write_text(str(cap))
            try:
                (self.path / "memory.swap.max").write_text("0")
            except OSError:
                pass

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` started by a shell that first moves itself into the group, then becomes `argv` (exec): the
        whole run is charged to the group, and nothing runs in the forked child before exec (the bench's
        own process has threads, where a `preexec_fn` is not safe)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def peak(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def working_set(self) -> int | None:
        """Usage now less the inactive file pages (they go first when the group reaches its cap)."""
        usage, inactive = ("memory.usage_in_bytes", "total_inactive_file") if self.version == 1 else \
            ("memory.current", "inactive_file")
        try:
            used = int((self.path / usage).read_text())
            for line in (self.path / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive:
                    return max(0, used - int(value))
        except (OSError, ValueError):
            pass
        return None

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)  # the group empties a moment after its last process exits


def run_capped(argv: list[str], cap_bytes: int | None, input: str | None = None, env: dict[str, str] | None = None,
               timeout: float | None = None) -> CappedRun:
    """Run `argv` to completion, in a memory cgroup capped at `cap_bytes` (page cache included) when given.
    The caller checks `why_unavailable()` first. A process the cap kills is a result, not an exception."""
    if cap_bytes is None:
        r = subprocess.run(argv, input=input, capture_output=True, text=True, env=env, timeout=timeout)
        return CappedRun(r.returncode, r.stdout, r.stderr, None, None, False)
    group = _Group(cap_bytes)
    working: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            ws = group.working_set()
            if ws is not None:
                working.append(ws)

    sampler = threading.Thread(target=sample, name="adapmoe-memcap", daemon=True)
    sampler.start()
    try:
        r = subprocess.run(group.wrap(argv), input=input, capture_output=True, text=True, env=env, timeout=timeout)
        kills = group.oom_kills()
        killed = kills > 0 or r.returncode == -signal.SIGKILL
        done.set()
        sampler.join()
        return CappedRun(r.returncode, r.stdout, r.stderr, cap_bytes, group.peak(), killed,
                         max(working) if working else None)
    finally:
        done.set()
        group.remove()
