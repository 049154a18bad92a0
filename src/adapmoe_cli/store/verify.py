"""Checks a store against its manifest: every file present with the right size, every expert's and
file's sha256. A stamp (`.verified.json`: sizes and mtimes) lets the runtime skip a full re-check of an
unchanged store; any change to a file's size or mtime makes the next open verify again."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adapmoe_cli.errors import StoreError
from adapmoe_cli.store.manifest import Store
from adapmoe_cli.store.reader import ExpertReader, aligned_buffer

STAMP = ".verified.json"


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    bytes_checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _files(store: Store) -> list[str]:
    names = {"manifest.json"} | {f.file for f in store.dense_files + store.side_files}
    names |= {e.file for e in store.experts.values()}
    return sorted(names)


def _snapshot(store: Store) -> dict[str, list[int]]:
    out = {}
    for name in _files(store):
        st = (store.path / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


def write_stamp(store: Store) -> None:
    (store.path / STAMP).write_text(json.dumps(_snapshot(store)))


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

    for f in store.dense_files + store.side_files:
        path = store.path / f.file
        if not path.is_file():
            rep.problems.append(f"{f.file} is missing")
            continue
        if path.stat().st_size != f.bytes:
            rep.problems.append(f"{f.file} has {path.stat().st_size} bytes, the manifest says {f.bytes}")
            continue
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(8 * 1024 * 1024):
                h.update(chunk)
        if h.hexdigest() != f.sha256:
            rep.problems.append(f"{f.file} is corrupted (sha256 mismatch)")
        tick(f.bytes)
    sizes: dict[str, int] = {}
    for e in store.experts.values():
        sizes[e.file] = max(sizes.get(e.file, 0), e.offset + e.length)
    bad_files = set()
    for name, need in sizes.items():
        path = store.path / name
        if not path.is_file():
            rep.problems.append(f"{name} is missing")
            bad_files.add(name)
        elif path.stat().st_size < need:
            rep.problems.append(f"{name} is truncated ({path.stat().st_size} bytes, needs {need})")
            bad_files.add(name)
    buf = aligned_buffer(store.slot_bytes)
    with ExpertReader(store) as reader:
        for (layer, expert), e in sorted(store.experts.items()):
            if e.file in bad_files:
                continue
            reader.read_into(layer, expert, buf)
            if hashlib.sha256(memoryview(buf)[: e.nbytes]).hexdigest() != e.sha256:
                rep.problems.append(f"expert ({layer}, {expert}) in {e.file} is corrupted (sha256 mismatch)")
            tick(e.nbytes)
    buf.close()
    rep.seconds = time.perf_counter() - t0
    if rep.ok:
        write_stamp(store)
    return rep


def ensure_verified(store: Store) -> None:
    """Raise StoreError unless the store is whole. Cheap when the stamp matches the files."""
    stamp = store.path / STAMP
    try:
        if json.loads(stamp.read_text()) == _snapshot(store):
            return
    except (OSError, ValueError):
        pass
    rep = verify(store)
    if not rep.ok:
        more = f" (and {len(rep.problems) - 1} more)" if len(rep.problems) > 1 else ""
        raise StoreError(
            f"store {store.path} failed verification: {rep.problems[0]}{more}; re-run `adapmoe shard --force`"
        )
