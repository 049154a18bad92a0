"""`shard()`: turn a local checkpoint directory into an expert store.

Streaming: one tensor (dense) or one expert (experts) is in memory at a time, read with positioned reads,
so peak memory does not grow with the model. Atomic: everything is written into a hidden sibling
directory `.NAME.adapmoe-partial-PID-RANDOM`, `manifest.json` last, then renamed into place; an
interrupted run leaves only that hidden directory, which the next run removes — it removes only folders
with that word in their name that hold its owner mark for the same OUT, made by a process now gone.
Every file is created fresh (O_EXCL, never through a link). While reading, each tensor's sha256 is
taken: the store's fingerprint covers every byte of the source (see `_check_target` for reuse)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
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
    validate,
)
from adapmoe_cli.errors import CheckpointError, OutputError, StoreError, StoreExistsError, UsageError
from adapmoe_cli.experts_format import ExpertsFormat, dequantize_mxfp4
from adapmoe_cli.families import is_weight
from adapmoe_cli.paths import is_store
from adapmoe_cli.safe_io import ensure_dir, read_capped, sha256_file, write_atomic
from adapmoe_cli.settings import DTYPE_CHOICES
from adapmoe_cli.store.manifest import (
    ALIGNMENT,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    NATIVE_FORMAT_VERSION,
    ExpertLayout,
    Store,
    manifest_digest,
)

DENSE_CHUNK_BYTES = 256 * 1024 * 1024
MAX_SIDE_BYTES = 256 * 1024 * 1024  # a tokenizer.json is tens of MB at most
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class ShardResult:
    store: Path
    bytes_written: int
    seconds: float
    reused: bool  # True when OUT already held this very store and nothing was written


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _target_dtype(ckpt: Checkpoint, dtype: str) -> torch.dtype:
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype != "keep":
        return TORCH_DTYPE_BY_NAME[dtype]
    if ckpt.family.reads_mxfp4(ckpt.config):
        return torch.bfloat16  # MXFP4 experts are dequantized exactly into bfloat16, the checkpoint's other weights'
    first = ckpt.tensors[next(iter(ckpt.family.expert_tensor_shapes(ckpt.config)))]
    if first.dtype not in TORCH_DTYPE_BY_NAME.values():
        raise UsageError(f"experts are stored as {first.dtype}; pass --dtype bfloat16, float16 or float32")
    return first.dtype


def content_digest(digests: dict[str, str]) -> str:
    """One sha256 over every tensor's (tensor name → sha256 of its bytes, `Checkpoint.read`/`digests`)."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def fingerprint(ckpt: Checkpoint, dtype: torch.dtype, content: str, fmt: ExpertsFormat | None = None) -> str:
    """Identity of (source weights, target dtype, experts format): equal fingerprints mean the same store
    content. `content` (`content_digest`) covers every byte of every tensor."""
    desc: dict[str, Any] = {
        "config": ckpt.config,
        "dtype": str(dtype),
        "tensors": sorted((t.name, list(t.shape), str(t.dtype), t.nbytes) for t in ckpt.tensors.values()),
        "side": sorted((p.name, sha256_file(p)) for p in side_files(ckpt.path)),
        "content": content,
    }
    spec = fmt.spec() if fmt is not None else None
    if spec is not None:  # native stores keep the fingerprint they always had
        desc["experts_format"] = spec
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


SAMPLE_BLOCKS, SAMPLE_SPAN = 16, 64 << 10


