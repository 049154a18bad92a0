"""Reads one expert's bytes into a caller-provided buffer with one positioned read, bypassing the OS page
cache (O_DIRECT, or `posix_fadvise(DONTNEED)` after the read where O_DIRECT is refused), checks them
against the manifest the first time this process reads that expert (sha256 of the payload, zeros after
it), and turns the bytes into tensor views without copying. Knows nothing of caches or threads; one
reader per thread."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import stat
from pathlib import Path

import torch

from adapmoe_cli.errors import StoreError
from adapmoe_cli.store.manifest import ALIGNMENT, REMEDY, TENSOR_DTYPES, ExpertEntry, Store


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous memory, page aligned as O_DIRECT requires; `nbytes` is rounded up to the alignment."""
    return mmap.mmap(-1, max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT))


def expert_views(buf: memoryview | mmap.mmap, entry: ExpertEntry, fused: bool = False) -> dict[str, torch.Tensor]:
    """Part name → tensor viewing `buf` (no copy). `buf` must outlive the views. `fused`: also `w13`, w1 and
    w3 as one [2·I, H] matrix, where the store wrote them back to back in one dtype (transformers' own
    `gate_up_proj`: one matrix-vector product streams both instead of two)."""
    out = {}
    for t in entry.tensors:
        dtype = TENSOR_DTYPES[t.dtype]
        count = t.nbytes // torch.tensor([], dtype=dtype).element_size()
        out[t.name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=t.offset).view(t.shape)
    parts = {t.name: t for t in entry.tensors}
    w1, w3 = parts.get("w1"), parts.get("w3")
    if (fused and w1 is not None and w3 is not None and w1.dtype == w3.dtype and w1.shape == w3.shape
            and len(w1.shape) == 2 and w3.offset == w1.offset + w1.nbytes):
        dtype = TENSOR_DTYPES[w1.dtype]
        count = 2 * w1.nbytes // torch.tensor([], dtype=dtype).element_size()
        out["w13"] = torch.frombuffer(buf, dtype=dtype, count=count, offset=w1.offset).view(
            2 * w1.shape[0], w1.shape[1])
    return out


def expert_problem(entry: ExpertEntry, view: memoryview, n: int) -> str | None:
    """What is wrong with an expert's `n` bytes just read into `view`, or None: the payload's sha256 must
    be the manifest's and the padding after it (up to what was read) zeros."""
    if hashlib.sha256(view[: entry.nbytes]).hexdigest() != entry.sha256:
        return f"expert ({entry.layer}, {entry.expert}) in {entry.file} is corrupted (sha256 mismatch)"
    pad = view[entry.nbytes : max(n, entry.nbytes)]
    if pad != bytes(len(pad)):
        return f"expert ({entry.layer}, {entry.expert}) in {entry.file} is corrupted (non-zero padding)"
    return None


class ExpertReader:
    """Positioned reads of whole experts. `direct=False` reads through the page cache (for tests of the
    fallback and for file systems that refuse O_DIRECT); `direct` tells which mode is in effect.
    `check=False` skips the first-read check (`verify` checks every expert itself; the read benchmark)."""

    def __init__(self, store: Store, direct: bool = True, check: bool = True):
        self.store = store
        self._fds: dict[str, int] = {}
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.check = check
        self.bytes_read = 0
        self.reads = 0

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            path = self.store.file_path(file)  # inside the store, whatever links it holds
            # never a link, and O_NONBLOCK so a FIFO planted in the store cannot block the open
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            if self.direct:
                try:
                    fd = os.open(path, flags | os.O_DIRECT)
                except FileNotFoundError:
                    raise StoreError(f"{path} is missing; the store is incomplete, re-run `{REMEDY}`") from None
                except OSError:
                    self.direct = False  # tmpfs and some network file systems refuse O_DIRECT
            if fd is None:
                try:
                    fd = os.open(path, flags)
                except FileNotFoundError:
                    raise StoreError(f"{path} is missing; the store is incomplete, re-run `{REMEDY}`") from None
                except OSError as e:
                    raise StoreError(f"{path} cannot be opened ({e.strerror})") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise StoreError(f"{path} is not a regular file; the store is damaged, re-run `{REMEDY}`")
            os.set_blocking(fd, True)
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
        """Fill `buf[:entry.length]` with the expert's aligned byte range; return its manifest entry.
        Raise StoreError, before anyone uses the bytes, when this process's first read of the expert does
        not match the manifest."""
        entry = self.store.experts[(layer, expert)]
        return self.finish(layer, expert, buf, self.read_range(layer, expert, buf, 0, entry.length))

    def read_range(self, layer: int, expert: int, buf: mmap.mmap | memoryview, start: int, stop: int) -> int:
        """Read bytes `start:stop` of the expert's range into the same place of `buf` (both multiples of
        the alignment, or `stop` the range's end); return where the bytes read end (less than `stop` at a
        truncated file). The loader reads an expert in such chunks so a demand load can overtake a
        prefetch; `finish` checks the whole once it is read."""
        entry = self.store.experts[(layer, expert)]
        fd = self._fd(entry.file)
        view = memoryview(buf)[start:stop]
        try:
            n = os.preadv(fd, [view], entry.offset + start)
        except OSError as e:
            if not self.direct:
                raise
            # some file systems accept O_DIRECT at open but refuse the read: fall back once
            self.close()
            self.direct = False
            fd = self._fd(entry.file)
            n = os.preadv(fd, [view], entry.offset + start)
            del e
        return start + n

    def finish(self, layer: int, expert: int, buf: mmap.mmap | memoryview, end: int) -> ExpertEntry:
        """After the expert's bytes were read up to `end`: refuse a truncated file, drop the pages when
        they went through the page cache, count the read and check the bytes the first time."""
        entry = self.store.experts[(layer, expert)]
        if end < entry.nbytes:
            raise StoreError(
                f"{self.store.path / entry.file} is truncated at expert ({layer}, {expert}); "
                "run `adapmoe verify` and re-shard"
            )
        if not self.direct:
            os.posix_fadvise(self._fd(entry.file), entry.offset, entry.length, os.POSIX_FADV_DONTNEED)
        self.bytes_read += entry.length
        self.reads += 1
        key = (layer, expert)
        if self.check and key not in self.store.checked_experts:
            problem = expert_problem(entry, memoryview(buf)[: entry.length], end)
            if problem is not None:
                raise StoreError(f"store {self.store.path} failed verification: {problem}; run `adapmoe verify` "
                                 f"on it and re-run `{REMEDY}`")
            self.store.checked_experts.add(key)
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
                path = store.file_path(name)
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
