"""The store's `manifest.json` and the read-only `Store` view of it. A store may come from anywhere (a
copied folder, a network drive, a download), so opening one checks the whole manifest before anything
trusts it: its own checksum, every (layer, expert) listed exactly once with the layout the config implies,
every path a plain name inside the store. Reading bytes (dense, side files) checks them against it.

Layout of a store directory:
    manifest.json              this file's format; written last, so its presence means "complete"
    dense-0000N.safetensors    every non-expert tensor, hub names, in chunks of ~256 MiB
    experts/layer-LLL.bin      the experts of one layer, each at a 4096-aligned offset, zero padded
    tokenizer.json, …          tokenizer, chat template and generation config copied from the source

Format versions: 3 adds `experts_format` (quantized experts, experts_format.py; a store of native experts
is still written as version 2, so older adapmoe reads it); 2 adds `manifest_sha256` (over the rest of the
manifest) and `source.files` (what `shard` compares before reusing a store); version 1 stores are read
without the manifest check.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from adapmoe_cli.budget import CacheShape
from adapmoe_cli.checkpoint import SIDE_FILES, TORCH_DTYPE_BY_NAME
from adapmoe_cli.errors import AdapmoeError, StoreError
from adapmoe_cli.experts_format import QUANT_ALIGNMENT, ExpertsFormat, from_spec
from adapmoe_cli.families import ModelFamily, MoEShape, get_family, is_weight
from adapmoe_cli.paths import MANIFEST, not_a_store
from adapmoe_cli.safe_io import MAX_MANIFEST_BYTES, inside, read_capped, relative_name
from adapmoe_cli.versioned import parse_versioned, read_versioned

FORMAT = "adapmoe-store"
FORMAT_VERSION = 3
#: the version a store of native (unquantized) experts is written as
NATIVE_FORMAT_VERSION = 2
ALIGNMENT = 4096
REMEDY = "adapmoe shard --force"
#: store dtypes (the names `--dtype` takes) and torch's
STORE_DTYPES = TORCH_DTYPE_BY_NAME
#: dtypes of the tensors inside an expert (quantized formats hold integers)
TENSOR_DTYPES = {**TORCH_DTYPE_BY_NAME, "int8": torch.int8, "uint8": torch.uint8}
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorSlice:
    """One tensor inside an expert's byte range: `offset` is relative to the expert's start."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "offset": self.offset,
                "nbytes": self.nbytes}


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    file: str
    offset: int  # 4096-aligned start in `file`
    length: int  # bytes to read: payload rounded up to the alignment
    nbytes: int  # payload bytes (what the checksum covers; the rest of `length` is zeros)
    sha256: str
    tensors: tuple[TensorSlice, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "expert": self.expert, "file": self.file, "offset": self.offset,
            "length": self.length, "nbytes": self.nbytes, "sha256": self.sha256,
            "tensors": [t.to_json() for t in self.tensors],
        }


@dataclass(frozen=True)
class FileEntry:
    file: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ExpertLayout:
    """Where each part of an expert sits: the same for every expert of a store."""

    tensors: tuple[TensorSlice, ...]
    nbytes: int  # from the first part's start to the last part's end
    stride: int  # nbytes rounded up to the alignment: one slot, one read

    @staticmethod
    def of(family: ModelFamily, config: dict[str, Any], dtype: str, fmt: ExpertsFormat | None = None) -> ExpertLayout:
        """Each part starts on a 4096-byte boundary, in the family's order; in a quantized format each part is
        its tensors (`w1.q`, `w1.s`, …), each on a 64-byte boundary."""
        fmt = fmt or ExpertsFormat()
        shapes = family.expert_part_shapes(config)
        parts, off = [], 0
        for part in family.expert_parts:
            for sub in (fmt if is_weight(part) else ExpertsFormat()).subs(tuple(shapes[part]), dtype):
                nbytes = math.prod(sub.shape) * TENSOR_DTYPES[sub.dtype].itemsize
                parts.append(TensorSlice(part + sub.suffix, sub.shape, sub.dtype, off, nbytes))
                off = align(off + nbytes, QUANT_ALIGNMENT if fmt.quantized else ALIGNMENT)
        nbytes = parts[-1].offset + parts[-1].nbytes
        return ExpertLayout(tuple(parts), nbytes, align(nbytes))