def _sample_digest(path: Path) -> str:
    """sha256 of the size and of 64 KiB blocks at the start, the end and 16 evenly spaced places between."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        last = max(0, size - SAMPLE_SPAN)
        for i in range(SAMPLE_BLOCKS + 2):
            f.seek(last * i // (SAMPLE_BLOCKS + 1))
            h.update(f.read(SAMPLE_SPAN))
    return h.hexdigest()


def source_files(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """What the reuse check compares for each weight file: size, mtime, ctime and sampled blocks."""
    out = []
    for f in sorted({t.file for t in ckpt.tensors.values()}):
        st = f.stat()
        out.append({"name": f.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                    "samples": _sample_digest(f)})
    return out


def _unchanged(ckpt: Checkpoint, recorded: Any) -> bool:
    """True when every weight file has the size, mtime and ctime recorded at shard time and its sampled
    blocks hash as recorded. Any write through the file system moves ctime (which no user can set back),
    so only changes below it (bit rot, raw-device writes) outside the sampled blocks go unseen."""
    if not isinstance(recorded, list):
        return False
    try:
        return source_files(ckpt) == recorded
    except OSError:
        return False


#: names of what `shard` keeps beside OUT while it works: hidden, and with a word no user picks
_PARTIAL, _OLD, _OWNER = "adapmoe-partial", "adapmoe-replaced", ".adapmoe-owner"


def _own(folder: Path, out: Path) -> None:
    """Mark `folder` as this process's working copy for `out` (what `_remove_stale_partials` checks)."""
    fd = os.open(folder / _OWNER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        _write_all(fd, json.dumps({"pid": os.getpid(), "out": str(out)}).encode())
    finally:
        os.close(fd)


def _ours(folder: Path, out: Path) -> int | None:
    """The pid that made `folder` for `out`, or None when it is not a working copy of ours."""
    try:
        if folder.is_symlink() or not folder.is_dir() or (folder / _OWNER).is_symlink():
            return None
        owner = json.loads((folder / _OWNER).read_text())
        pid = owner["pid"]
        return pid if owner["out"] == str(out) and isinstance(pid, int) and pid > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_stale_partials(out: Path) -> None:
    """Remove what killed runs of ours left — half-written stores and replaced stores not yet deleted —
    and nothing else: a folder is removed only if its name has our word in it, it holds our owner mark
    for this OUT, and the process that made it is gone."""
    leftovers = [*out.parent.glob(f".{out.name}.{_PARTIAL}-*"), *out.parent.glob(f".{out.name}.{_OLD}-*")]
    for p in leftovers:
        pid = _ours(p, out)
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # another shard of the same target is running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)


def _check_target(out: Path, ckpt: Checkpoint, target: torch.dtype, force: bool, fmt: ExpertsFormat) -> bool:
    """True when OUT already holds this store. Raise when OUT holds something we must not replace.
    Cheap when the checkpoint's files are unchanged since the store was made (`_unchanged`: stat and
    sampled blocks); otherwise every tensor is read and hashed before the answer. The checkpoint is
    validated (checkpoint.validate) before any answer but True: a store made from it was validated then."""
    if not out.exists():
        validate(ckpt)
        return False
    if is_store(out):
        try:
            old: Store | None = Store.open(out)
        except StoreError:
            old = None
        same = False
        if old is not None and old.manifest["format_version"] >= 2:
            source = old.manifest.get("source", {})
            if _unchanged(ckpt, source.get("files")):
                same = old.fingerprint == fingerprint(ckpt, target, str(source.get("content")), fmt)
            else:
                same = old.fingerprint == fingerprint(ckpt, target, content_digest(ckpt.digests()), fmt)
                if same:  # touched or copied, same bytes: record the new stat so the next check is cheap
                    _refresh_source(old, source_files(ckpt))
        if same and not force:
            return True
        validate(ckpt)
        if not force:
            why = "a store made by an older adapmoe" if old is not None and not same and \
                old.manifest["format_version"] < 2 else "a different store"
            raise StoreExistsError(f"{out} already holds {why}; pass --force to replace it")
        return False
    validate(ckpt)
    check_free(out)
    out.rmdir()  # (an empty folder)
    return False


def check_free(out: Path) -> None:
    """`out` may receive a store: absent, an empty folder or a store (compared with what is asked for by the
    caller); anything else is the user's and a StoreError. Cheap, so a caller with work to do first (a
    variant exported from a store: export.variant_store) checks before it."""
    if out.exists() and not is_store(out) and not (out.is_dir() and not any(out.iterdir())):
        raise StoreError(f"{out} exists and is not an adapmoe store; choose another output folder")


def _refresh_source(store: Store, files: list[dict[str, Any]]) -> None:
    manifest = dict(store.manifest)
    manifest["source"] = {**manifest.get("source", {}), "files": files}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    try:
        write_atomic(store.path / MANIFEST, json.dumps(manifest, indent=1))
    except OutputError:
        pass  # a read-only store: the next check reads the checkpoint again


def shard(
    src: Path,
    out: Path,
    dtype: str = "keep",
    force: bool = False,
    progress: Progress | None = None,
    source: dict[str, Any] | None = None,
    experts_format: ExpertsFormat | None = None,
) -> ShardResult:
    """`experts_format` (experts_format.py; default native: the experts in `dtype`) is how the experts are
    written; dense weights are always in `dtype`."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out).absolute()
    fmt = experts_format or ExpertsFormat()
    ckpt = open_checkpoint(src, check=False)  # validated by _check_target unless OUT already holds its store
    try:
        target = _target_dtype(ckpt, dtype)
        fmt.check_shapes({k: tuple(v) for k, v in ckpt.family.expert_part_shapes(ckpt.config).items()
                          if is_weight(k)})
    except Exception:
        validate(ckpt)  # what is wrong with the checkpoint is said first, as when it was validated on opening
        raise
    if _check_target(out, ckpt, target, force, fmt):
        return ShardResult(out, 0, time.perf_counter() - t0, reused=True)
    ensure_dir(out.parent)  # (after the checkpoint was validated: a bad one leaves no new folder)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.{_PARTIAL}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        _own(tmp, out)
        written = _write_store(ckpt, target, fmt, tmp, progress, source or {"path": str(src.absolute())})
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
        # marked before it moves aside, so a run killed after the move leaves what the next may remove
        (out / _OWNER).unlink(missing_ok=True)
        _own(out, out)
        old = out.parent / f".{out.name}.{_OLD}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(out, old)
        except BaseException:
            (out / _OWNER).unlink(missing_ok=True)
            raise
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:  # put the previous store back rather than leave none
            os.rename(old, out)
            (out / _OWNER).unlink(missing_ok=True)
        raise
    (out / _OWNER).unlink()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_store(ckpt: Checkpoint, target: torch.dtype, fmt: ExpertsFormat, tmp: Path, progress: Progress | None,
                 source: dict[str, Any]) -> int:
    fam, shape = ckpt.family, ckpt.family.moe_shape(ckpt.config)
    esize = torch.tensor([], dtype=target).element_size()
    total = sum(t.nbytes // t.dtype.itemsize * esize for t in ckpt.tensors.values())
    done = 0
    files = source_files(ckpt)  # before reading: a file changed while we read does not look unchanged later
    digests: dict[str, str] = {}

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    experts = _write_experts(ckpt, target, fmt, tmp, tick, digests)
    dense = _write_dense(ckpt, target, tmp, tick, digests)
    sides = []
    for p in side_files(ckpt.path):
        data = read_capped(p, MAX_SIDE_BYTES, str(p), CheckpointError, follow=True)
        fd = os.open(tmp / p.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        sides.append({"file": p.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    content = content_digest(digests)
    config = dict(ckpt.config)
    config["dtype"] = config["torch_dtype"] = DTYPE_NAMES_BY_TORCH[target]
    if fam.reads_mxfp4(ckpt.config):  # the store holds the experts dequantized: a plain model of that dtype
        source = {**source, "quantization": config.pop("quantization_config")}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if fmt.quantized else NATIVE_FORMAT_VERSION,
        "created_by": f"adapmoe {__version__}",
        "model_type": fam.model_type,
        "config": config,
        "dtype": DTYPE_NAMES_BY_TORCH[target],
        "alignment": ALIGNMENT,
        "num_moe_layers": len(shape.moe_layers),
        "source": {**source, "fingerprint": fingerprint(ckpt, target, content, fmt), "content": content,
                   "files": files},
        "dense": dense,
        "side_files": sides,
        "experts": experts,
    }
    if fmt.quantized:
        manifest["experts_format"] = fmt.spec()
    manifest["manifest_sha256"] = manifest_digest(manifest)
    data = json.dumps(manifest, indent=1).encode()
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    Store.open(tmp)  # what we wrote reads back
    return done


DTYPE_NAMES_BY_TORCH = {v: k for k, v in TORCH_DTYPE_BY_NAME.items()}


def _write_experts(ckpt: Checkpoint, target: torch.dtype, fmt: ExpertsFormat, tmp: Path,
                   tick: Callable[[int], None], digests: dict[str, str]) -> list[dict[str, Any]]:
    fam, shape = ckpt.family, ckpt.family.moe_shape(ckpt.config)
    (tmp / "experts").mkdir()
    # the layout is the same for every expert: each part starts on an aligned offset
    layout = ExpertLayout.of(fam, ckpt.config, DTYPE_NAMES_BY_TORCH[target], fmt)
    where = {t.name: t for t in layout.tensors}
    stride, nbytes = layout.stride, layout.nbytes
    tensors = [t.to_json() for t in layout.tensors]
    entries = []
    payload = bytearray(stride)
    native = ExpertsFormat()
    hashers: dict[str, Any] = {}  # a fused family's stacked tensors, hashed row by row
    mxfp4 = fam.fused.mxfp4 if fam.fused is not None and fam.reads_mxfp4(ckpt.config) else ()
    keep_mxfp4 = bool(mxfp4) and fmt.name == "mxfp4"
    for layer in shape.moe_layers:
        rel = f"experts/layer-{layer:03d}.bin"
        fd = os.open(tmp / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            for e in range(shape.num_experts):
                payload[:] = bytes(stride)
                if fam.fused is not None and keep_mxfp4:  # the published codes and scales, byte for byte
                    parts = _split_mxfp4(fam, ckpt, layer, e, hashers)
                elif fam.fused is not None:  # one row of each stacked tensor: this expert only
                    parts = fam.fused.split({kind: _read_fused(ckpt, name.format(layer=layer), e, hashers,
                                                               kind in mxfp4)
                                             for kind, name in fam.fused.tensors.items()})
                else:
                    parts = {part: ckpt.read(fam.expert_tensor_name(layer, e, part), digests)
                             for part in fam.expert_parts}
                for part in fam.expert_parts:
                    w = parts.pop(part)
                    encoded = w if isinstance(w, dict) else (fmt if is_weight(part) else native).encode(w, target)
                    for suffix, t in encoded.items():
                        s = where[part + suffix]
                        assert t.nbytes == s.nbytes and tuple(t.shape) == s.shape, (part + suffix, t.shape, s)
                        payload[s.offset : s.offset + s.nbytes] = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                _write_all(fd, payload)
                entries.append({
                    "layer": layer, "expert": e, "file": rel, "offset": e * stride, "length": stride,
                    "nbytes": nbytes, "sha256": hashlib.sha256(memoryview(payload)[:nbytes]).hexdigest(),
                    "tensors": tensors,
                })
                tick(sum(p.nbytes for p in layout.tensors))
            os.fsync(fd)
        finally:
            os.close(fd)
    digests.update({name: h.hexdigest() for name, (h, _) in hashers.items()})
    return entries


def _read_fused(ckpt: Checkpoint, name: str, expert: int, hashers: dict[str, Any], mxfp4: bool) -> torch.Tensor:
    """One expert's row of a stacked tensor; of an MXFP4 one, its blocks and scales dequantized (float32,
    exact) and transposed to the row layout of the unquantized checkpoint."""
    if not mxfp4:
        return ckpt.read_row(name, expert, hashers)
    blocks = ckpt.read_row(name + "_blocks", expert, hashers)
    scales = ckpt.read_row(name + "_scales", expert, hashers)
    return dequantize_mxfp4(blocks, scales).T


def _split_mxfp4(fam: Any, ckpt: Checkpoint, layer: int, expert: int, hashers: dict[str, Any]) -> dict[str, Any]:
    """One expert of an MXFP4 checkpoint into the mxfp4 format's parts without decoding: the family's split
    only slices and transposes along the output axis, so it applies to the codes and to the scales as they
    are (each transposed like the unquantized row); biases as read."""
    rows, codes, scales = {}, {}, {}
    for kind, template in fam.fused.tensors.items():
        name = template.format(layer=layer)
        if kind in fam.fused.mxfp4:
            blocks = ckpt.read_row(name + "_blocks", expert, hashers)  # [out, in/32, 16]
            codes[kind] = blocks.reshape(blocks.shape[0], -1).T  # [in/2, out], as the row [in, out]
            scales[kind] = ckpt.read_row(name + "_scales", expert, hashers).T  # [in/32, out]
        else:
            rows[kind] = ckpt.read_row(name, expert, hashers)
    q, s = fam.fused.split({**rows, **codes}), fam.fused.split({**rows, **scales})
    return {part: ({".q": q[part], ".s": s[part]} if is_weight(part) else q[part]) for part in fam.expert_parts}


def _write_dense(ckpt: Checkpoint, target: torch.dtype, tmp: Path, tick: Callable[[int], None],
                 digests: dict[str, str]) -> list[dict[str, Any]]:
    from safetensors.torch import save

    fam = ckpt.family
    names = sorted((n for n in ckpt.tensors if not fam.is_expert_tensor(n)), key=_natural)
    files: list[dict[str, Any]] = []
    chunk: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal chunk, size
        if not chunk:
            return
        name = f"dense-{len(files) + 1:05d}.safetensors"
        data = save(chunk, metadata={"format": "pt"})
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        files.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        chunk, size = {}, 0

    for n in names:
        t = ckpt.read(n, digests)
        if t.is_floating_point():
            t = t.to(target)
        chunk[n] = t.contiguous()
        size += t.numel() * t.element_size()
        tick(t.numel() * t.element_size())
        if size >= DENSE_CHUNK_BYTES:
            flush()
    flush()
    return files
