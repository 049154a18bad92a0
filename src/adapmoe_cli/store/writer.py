"""`shard()`: turn a local checkpoint directory into an expert store.

Streaming: one tensor (dense) or one expert (experts) is in memory at a time, read with positioned reads,
so peak memory does not grow with the model. Atomic: everything is written into a hidden sibling
directory `.NAME.partial-PID`, `manifest.json` last, then renamed into place; an interrupted run leaves
only that hidden directory, which the next run removes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapmoe_cli import __version__
from adapmoe_cli.checkpoint import (
    TORCH_DTYPE_BY_NAME,
    Checkpoint,
    _natural,
    open_checkpoint,
    side_files,
)
from adapmoe_cli.errors import StoreError, StoreExistsError, UsageError
from adapmoe_cli.store.manifest import ALIGNMENT, FORMAT, FORMAT_VERSION, MANIFEST, Store, is_store

DENSE_CHUNK_BYTES = 256 * 1024 * 1024
DTYPE_CHOICES = ("keep", "bfloat16", "float16", "float32")
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class ShardResult:
    store: Path
    bytes_written: int
    seconds: float
    reused: bool  # True when OUT already held this very store and nothing was written


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _target_dtype(ckpt: Checkpoint, dtype: str) -> torch.dtype:
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype != "keep":
        return TORCH_DTYPE_BY_NAME[dtype]
    fam = ckpt.family
    first = ckpt.tensors[fam.expert_tensor_name(fam.moe_shape(ckpt.config).moe_layers[0], 0, fam.expert_parts[0])]
    if first.dtype not in TORCH_DTYPE_BY_NAME.values():
        raise UsageError(f"experts are stored as {first.dtype}; pass --dtype bfloat16, float16 or float32")
    return first.dtype


def fingerprint(ckpt: Checkpoint, dtype: torch.dtype) -> str:
    """Identity of (source weights, target dtype): equal fingerprints mean the same store content."""
    desc = {
        "config": ckpt.config,
        "dtype": str(dtype),
        "tensors": sorted((t.name, list(t.shape), str(t.dtype), t.nbytes) for t in ckpt.tensors.values()),
        "side": sorted((p.name, _sha256_file(p)) for p in side_files(ckpt.path)),
        # weights with the same shapes (a fine-tune, a re-download) differ in their bytes: sample each file
        "samples": sorted((f.name, _sample_digest(f)) for f in {t.file for t in ckpt.tensors.values()}),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _sample_digest(path: Path, span: int = 1 << 20) -> str:
    """sha256 of the first and last `span` bytes and the size: cheap, and any retrained weights show."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(span))
        f.seek(max(0, size - span))
        h.update(f.read(span))
    h.update(str(size).encode())
    return h.hexdigest()


def _remove_stale_partials(out: Path) -> None:
    """Remove what killed runs left: half-written stores and replaced stores not yet deleted."""
    leftovers = [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]
    for p in leftovers:
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # another shard of the same target is running
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)


def _check_target(out: Path, fp: str, force: bool) -> bool:
    """True when OUT already holds this store. Raise when OUT holds something we must not replace."""
    if not out.exists():
        return False
    if is_store(out):
        try:
            same = Store.open(out).fingerprint == fp
        except StoreError:
            same = False
        if same and not force:
            return True
        if not force:
            raise StoreExistsError(f"{out} already holds a different store; pass --force to replace it")
        return False
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        return False
    raise StoreError(f"{out} exists and is not an adapmoe store; choose another output folder")