def align(n: int, to: int = ALIGNMENT) -> int:
    return -(-n // to) * to


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its `manifest_sha256` field, in one canonical JSON form."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _int(d: dict[str, Any], key: str, what: str, lo: int = 0) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{what}: {key} must be an integer ≥ {lo}, got {v!r}")
    return v


def _sha(d: dict[str, Any], what: str) -> str:
    v = d.get("sha256")
    if not isinstance(v, str) or not _SHA256.fullmatch(v):
        raise ValueError(f"{what}: sha256 must be 64 lowercase hex digits")
    return v


def _files(entries: Any, what: str, allowed: tuple[str, ...] | None = None) -> list[FileEntry]:
    if not isinstance(entries, list):
        raise ValueError(f"{what} is not a list")
    out, seen = [], set()
    for d in entries:
        if not isinstance(d, dict):
            raise ValueError(f"{what} holds {d!r}, not a file entry")
        name = relative_name(d.get("file"), what, StoreError)
        if name in seen or (allowed is not None and name not in allowed):
            why = "twice" if name in seen else f"(a store's side files can only be {', '.join(allowed or ())})"
            raise ValueError(f"{what} lists {name!r} {why}")
        seen.add(name)
        out.append(FileEntry(name, _int(d, "bytes", f"{what} {name}"), _sha(d, f"{what} {name}")))
    return out


def _experts(entries: Any, shape: MoEShape, layout: ExpertLayout) -> dict[tuple[int, int], ExpertEntry]:
    """Every (MoE layer, expert) exactly once, each with the one layout the config implies."""
    if not isinstance(entries, list):
        raise ValueError("experts is not a list")
    want = len(shape.moe_layers) * shape.num_experts
    if len(entries) != want:
        raise ValueError(f"it lists {len(entries)} experts, the config implies {len(shape.moe_layers)} MoE layers × "
                         f"{shape.num_experts} = {want}")
    layers = set(shape.moe_layers)
    tensors = [t.to_json() for t in layout.tensors]
    out: dict[tuple[int, int], ExpertEntry] = {}
    spans: set[tuple[str, int]] = set()
    for d in entries:
        if not isinstance(d, dict):
            raise ValueError(f"experts holds {d!r}, not an expert entry")
        key = (_int(d, "layer", "expert entry"), _int(d, "expert", "expert entry"))
        what = f"expert {key}"
        if key[0] not in layers or key[1] >= shape.num_experts:
            raise ValueError(f"{what} is not one of this model's experts")
        if key in out:
            raise ValueError(f"{what} is listed twice")
        file = relative_name(d.get("file"), what, StoreError)
        offset = _int(d, "offset", what)
        if offset % ALIGNMENT or (file, offset) in spans:
            raise ValueError(f"{what}: offset {offset} is not 4096-aligned or is another expert's")
        spans.add((file, offset))
        if (_int(d, "length", what), _int(d, "nbytes", what)) != (layout.stride, layout.nbytes):
            raise ValueError(f"{what}: length/nbytes {d['length']}/{d['nbytes']} differ from the layout's "
                             f"{layout.stride}/{layout.nbytes}")
        if d.get("tensors") != tensors:
            raise ValueError(f"{what}: its tensors differ from the layout the config implies "
                             f"({', '.join(f'{t.name} {list(t.shape)} at {t.offset}' for t in layout.tensors)})")
        out[key] = ExpertEntry(key[0], key[1], file, offset, layout.stride, layout.nbytes, _sha(d, what),
                               layout.tensors)
    return out  # the count was right and none is listed twice or out of range: all are there


