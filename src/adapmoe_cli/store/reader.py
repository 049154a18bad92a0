"""Reads one expert's bytes into a caller-provided buffer with one positioned read, bypassing the OS page
cache (O_DIRECT, or `posix_fadvise(DONTNEED)` after the read where O_DIRECT is refused), and turns the
bytes into tensor views without copying. Knows nothing of caches or threads; one reader per thread."""

from __future__ import annotations

import fcntl
import mmap
import os
from pathlib import Path

import torch

from adapmoe_cli.checkpoint import TORCH_DTYPE_BY_NAME
from adapmoe_cli.errors import StoreError
from adapmoe_cli.store.manifest import ALIGNMENT, ExpertEntry, Store


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous memory, page aligned as O_DIRECT requires; `nbytes` is rounded up to the alignment."""
    return mmap.mmap(-1, max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT))


def expert_views(buf: memoryview | mmap.mmap, entry: ExpertEntry) -> dict[str, torch.Tensor]:
    """Part name → tensor viewing `buf` (no copy). `buf` must outlive the views."""
    out = {}
    for t in entry.tensors:
        dtype = TORCH_DTYPE_BY_NAME[t.dtype]
        count = t.nbytes // torch.tensor([], dtype=dtype).element_size()
        out[t.name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=t.offset).view(t.shape)
    return out


class ExpertReader:
    """Positioned reads of whole experts. `direct=False` reads through the page cache (for tests of the
    fallback and for file systems that refuse O_DIRECT); `direct` tells which mode is in effect."""

    def __init__(self, store: Store, direct: bool = True):
        self.store = store
        self._fds: dict[str, int] = {}
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.bytes_read = 0
        self.reads = 0

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            path = self.store.path / file
            if self.direct:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError:
                    self.direct = False  # tmpfs and some network file systems refuse O_DIRECT
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise StoreError(f"{path} is missing; the store is incomplete, re-run `adapmoe shard`") from None
            self._fds[file] = fd
        return fd

    def direct_io_works(self) -> bool:
        """Whether this reader's reads bypass the page cache: every expert file it holds open (it opens one
        if none is) carries O_DIRECT in the status flags the kernel reports for the descriptor. `direct`
        alone says only what was asked for. Call it when no read is in flight (one reader per thread)."""
        if not self._fds:
            self._fd(next(iter(self.store.experts.values())).file)
        flag = getattr(os, "O_DIRECT", 0)
        return bool(flag) and all(fcntl.fcntl(fd, fcntl.F_GETFL) & flag for fd in self._fds.values())

    def read_into(self, layer: int, expert: int, buf: mmap.mmap | memoryview) -> ExpertEntry:
        """Fill `buf[:entry.length]` with the expert's aligned byte range; return its manifest entry."""
        entry = self.store.experts[(layer, expert)]
        fd = self._fd(entry.file)
        view = memoryview(buf)[: entry.length]
        try:
            n = os.preadv(fd, [view], entry.offset)
        except OSError as e:
            if not self.direct:
                raise
            # some file systems accept O_DIRECT at open but refuse the read: fall back once
            self.close()
            self.direct = False
            fd = self._fd(entry.file)
            n = os.preadv(fd, [view], entry.offset)
            del e
        if n < entry.nbytes:
            raise StoreError(
                f"{self.store.path / entry.file} is truncated at expert ({layer}, {expert}); "
                "run `adapmoe verify` and re-shard"
            )
        if not self.direct:
            os.posix_fadvise(fd, entry.offset, entry.length, os.POSIX_FADV_DONTNEED)
        self.bytes_read += entry.length
        self.reads += 1
        return entry

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ExpertReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget cached pages of one file (used before measuring cold reads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bandwidth(store: Store, max_bytes: int = 1 << 30, chunk: int = 4 << 20) -> tuple[float, bool]:
    """Raw sequential read speed of the store's expert files (bytes/s) with O_DIRECT when the file system
    allows it (else reads through the cache after dropping it). Returns (bytes per second, direct)."""
    import time

    files = sorted({e.file for e in store.experts.values()})
    buf = aligned_buffer(chunk)
    view = memoryview(buf)
    done, direct, t0 = 0, True, time.perf_counter()
    try:
        while done < max_bytes:
            before = done
            for name in files:
                path = store.path / name
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError:
                    direct = False
                    drop_page_cache(path)
                    fd = os.open(path, os.O_RDONLY)
                try:
                    off = 0
                    while done < max_bytes:
                        n = os.preadv(fd, [view], off)
                        if n <= 0:
                            break
                        off += n
                        done += n
                finally:
                    os.close(fd)
            if done == before:
                break
    finally:
        view.release()
        buf.close()
    return done / (time.perf_counter() - t0), direct
