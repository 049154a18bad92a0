"""How a store holds its experts and how a layer computes with them: `native` (the store's dtype, as
before), `int8` (per output channel, symmetric), `int4` and `int2` (group-wise, affine, the scales and
zeros chosen by HQQ's half-quadratic optimiser, the anchors' quantizer), and `mxfp4` (the OCP microscaling
FP4 that GPT-OSS is published in, kept as the checkpoint had it).

Compute uses PyTorch's own CPU kernels (docs/quantization.md has the measurement behind the choice):
`torch._weight_int8pack_mm` (int8 weights × per-channel scales) and `torch._weight_int4pack_mm_for_cpu`
(int4 weights in the kernel's packed layout × group scales and zeros, w = (q − 8)·scale + zero). Both
read the weights straight from the cache slot's bytes, no copy. 2-bit values are stored four to a byte,
arranged so that two masks and an add (four bytes at a time, into a reused buffer) widen them to the int4
layout; then the int4 kernel runs. The kernels are fast with bfloat16 activations (the default:
`quantized_activations`); with `model` activations a float32 model runs them in float32 — exact, slower.

Each expert part (e.g. `w1`, [N, K]) becomes tensors named `PART.q` (the integers) and `PART.s` (scales,
or the kernel's scales-and-zeros) inside the expert's one aligned byte range, so one read still loads one
expert. The int4 kernel's packed layout belongs to this PyTorch: the store records a probe of it (a fixed
pattern packed at shard time) and a runtime whose PyTorch packs differently refuses the store by name."""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from adapmoe_cli.errors import StoreError, UsageError
from adapmoe_cli.format_names import DEFAULT_GROUP, KERNEL_GROUPS, NAMES, check_format
from adapmoe_cli.runtime import row_linear

#: int4/int2 layout name recorded in the store; the probe checks this PyTorch still packs that way
INT4_LAYOUT = "aten-cpu-int4pack"
#: how int2 values share a byte (Int2's docstring); a store packed otherwise is refused
INT2_PACKING = "int4-layout-halves"
#: tensors inside a quantized expert start on this boundary (the expert itself on 4096)
QUANT_ALIGNMENT = 64


@dataclass(frozen=True)
class Sub:
    """One tensor of a part: its name suffix, shape and store dtype name."""

    suffix: str
    shape: tuple[int, ...]
    dtype: str


class ExpertsFormat:
    name = "native"
    bits = 0  # 0: the store's dtype
    group_size: int | None = None

    def spec(self) -> dict[str, Any] | None:
        """What the manifest records (None for native: stores as before)."""
        return None

    @property
    def quantized(self) -> bool:
        return self.name != "native"

    def label(self) -> str:
        return self.name if self.group_size is None else f"{self.name}-g{self.group_size}"

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise UsageError when a part's shape does not suit the format."""

    def subs(self, shape: tuple[int, ...], dtype: str) -> list[Sub]:
        return [Sub("", shape, dtype)]

    def encode(self, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Suffix → tensor for one part [N, K] given in any float dtype."""
        return {"": w.to(dtype).contiguous()}

    def decode(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The part's weights [N, K] in float32 as the compute sees them (dequantized)."""
        return t[""].float()

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], activations: str) -> torch.Tensor:
        return row_linear.linear(x, t[""])  # (one row: by the faster way on this machine)

    def check_runtime(self) -> None:
        """Raise StoreError when this PyTorch cannot compute the store's experts as they were written."""

    def weight_bits(self, shapes: dict[str, tuple[int, ...]], dtype_bytes: int) -> float:
        """Stored bits per weight, scales included."""
        numel = sum(math.prod(s) for s in shapes.values())
        nbytes = sum(math.prod(sub.shape) * _ITEMSIZE.get(sub.dtype, dtype_bytes)
                     for s in shapes.values() for sub in self.subs(s, "store"))
        return 8 * nbytes / numel


_ITEMSIZE = {"int8": 1, "uint8": 1, "bfloat16": 2, "float16": 2, "float32": 4}


def _act(x: torch.Tensor, activations: str) -> torch.Tensor:
    return x.to(torch.bfloat16) if activations == "bfloat16" else x