class Store:
    """A store on disk, as its manifest describes it. Opening reads and checks only the manifest."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        """Validate `manifest` (already parsed by `parse_versioned`); ValueError/StoreError say what is wrong."""
        self.path = Path(path)
        self.manifest = manifest
        m = manifest
        if not isinstance(m.get("config"), dict):
            raise ValueError("config is not an object")
        self.config: dict[str, Any] = m["config"]
        try:
            self.family: ModelFamily = get_family(m.get("model_type"))
        except AdapmoeError as e:
            raise ValueError(str(e)) from None
        if self.config.get("model_type") != self.family.model_type:
            raise ValueError(f"config's model_type {self.config.get('model_type')!r} is not {self.family.model_type!r}")
        if m.get("dtype") not in STORE_DTYPES:
            raise ValueError(f"dtype {m.get('dtype')!r} is not one of {', '.join(STORE_DTYPES)}")
        self.dtype_name: str = m["dtype"]
        self.shape: MoEShape = self.family.moe_shape(self.config)
        if "experts_format" in m and m["format_version"] < 3:
            raise ValueError(f"experts_format is not part of format version {m['format_version']}")
        self.experts_format: ExpertsFormat = from_spec(m.get("experts_format"))
        self.layout = ExpertLayout.of(self.family, self.config, self.dtype_name, self.experts_format)
        self.experts: dict[tuple[int, int], ExpertEntry] = _experts(m.get("experts"), self.shape, self.layout)
        self.dense_files = _files(m.get("dense"), "dense")
        if not self.dense_files:
            raise ValueError("it lists no dense files")
        self.side_files = _files(m.get("side_files"), "side_files", SIDE_FILES)
        if not isinstance(m.get("source", {}), dict):
            raise ValueError("source is not an object")
        #: experts whose bytes this process has checked against the manifest (store/reader.py); later reads
        #: of the same expert trust the disk not to change under a running process
        self.checked_experts: set[tuple[int, int]] = set()

    @staticmethod
    def open(path: Path) -> Store:
        path = Path(path)
        problem = not_a_store(path)
        if problem is not None:
            raise StoreError(problem)
        mpath = inside(path, MANIFEST, f"{path / MANIFEST}", StoreError)
        manifest = read_versioned(mpath, FORMAT, FORMAT_VERSION, StoreError, "store", REMEDY, MAX_MANIFEST_BYTES)
        return Store.from_manifest(path, manifest)

    @staticmethod
    def from_bytes(path: Path, data: bytes) -> Store:
        """A store from its manifest's bytes (what `open` does after reading; the fuzz target's entry)."""
        manifest = parse_versioned(data, Path(path) / MANIFEST, FORMAT, FORMAT_VERSION, StoreError, "store", REMEDY)
        return Store.from_manifest(path, manifest)

    @staticmethod
    def from_manifest(path: Path, manifest: dict[str, Any]) -> Store:
        """Check the manifest's own checksum (format 2 on), then everything in it."""
        if manifest["format_version"] >= 2 and manifest.get("manifest_sha256") != manifest_digest(manifest):
            raise StoreError(f"{Path(path) / MANIFEST} is damaged: its checksum does not match its content "
                             f"(bit rot or an edit); re-run `{REMEDY}`")
        try:
            return Store(path, manifest)
        except (KeyError, TypeError, ValueError, StoreError) as e:
            raise StoreError(f"{Path(path) / MANIFEST} is malformed ({e}); re-run `{REMEDY}`") from None

    @property
    def dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.dtype_name]

    @property
    def expert_payload_bytes(self) -> int:
        """The span of one expert's bytes: its parts, each starting 4096-aligned, up to the end of the last
        one — what the sha256 covers (every expert has the same layout)."""
        return self.layout.nbytes

    @property
    def slot_bytes(self) -> int:
        """What one cache slot holds and one read moves: the expert's parts, each 4096-aligned."""
        return self.layout.stride

    @cached_property
    def cache_shape(self) -> CacheShape:
        """What an expert budget is measured against (`budget.py`)."""
        s = self.shape
        return CacheShape(tuple(s.moe_layers), s.num_experts, s.top_k, self.slot_bytes, self.dense_bytes)

    @property
    def dense_bytes(self) -> int:
        return sum(f.bytes for f in self.dense_files)

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + sum(e.nbytes for e in self.experts.values())

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("source", {}).get("fingerprint", ""))

    def file_path(self, name: str) -> Path:
        """A file the manifest names, inside the store (a link leading out is refused)."""
        return inside(self.path, name, str(self.path / name), StoreError)

    def read_checked(self, entry: FileEntry) -> bytes:
        """A dense or side file's bytes, checked against the manifest's size and sha256 (read once: what is
        checked is what is used)."""
        data = read_capped(self.file_path(entry.file), entry.bytes, entry.file, StoreError)
        if len(data) != entry.bytes:
            raise StoreError(f"{entry.file} has {len(data)} bytes, the manifest says {entry.bytes}; the store is "
                             f"damaged, re-run `{REMEDY}`")
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreError(f"{entry.file} is corrupted (sha256 mismatch); re-run `{REMEDY}`")
        return data

    def side_file(self, name: str) -> bytes | None:
        """A side file's checked bytes, or None when the store has none of that name."""
        entry = next((f for f in self.side_files if f.file == name), None)
        return None if entry is None else self.read_checked(entry)

    def load_dense(self) -> dict[str, torch.Tensor]:
        """Hub name → tensor for every dense weight. Each file is read once, checked, and its tensors are
        views of those very bytes (no second read that could differ from what was checked)."""
        from adapmoe_cli.checkpoint import parse_safetensors_header
        from adapmoe_cli.errors import CheckpointError

        out: dict[str, torch.Tensor] = {}
        for f in self.dense_files:
            data = self.read_checked(f)
            try:
                infos = parse_safetensors_header(data, len(data), Path(f.file))
            except CheckpointError as e:
                raise StoreError(f"{e}".replace("re-download it", f"re-run `{REMEDY}`")) from None
            for name, t in infos.items():
                count = t.nbytes // t.dtype.itemsize
                out[name] = (torch.frombuffer(data, dtype=t.dtype, count=count, offset=t.offset).view(t.shape)
                             if count else torch.empty(t.shape, dtype=t.dtype))
        return out

    def info(self) -> dict[str, Any]:
        s = self.shape
        return {
            "path": str(self.path),
            "model_type": self.family.model_type,
            "num_layers": s.num_layers,
            "moe_layers": len(s.moe_layers),
            "sparse_layers": list(s.moe_layers),
            "router_renormalises": self.family.router_renormalises(self.config),
            "num_experts": s.num_experts,
            "experts_per_token": s.top_k,
            "hidden_size": s.hidden_size,
            "intermediate_size": s.intermediate_size,
            # one expert's bytes, parts 4096-aligned, to the end of the last (what its sha256 covers) …
            "expert_payload_bytes": self.expert_payload_bytes,
            # … and what one cache slot holds and one read moves: that span rounded up to 4096
            "expert_slot_bytes": self.slot_bytes,
            "experts_total": len(self.experts),
            "dense_bytes": self.dense_bytes,
            "total_bytes": self.total_bytes,
            "dtype": self.dtype_name,
            "experts_format": self.experts_format.label(),
            "expert_bits_per_weight": round(self.experts_format.weight_bits(
                {k: v for k, v in self.family.expert_part_shapes(self.config).items() if is_weight(k)},
                self.dtype.itemsize), 3),
            "format_version": self.manifest["format_version"],
            "source": self.manifest.get("source", {}),
        }
