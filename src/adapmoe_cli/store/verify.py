"""Checks a store against its manifest, writing nothing (a store may be read-only or shared).

- `check_files` (cheap, at every engine start): every file the manifest names is a regular file inside
  the store with the recorded size (expert files at least as long as their last expert);
- `verify` (`adapmoe verify`): that, plus every file's and every expert's sha256.

The runtime checks what it uses as it reads it: dense and side files when loaded (`Store.read_checked`),
each expert the first time this process reads it (`store/reader.py`). So bit rot that keeps sizes and
mtimes is refused before its bytes are used, without re-hashing a large store at every start."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adapmoe_cli.errors import StoreError
from adapmoe_cli.store.manifest import REMEDY, Store
from adapmoe_cli.store.reader import ExpertReader, aligned_buffer, expert_problem


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    bytes_checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_files(store: Store) -> tuple[list[str], set[str]]:
    """Problems with the files' presence, kind and sizes, and the names of the files they concern."""
    problems: list[str] = []
    bad: set[str] = set()

    def size_of(name: str) -> int | None:
        try:
            path = store.file_path(name)
        except StoreError as e:
            problems.append(str(e))
            return None
        if not path.exists():
            problems.append(f"{name} is missing")
            return None
        if not path.is_file():
            problems.append(f"{name} is not a regular file")
            return None
        return path.stat().st_size

    for f in store.dense_files + store.side_files:
        size = size_of(f.file)
        if size is not None and size != f.bytes:
            problems.append(f"{f.file} has {size} bytes, the manifest says {f.bytes}")
        if size is None or size != f.bytes:
            bad.add(f.file)
    need: dict[str, int] = {}
    for e in store.experts.values():
        need[e.file] = max(need.get(e.file, 0), e.offset + e.length)
    for name, n in sorted(need.items()):
        size = size_of(name)
        if size is not None and size < n:
            problems.append(f"{name} is truncated ({size} bytes, needs {n})")
        if size is None or size < n:
            bad.add(name)
    return problems, bad


def ensure_files(store: Store) -> None:
    """Raise StoreError unless every file is there with its size (no hashing: see the module docstring)."""
    problems, _ = check_files(store)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"store {store.path} failed verification: {problems[0]}{more}; re-run `{REMEDY}`")


def verify(store: Store, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    t0 = time.perf_counter()
    rep = VerifyReport()
    total = sum(f.bytes for f in store.dense_files + store.side_files) + sum(
        e.nbytes for e in store.experts.values()
    )

    def tick(n: int) -> None:
        rep.bytes_checked += n
        if progress:
            progress(rep.bytes_checked, total)

    rep.problems, bad = check_files(store)
    for f in store.dense_files + store.side_files:
        if f.file in bad:
            continue
        try:
            store.read_checked(f)
        except StoreError as e:
            rep.problems.append(str(e).split("; re-run")[0])
        tick(f.bytes)
    experts = [e for _, e in sorted(store.experts.items()) if e.file not in bad]
    if experts:
        buf = aligned_buffer(store.slot_bytes)
        view = memoryview(buf)
        with ExpertReader(store, check=False) as reader:
            for e in experts:
                reader.read_into(e.layer, e.expert, buf)
                problem = expert_problem(e, view, e.length)
                if problem is not None:
                    rep.problems.append(problem)
                tick(e.nbytes)
        view.release()
        buf.close()
    rep.seconds = time.perf_counter() - t0
    return rep


def check_experts(store: Store) -> None:
    """Read and check every expert not yet checked in this process (its sha256, as a first read does), so
    later reads are not checked again. The bench calls it before timing: no run then pays the first-read
    check and every policy runs alike (a chat session pays it once per expert, on first use)."""
    buf = aligned_buffer(store.slot_bytes)
    try:
        with ExpertReader(store) as reader:
            for key in sorted(store.experts):
                if key not in store.checked_experts:
                    reader.read_into(*key, buf)
    finally:
        buf.close()
