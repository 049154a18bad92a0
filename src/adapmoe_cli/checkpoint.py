"""Reads a local Hugging Face checkpoint directory (config.json, `*.safetensors`, optional index) without
loading it: the safetensors headers give every tensor's file, dtype, shape and byte range, so a caller can
stream one tensor at a time. Validates names and shapes against the config before anything is written."""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapmoe_cli.errors import CheckpointError
from adapmoe_cli.families import ModelFamily, get_family
from adapmoe_cli.families.base import quant_method
from adapmoe_cli.safe_io import MAX_DOC_BYTES, open_regular, parse_json, read_capped, relative_name

#: safetensors' own cap on a header
MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
TORCH_DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: files copied along with the weights when present
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    family: ModelFamily
    tensors: dict[str, TensorInfo]

    def read(self, name: str, digests: dict[str, str] | None = None) -> torch.Tensor:
        """One tensor, read with a positioned read (no mmap, so memory is freed when dropped). With
        `digests`, the sha256 of the bytes read is recorded under the tensor's name (the fingerprint)."""
        info = self.tensors[name]
        buf = self.read_bytes(name)
        if digests is not None:
            digests[name] = hashlib.sha256(buf).hexdigest()
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def read_row(self, name: str, index: int, hashers: dict[str, Any]) -> torch.Tensor:
        """Row `index` (along dim 0) of a stacked tensor: one expert of a fused family. Rows must be read in
        order, 0 first; `hashers[name]` then ends as the sha256 of the whole tensor (the fingerprint's)."""
        info = self.tensors[name]
        row = info.nbytes // info.shape[0]
        h = hashers.setdefault(name, [hashlib.sha256(), 0])
        assert h[1] == index, f"rows of {name} read out of order"
        buf = self.read_bytes(name, info.offset + index * row, row)
        h[0].update(buf)
        h[1] += 1
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape[1:]) if row else \
            torch.empty(info.shape[1:], dtype=info.dtype)

    def read_bytes(self, name: str, offset: int | None = None, nbytes: int | None = None) -> bytearray:
        info = self.tensors[name]
        nbytes = info.nbytes if nbytes is None else nbytes
        buf = bytearray(nbytes)
        fd = open_regular(info.file, info.file.name, CheckpointError, follow=True)
        try:
            with os.fdopen(fd, "rb") as f:
                f.seek(info.offset if offset is None else offset)
                n = f.readinto(buf)
        except OSError as e:
            raise CheckpointError(f"{info.file.name} cannot be read ({e.strerror})") from None
        if n != nbytes:
            raise CheckpointError(f"{info.file.name} is truncated: tensor {name} ends past the end of the file")
        return buf

    def digests(self) -> dict[str, str]:
        """Tensor name → sha256 of its bytes, reading every tensor once in file order."""
        out: dict[str, str] = {}
        for info in sorted(self.tensors.values(), key=lambda t: (str(t.file), t.offset)):
            out[info.name] = hashlib.sha256(self.read_bytes(info.name)).hexdigest()
        return out


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse the header of one safetensors file (8-byte little-endian length, then JSON) and check every
    tensor's byte range lies inside the file, so truncation is caught before any data is used."""
    fd = open_regular(path, path.name, CheckpointError, follow=True)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw_len = f.read(8)
        hlen = struct.unpack("<Q", raw_len)[0] if len(raw_len) == 8 else 0
        raw = f.read(min(hlen, MAX_HEADER_BYTES, max(size - 8, 0)))
    return parse_safetensors_header(raw_len + raw, size, path)


def _ints(value: Any, count: int | None) -> tuple[int, ...]:
    if not isinstance(value, list) or (count is not None and len(value) != count):
        raise ValueError(value)
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in value):
        raise ValueError(value)
    return tuple(value)


