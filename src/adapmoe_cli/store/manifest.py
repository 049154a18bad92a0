"""The store's `manifest.json` (format version 1) and the read-only `Store` view of it.

Layout of a store directory:
    manifest.json              this file's format; written last, so its presence means "complete"
    dense-0000N.safetensors    every non-expert tensor, hub names, in chunks of ~256 MiB
    experts/layer-LLL.bin      the experts of one layer, each at a 4096-aligned offset, zero padded
    tokenizer.json, …          tokenizer, chat template and generation config copied from the source
    .verified.json             sizes and mtimes of the files the last full verification saw
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from adapmoe_cli.budget import CacheShape
from adapmoe_cli.errors import StoreError
from adapmoe_cli.families import ModelFamily, MoEShape, get_family
from adapmoe_cli.versioned import read_versioned

FORMAT = "adapmoe-store"
FORMAT_VERSION = 1
ALIGNMENT = 4096
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TensorSlice:
    """One tensor inside an expert's byte range: `offset` is relative to the expert's start."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    file: str
    offset: int  # 4096-aligned start in `file`
    length: int  # bytes to read: payload rounded up to the alignment
    nbytes: int  # payload bytes (what the checksum covers)
    sha256: str
    tensors: tuple[TensorSlice, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "expert": self.expert, "file": self.file, "offset": self.offset,
            "length": self.length, "nbytes": self.nbytes, "sha256": self.sha256,
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "offset": t.offset,
                 "nbytes": t.nbytes} for t in self.tensors
            ],
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> ExpertEntry:
        return ExpertEntry(
            layer=int(d["layer"]), expert=int(d["expert"]), file=str(d["file"]), offset=int(d["offset"]),
            length=int(d["length"]), nbytes=int(d["nbytes"]), sha256=str(d["sha256"]),
            tensors=tuple(
                TensorSlice(t["name"], tuple(t["shape"]), t["dtype"], int(t["offset"]), int(t["nbytes"]))
                for t in d["tensors"]
            ),
        )


@dataclass(frozen=True)
class FileEntry:
    file: str
    bytes: int
    sha256: str


def is_store(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class Store:
    """A store on disk, as its manifest describes it. Opening reads only the manifest."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self.config: dict[str, Any] = manifest["config"]
        self.family: ModelFamily = get_family(manifest["model_type"])
        self.dtype_name: str = manifest["dtype"]
        self.experts: dict[tuple[int, int], ExpertEntry] = {
            (e.layer, e.expert): e for e in map(ExpertEntry.from_json, manifest["experts"])
        }
        self.dense_files = [FileEntry(**f) for f in manifest["dense"]]
        self.side_files = [FileEntry(**f) for f in manifest["side_files"]]

    @staticmethod
    def open(path: Path) -> Store:
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path} does not exist")
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{path} is not an adapmoe store (no {MANIFEST}); make one with `adapmoe shard`")
        manifest = read_versioned(mpath, FORMAT, FORMAT_VERSION, StoreError, "store", "adapmoe shard --force")
        try:
            return Store(path, manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{mpath} is malformed ({e!r}); re-run `adapmoe shard --force`") from None

    @cached_property
    def shape(self) -> MoEShape:
        return self.family.moe_shape(self.config)

    @property
    def dtype(self) -> torch.dtype:
        from adapmoe_cli.checkpoint import TORCH_DTYPE_BY_NAME

        return TORCH_DTYPE_BY_NAME[self.dtype_name]

    @property
    def expert_payload_bytes(self) -> int:
        """The span of one expert's bytes: its parts, each starting 4096-aligned, up to the end of the last
        one — what the sha256 covers (every expert has the same layout)."""
        return next(iter(self.experts.values())).nbytes

    @cached_property
    def slot_bytes(self) -> int:
        """What one cache slot holds and one read moves: the expert's parts, each 4096-aligned."""
        return max(e.length for e in self.experts.values())

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

    def load_dense(self) -> dict[str, torch.Tensor]:
        """Hub name → tensor for every dense weight (memory-mapped by safetensors)."""
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for f in self.dense_files:
            out.update(load_file(self.path / f.file))
        return out

    def info(self) -> dict[str, Any]:
        s = self.shape
        return {
            "path": str(self.path),
            "model_type": self.family.model_type,
            "num_layers": s.num_layers,
            "moe_layers": len(s.moe_layers),
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
            "format_version": self.manifest["format_version"],
            "source": self.manifest.get("source", {}),
        }