class Int8(ExpertsFormat):
    """Symmetric per output channel: w = q · scale, q in −127…127, scale in bfloat16."""

    name, bits = "int8", 8

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": 8, "scales": "per output channel, bfloat16"}

    def subs(self, shape: tuple[int, ...], dtype: str) -> list[Sub]:
        return [Sub(".q", shape, "int8"), Sub(".s", shape[:1], "bfloat16")]

    def encode(self, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        w = w.float()
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {".q": q.contiguous(), ".s": scale.contiguous()}

    def decode(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t[".q"].float() * t[".s"].float()[:, None]

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], activations: str) -> torch.Tensor:
        if x.requires_grad:  # the kernels have no derivative: the profiler's gradient pass uses the weights
            return torch.nn.functional.linear(x, self.decode(t).to(x.dtype))
        xa = _act(x, activations)
        return torch._weight_int8pack_mm(xa.contiguous(), t[".q"], t[".s"].to(xa.dtype)).to(x.dtype)


#: columns of an int4 part decoded per kernel call (a multiple of every kernel group size: 256 is the largest)
DECODE_BLOCK = 256


@functools.lru_cache(maxsize=2)  # an expert's two shapes ([I, H] for w1 and w3, [H, I] for w2): export decodes
def _nibble_positions(n: int, k: int) -> torch.Tensor:  # every expert's parts in turn
    """Where `torch._convert_weight_to_int4pack_for_cpu` puts each weight of an [n, k] matrix: for the packed
    bytes' low nibbles, then their high nibbles, the weight's flat index (row · k + column). Learnt by packing
    the rows' and columns' indices four bits at a time (the layout is PyTorch's, not ours to assume); every
    weight must turn up exactly once."""
    def index_of(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = hi = None
        for shift in range(0, max(1, (size - 1).bit_length()), 4):
            digit = torch._convert_weight_to_int4pack_for_cpu(((index >> shift) & 15).contiguous(), 1).long()
            lo = (digit & 15) << shift if lo is None else lo + ((digit & 15) << shift)
            hi = (digit >> 4) << shift if hi is None else hi + ((digit >> 4) << shift)
        return lo, hi

    rows, cols = torch.meshgrid(torch.arange(n, dtype=torch.int32), torch.arange(k, dtype=torch.int32), indexing="ij")
    (r_lo, r_hi), (c_lo, c_hi) = index_of(rows, n), index_of(cols, k)
    flat = torch.cat([(r_lo * k + c_lo).reshape(-1), (r_hi * k + c_hi).reshape(-1)])
    once = torch.ones(n * k, dtype=torch.int64)
    if flat.numel() != n * k or not torch.equal(torch.bincount(flat, minlength=n * k), once):
        raise StoreError("this PyTorch's int4 packing does not hold each weight exactly once: its int4 experts "
                         "cannot be decoded")
    return flat.int() if n * k < 2**31 else flat  # kept (lru_cache): half the memory where it fits


def _unpack4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [n, k] integers (0…15) that `torch._convert_weight_to_int4pack_for_cpu` packed into `packed`."""
    q = torch.empty(n * k, dtype=torch.int32)
    q[_nibble_positions(n, k)] = torch.cat([(packed & 15).reshape(-1), (packed >> 4).reshape(-1)]).int()
    return q.view(n, k)


def _int4_probe() -> str:
    """sha256 of a fixed pattern packed by this PyTorch's int4 CPU packing."""
    q = (torch.arange(32 * 64, dtype=torch.int32).reshape(32, 64) * 7 + 3) % 16
    return hashlib.sha256(torch._convert_weight_to_int4pack_for_cpu(q, 1).numpy().tobytes()).hexdigest()


def _hqq(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ's optimised affine quantization of w [N, K] in groups along K: integers [N, K] (int32),
    scale and zero [N, K / group] with w ≈ (q − zero) · scale."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:  # pragma: no cover - a dependency of the package
        raise UsageError("quantizing experts needs the hqq package: pip install hqq") from None
    n, k = w.shape
    q, meta = Quantizer.quantize(w.float().contiguous(), nbits=bits, group_size=group, optimize=True, axis=1,
                                 bitpack=False, compute_dtype=torch.float32, device="cpu")
    return (q.reshape(n, k).to(torch.int32), meta["scale"].reshape(n, k // group).float(),
            meta["zero"].reshape(n, k // group).float())


class Int4(ExpertsFormat):
    """Group-wise affine 4-bit (HQQ), in the int4 CPU kernel's packed layout: `.q` [N, K/2] uint8, `.s`
    [K/group, N, 2] bfloat16 (scale, zero) with w = (q − 8)·scale + zero."""

    name, bits = "int4", 4
    offset = 0  # what the kernel's value adds to the quantizer's integer

    def __init__(self, group_size: int | None = None, probe: str | None = None):
        self.group_size = group_size or DEFAULT_GROUP[self.name]
        if self.group_size not in KERNEL_GROUPS:
            raise UsageError(f"--group-size {self.group_size} is not one the int4 kernel takes: "
                             f"{', '.join(map(str, KERNEL_GROUPS))}")
        self.probe = probe

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size, "quantizer": "hqq",
                "layout": INT4_LAYOUT, "layout_probe": _int4_probe()}

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for part, (n, k) in shapes.items():
            if k % self.group_size:
                fit = ", ".join(str(g) for g in KERNEL_GROUPS if k % g == 0) or "none of the kernel's"
                raise UsageError(f"--group-size {self.group_size} does not divide expert part {part}'s input "
                                 f"dimension {k}; choose {fit}")
            if n % 16:
                raise UsageError(f"expert part {part} has {n} output rows; the int4 kernel needs a multiple of 16")

    def _q_sub(self, shape: tuple[int, ...]) -> Sub:
        return Sub(".q", (shape[0], shape[1] // 2), "uint8")

    def subs(self, shape: tuple[int, ...], dtype: str) -> list[Sub]:
        n, k = shape
        return [self._q_sub(shape), Sub(".s", (k // self.group_size, n, 2), "bfloat16")]

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integers [N, K] and the kernel's scales-and-zeros [K/group, N, 2] (bfloat16)."""
        q, scale, zero = _hqq(w, self.bits, self.group_size)
        # (q + offset − 8)·scale + Z = (q − zero)·scale  ⇒  Z = (8 − offset − zero)·scale
        sz = torch.stack([scale, scale * (8 - self.offset - zero)], dim=-1).transpose(0, 1).contiguous()
        return q, sz.to(torch.bfloat16)

    def encode(self, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        q, sz = self._quantize(w)
        return {".q": torch._convert_weight_to_int4pack_for_cpu(q, 1).contiguous(), ".s": sz}

    def packed4(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t[".q"]

    def decode(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Through the kernel itself in float32: the identity times the weights (each output is one weight
        times 1 plus zeros: exact). The identity is K × K, so the part is cut along K into blocks of
        `DECODE_BLOCK` (whole groups), each repacked from the part's integers (`_unpack4`) and decoded with its
        own small identity: K · block · N work instead of K² · N (a padded w2 with K = 52k took minutes)."""
        packed, sz = self.packed4(t), t[".s"].float()
        groups, n = sz.shape[0], sz.shape[1]
        k = groups * self.group_size
        q = _unpack4(packed, n, k)
        cols = []
        for start in range(0, k, DECODE_BLOCK):
            end = min(k, start + DECODE_BLOCK)
            block = torch._convert_weight_to_int4pack_for_cpu(q[:, start:end].contiguous(), 1)
            part_sz = sz[start // self.group_size:end // self.group_size].contiguous()
            cols.append(torch._weight_int4pack_mm_for_cpu(torch.eye(end - start), block, self.group_size, part_sz))
        return torch.cat(cols).T.contiguous()

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], activations: str) -> torch.Tensor:
        if x.requires_grad:  # as Int8.linear
            return torch.nn.functional.linear(x, self.decode(t).to(x.dtype))
        xa = _act(x, activations)
        return torch._weight_int4pack_mm_for_cpu(xa.contiguous(), self.packed4(t), self.group_size,
                                                 t[".s"].to(xa.dtype)).to(x.dtype)

    def check_runtime(self) -> None:
        if self.probe is not None and self.probe != _int4_probe():
            raise StoreError(f"this store's {self.name} experts were packed in a layout this PyTorch "
                             f"({torch.__version__}) does not use; re-shard them with this version "
                             "(`adapmoe shard SRC OUT --experts-format ... --force`)")


class Int2(Int4):
    """Group-wise affine 2-bit (HQQ), computed by the int4 kernel. The kernel's values are q + 6 (6…9, around
    its midpoint 8, so the zero it adds stays small and bfloat16 keeps it precise): w = (q + 6 − 8)·scale +
    zero. On disk four values share a byte: in each row of the int4 layout's bytes (K/2 of them), byte j of
    the first half holds nibbles n0 n1 and byte j of the second half n2 n3 (each n = q, 0…3); the stored
    byte j is n0 | n2 << 2 | n1 << 4 | n3 << 6. So `(c & 0x33) + 0x66` is the first half and
    `((c >> 2) & 0x33) + 0x66` the second, computed four bytes at a time in int32 words."""

    name, bits = "int2", 2
    offset = 6

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "packing": INT2_PACKING}

    def _q_sub(self, shape: tuple[int, ...]) -> Sub:
        return Sub(".q", (shape[0], shape[1] // 4), "uint8")

    def encode(self, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        q, sz = self._quantize(w)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)  # [N, K/2], nibbles 0…3
        half = packed.shape[1] // 2
        b0, b1 = packed[:, :half], packed[:, half:]
        c = (b0 & 0x3) | ((b1 & 0x3) << 2) | ((b0 >> 4) << 4) | ((b1 >> 4) << 6)
        return {".q": c.contiguous(), ".s": sz}

    def packed4(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The int4 layout's bytes, in a buffer this thread reuses (it is read by the very next kernel call)."""
        c = t[".q"]
        n, quarter = c.shape
        scratch = _SCRATCH.__dict__.setdefault("buffers", {})
        out = scratch.get((n, quarter))
        if out is None:
            out = scratch[(n, quarter)] = torch.empty(n, 2 * quarter, dtype=torch.uint8)
        words, half = c.view(torch.int32), out.view(torch.int32)  # K/4 bytes a row: a multiple of 8
        w = words.shape[1]
        torch.bitwise_and(words, 0x33333333, out=half[:, :w]).add_(0x66666666)
        torch.bitwise_and(words >> 2, 0x33333333, out=half[:, w:]).add_(0x66666666)
        return out


#: the sixteen E2M1 (FP4) values by code: the sign in bit 3, then the magnitudes 0, ½, 1, 1½, 2, 3, 4, 6
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: every byte's two values (low nibble first): decoding is one lookup per byte
_E2M1_PAIRS = torch.tensor([[E2M1_VALUES[b & 15], E2M1_VALUES[b >> 4]] for b in range(256)])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] → MXFP4 (codes [..., N, K/2] uint8, scales [..., N, K/32] uint8): per 32 values along K
    the power of two (E8M0, biased by 127) that brings the largest to at most 6, then each value to the
    nearest E2M1 value, two codes a byte with the low nibble first. Values that came from MXFP4 come back
    with the same codes."""
    g = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    exp = torch.ceil(torch.log2((g.abs().amax(-1) / 6).clamp_min(2.0 ** -126))).clamp(-127, 127)
    v = g / torch.exp2(exp)[..., None]
    mag = (v.abs()[..., None] - torch.tensor(E2M1_VALUES[:8])).abs().argmin(-1)
    codes = (mag + 8 * torch.signbit(v).long()).to(torch.uint8).reshape(*w.shape)  # −0 keeps its code
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), (exp + 127).to(torch.uint8)


def dequantize_mxfp4(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    """MXFP4 → [N, K] in `dtype` (every value is exact in float32 and bfloat16): `codes` [N, K/2] or the
    hub's [N, K/32, 16], `scales` [N, K/32]."""
    n, groups = scales.shape
    # a byte → its two values: `embedding` is the fastest gather on CPU (2.6× plain indexing, 1.3 ms for a
    # 7424 × 192 part; docs/quantization.md)
    pairs = torch.nn.functional.embedding(codes.reshape(n, groups * 16).int(), _E2M1_PAIRS.to(dtype))
    scale = torch.exp2(scales.to(torch.int32) - 127).to(dtype)  # a power of two: exact
    return (pairs.reshape(n, groups, 32) * scale[..., None]).reshape(n, groups * 32)


class Mxfp4(ExpertsFormat):
    """MXFP4 (OCP microscaling): per 32 weights along K, one power-of-two scale and 4-bit E2M1 values, 4.25
    bits a weight — GPT-OSS's experts as published, kept at 4 bits. No CPU kernel reads it: a part is
    decoded (one lookup per byte, one multiply per value) into bfloat16 for each matmul."""

    name, bits = "mxfp4", 4

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": 4, "block": 32, "values": "e2m1, two a byte, low nibble first",
                "scales": "e8m0 (2^(s-127)) per 32 along the input"}

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for part, (_, k) in shapes.items():
            if k % 32:
                raise UsageError(f"mxfp4 needs an input size divisible by 32; expert part {part} has {k}")

    def subs(self, shape: tuple[int, ...], dtype: str) -> list[Sub]:
        n, k = shape
        return [Sub(".q", (n, k // 2), "uint8"), Sub(".s", (n, k // 32), "uint8")]

    def encode(self, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        codes, scales = quantize_mxfp4(w)
        return {".q": codes, ".s": scales}

    def decode(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_mxfp4(t[".q"], t[".s"])

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], activations: str) -> torch.Tensor:
        if x.requires_grad:
            return torch.nn.functional.linear(x, self.decode(t).to(x.dtype))
        xa = _act(x, activations)
        return torch.nn.functional.linear(xa, dequantize_mxfp4(t[".q"], t[".s"], xa.dtype)).to(x.dtype)


def quantized(fmt: ExpertsFormat | None) -> bool:
    """A format was given and it is not native."""
    return fmt is not None and fmt.quantized


def by_part(views: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """An expert's flat views (`w1`, or `w1.q` and `w1.s`) grouped by part: what `linear` and `decode` take."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in views.items():
        part, dot, rest = name.partition(".")
        out.setdefault(part, {})[dot + rest] = t
    return out


_SCRATCH = threading.local()  # Int2.packed4's buffers, one per shape and thread

_CLASSES: dict[str, type[ExpertsFormat]] = {"native": ExpertsFormat, "int8": Int8, "int4": Int4, "int2": Int2,
                                             "mxfp4": Mxfp4}


def parse_format(name: str, group_size: int | None = None) -> ExpertsFormat:
    """`--experts-format NAME [--group-size G]` → the format; a one-line UsageError otherwise."""
    check_format(name, group_size)
    cls = _CLASSES[name]
    return cls(group_size) if issubclass(cls, Int4) else cls()


def from_spec(spec: Any) -> ExpertsFormat:
    """A manifest's `experts_format` (absent: native) → the format; ValueError/StoreError say what is wrong."""
    if spec is None:
        return ExpertsFormat()
    if not isinstance(spec, dict):
        raise ValueError("experts_format is not an object")
    name = spec.get("name")
    if name not in _CLASSES or name == "native":
        raise StoreError(f"its experts are in format {name!r}, which this adapmoe cannot read (it reads "
                         f"{', '.join(NAMES)}); upgrade adapmoe or re-shard the store")
    cls = _CLASSES[name]
    if issubclass(cls, Int4):
        group = spec.get("group_size")
        if isinstance(group, bool) or group not in KERNEL_GROUPS:
            raise ValueError(f"experts_format group_size {group!r} is not one of {KERNEL_GROUPS}")
        if spec.get("layout") != INT4_LAYOUT or not isinstance(spec.get("layout_probe"), str):
            raise StoreError(f"its {name} experts are in layout {spec.get('layout')!r}, which this adapmoe cannot "
                             "read; upgrade adapmoe or re-shard the store")
        if cls is Int2 and spec.get("packing") != INT2_PACKING:
            raise StoreError(f"its int2 experts are packed as {spec.get('packing')!r}, which this adapmoe cannot "
                             "read; upgrade adapmoe or re-shard the store")
        return cls(group, probe=spec["layout_probe"])
    return cls()