def parse_safetensors_header(head: bytes, size: int, path: Path) -> dict[str, TensorInfo]:
    """The header check on the file's first bytes (`head`: the length field and the JSON) and its `size`:
    every entry a known dtype, a shape and a byte range [start, end) inside the data, agreeing with each
    other; no two tensors overlapping. Everything wrong is a CheckpointError."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path.name} is not a valid safetensors file ({why}); re-download it")

    if len(head) < 8:
        raise bad("file shorter than its header")
    (hlen,) = struct.unpack("<Q", head[:8])
    if hlen > min(size - 8, MAX_HEADER_BYTES) or len(head) < 8 + hlen:
        raise bad("header length is larger than the file")
    try:
        header = parse_json(bytes(head[8 : 8 + hlen]), "the header", CheckpointError)
    except CheckpointError as e:
        raise bad(str(e)) from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            start, end = _ints(meta["data_offsets"], 2)
            shape = _ints(meta["shape"], None)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: unreadable header entry for {name}; re-download it") from None
        if end < start:
            raise CheckpointError(f"{path.name}: tensor {name} has a byte range that ends before it starts")
        if base + end > size:
            raise CheckpointError(
                f"{path.name} is truncated ({size} bytes, tensor {name} needs {base + end}); re-download it"
            )
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * torch.tensor([], dtype=dtype).element_size():
            raise CheckpointError(f"{path.name}: tensor {name} has a byte range that disagrees with its shape")
        out[name] = TensorInfo(name, path, dtype, shape, base + start, end - start)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in out.values() if t.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise CheckpointError(f"{path.name}: tensors {a} and {b} overlap; re-download it")
    return out


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        files = parse_index(read_capped(index, MAX_DOC_BYTES, str(index), CheckpointError, follow=True), index)
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} named in the index is missing; re-download it")
        return [path / f for f in files]
    if single.exists():
        return [single]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        raise CheckpointError(
            f"{path}: {len(shards)} safetensors shards but no model.safetensors.index.json; "
            "download the index file too"
        )
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(
            f"{path} holds only pickle weights (*.bin/*.pt), which adapmoe never loads; "
            "use a checkpoint with safetensors files"
        )
    raise CheckpointError(f"{path} has no safetensors weights (model.safetensors or an index)")


def parse_index(data: bytes, index: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` names: plain names inside its folder."""
    doc = parse_json(data, str(index), CheckpointError)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid safetensors index; re-download it")
    return sorted({relative_name(f, str(index), CheckpointError) for f in weight_map.values()})


def open_checkpoint(path: Path, check: bool = True) -> Checkpoint:
    """Read config and headers of a checkpoint directory; raise CheckpointError when it cannot be used.
    `check=False` leaves out `validate` (building the model's skeleton: transformers' import, seconds), which
    the caller then runs where it needs it (`shard` does not, for a store it made from these same files)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give the folder that holds config.json")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    config = parse_json(read_capped(cfg_path, MAX_DOC_BYTES, str(cfg_path), CheckpointError, follow=True),
                        str(cfg_path), CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object")
    family = get_family(config.get("model_type"))
    try:
        family.moe_shape(config)
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    method = quant_method(config)
    if method is not None and not family.reads_mxfp4(config):
        raise CheckpointError(f"{cfg_path}: the weights are quantized ({method}), which adapmoe does not read for "
                              f"{family.model_type}; use a bf16/float16 checkpoint of the model (then --experts-format "
                              "int8/int4 quantizes the experts)")
    tensors: dict[str, TensorInfo] = {}
    for f in _weight_files(path):
        tensors.update(read_safetensors_header(f))
    ckpt = Checkpoint(path, config, family, tensors)
    if check:
        validate(ckpt)
    return ckpt


def validate(ckpt: Checkpoint) -> None:
    """Every expected tensor present with the config's shape, and nothing unexpected."""
    from adapmoe_cli.skeleton import config_errors, describe, expected_dense_tensors

    fam, cfg = ckpt.family, ckpt.config
    try:
        expected = expected_dense_tensors(fam, cfg)
    except config_errors() as e:
        raise CheckpointError(f"{ckpt.path}/config.json cannot build a {fam.model_type} model: {describe(e)}"
                              ) from None
    expected.update(fam.expert_tensor_shapes(cfg))
    have = set(ckpt.tensors)
    missing = sorted(set(expected) - have, key=_natural)
    extra = sorted(have - set(expected), key=_natural)
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: {len(missing)} tensor(s) missing, e.g. {missing[0]}; the checkpoint is incomplete"
        )
    if extra:
        raise CheckpointError(
            f"{ckpt.path}: {len(extra)} unexpected tensor(s), e.g. {extra[0]}; "
            "does config.json belong to these weights?"
        )
    for name, want in expected.items():
        got = ckpt.tensors[name].shape
        if tuple(got) != tuple(want):
            raise CheckpointError(
                f"{ckpt.path}: {name} has shape {list(got)} but config.json implies {list(want)}"
            )


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in name.replace(".", " . ").split()]


def side_files(path: Path) -> list[Path]:
    return [path / n for n in SIDE_FILES if (path / n).is_file()]