def shard(
    src: Path,
    out: Path,
    dtype: str = "keep",
    force: bool = False,
    progress: Progress | None = None,
    source: dict[str, Any] | None = None,
) -> ShardResult:
    t0 = time.perf_counter()
    src, out = Path(src), Path(out).absolute()
    ckpt = open_checkpoint(src)
    target = _target_dtype(ckpt, dtype)
    fp = fingerprint(ckpt, target)
    out.parent.mkdir(parents=True, exist_ok=True)
    if _check_target(out, fp, force):
        return ShardResult(out, 0, time.perf_counter() - t0, reused=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = _write_store(ckpt, target, tmp, fp, progress, source or {"path": str(src.absolute())})
        _replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise StoreError(f"writing the store in {out.parent} failed: {e.strerror}; nothing was kept") from e
        raise
    return ShardResult(out, written, time.perf_counter() - t0, reused=False)


def _replace(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:  # put the previous store back rather than leave none
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_store(
    ckpt: Checkpoint, target: torch.dtype, tmp: Path, fp: str, progress: Progress | None, source: dict[str, Any]
) -> int:
    from adapmoe_cli.store.verify import write_stamp

    fam, shape = ckpt.family, ckpt.family.moe_shape(ckpt.config)
    esize = torch.tensor([], dtype=target).element_size()
    total = sum(t.nbytes // t.dtype.itemsize * esize for t in ckpt.tensors.values())
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    experts = _write_experts(ckpt, target, tmp, tick)
    dense = _write_dense(ckpt, target, tmp, tick)
    sides = []
    for p in side_files(ckpt.path):
        shutil.copyfile(p, tmp / p.name)
        sides.append({"file": p.name, "bytes": p.stat().st_size, "sha256": _sha256_file(p)})
    config = dict(ckpt.config)
    config["dtype"] = config["torch_dtype"] = DTYPE_NAMES_BY_TORCH[target]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"adapmoe {__version__}",
        "model_type": fam.model_type,
        "config": config,
        "dtype": DTYPE_NAMES_BY_TORCH[target],
        "alignment": ALIGNMENT,
        "num_moe_layers": len(shape.moe_layers),
        "source": {**source, "fingerprint": fp},
        "dense": dense,
        "side_files": sides,
        "experts": experts,
    }
    data = json.dumps(manifest, indent=1).encode()
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    write_stamp(Store.open(tmp))
    return done


DTYPE_NAMES_BY_TORCH = {v: k for k, v in TORCH_DTYPE_BY_NAME.items()}


def _write_experts(
    ckpt: Checkpoint, target: torch.dtype, tmp: Path, tick: Callable[[int], None]
) -> list[dict[str, Any]]:
    fam, shape = ckpt.family, ckpt.family.moe_shape(ckpt.config)
    (tmp / "experts").mkdir()
    part_shapes = fam.expert_part_shapes(ckpt.config)
    esize = torch.tensor([], dtype=target).element_size()
    # the layout is the same for every expert: each part starts on an aligned offset
    layout, off = [], 0
    for part in fam.expert_parts:
        numel = 1
        for d in part_shapes[part]:
            numel *= d
        layout.append((part, part_shapes[part], off, numel * esize))
        off = _align(off + numel * esize)
    nbytes = layout[-1][2] + layout[-1][3]
    stride = _align(nbytes)
    entries = []
    payload = bytearray(stride)
    for layer in shape.moe_layers:
        rel = f"experts/layer-{layer:03d}.bin"
        fd = os.open(tmp / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for e in range(shape.num_experts):
                payload[:] = bytes(stride)
                tensors = []
                for part, pshape, poff, pbytes in layout:
                    t = ckpt.read(fam.expert_tensor_name(layer, e, part)).to(target).contiguous()
                    payload[poff : poff + pbytes] = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                    tensors.append({"name": part, "shape": list(pshape), "dtype": DTYPE_NAMES_BY_TORCH[target],
                                    "offset": poff, "nbytes": pbytes})
                    del t
                _write_all(fd, payload)
                entries.append({
                    "layer": layer, "expert": e, "file": rel, "offset": e * stride, "length": stride,
                    "nbytes": nbytes, "sha256": hashlib.sha256(memoryview(payload)[:nbytes]).hexdigest(),
                    "tensors": tensors,
                })
                tick(sum(p[3] for p in layout))
            os.fsync(fd)
        finally:
            os.close(fd)
    return entries


def _write_dense(
    ckpt: Checkpoint, target: torch.dtype, tmp: Path, tick: Callable[[int], None]
) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    fam = ckpt.family
    names = sorted((n for n in ckpt.tensors if fam.expert_key(n) is None), key=_natural)
    files: list[dict[str, Any]] = []
    chunk: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal chunk, size
        if not chunk:
            return
        name = f"dense-{len(files) + 1:05d}.safetensors"
        save_file(chunk, str(tmp / name), metadata={"format": "pt"})
        path = tmp / name
        files.append({"file": name, "bytes": path.stat().st_size, "sha256": _sha256_file(path)})
        chunk, size = {}, 0

    for n in names:
        t = ckpt.read(n)
        if t.is_floating_point():
            t = t.to(target)
        chunk[n] = t.contiguous()
        size += t.numel() * t.element_size()
        tick(t.numel() * t.element_size())
        if size >= DENSE_CHUNK_BYTES:
            flush()
    flush()
    return files
