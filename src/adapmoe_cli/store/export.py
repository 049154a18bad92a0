"""A store back to a checkpoint in the hub's layout, and the full-size variant of a store.

`export_checkpoint`: config.json, the side files (tokenizer, generation config), one safetensors file of
dense weights and one per MoE layer of experts, and the index — what `shard`, transformers and
llama.cpp's converter read. With `intermediate_size` larger than the model's, every expert is
zero-padded in the intermediate dimension (extra rows of the gate and up projections, extra columns of
the down projection): the padded units compute act(0)·0 = 0, so every output is exactly the same, while
the bytes on disk and the FLOPs per expert are those of a larger model.

`variant_store`: the padded variant of a store whose experts are about `expert_bytes` each, and/or the
variant whose experts are quantized (experts_format.py), built once into ADAPMOE_HOME (export, then
`shard`) and reused. The routing, the gate's sensitivities and the
quality are the source model's; what changes is what loading an expert costs (docs/bench.md)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapmoe_cli.errors import StoreError, UsageError
from adapmoe_cli.experts_format import ExpertsFormat, by_part, quantized
from adapmoe_cli.families import is_weight
from adapmoe_cli.paths import stores_dir
from adapmoe_cli.store.manifest import Store
from adapmoe_cli.store.reader import ExpertReader, aligned_buffer, expert_views
from adapmoe_cli.units import format_bytes

#: the padded intermediate size is a multiple of this (llama.cpp's k-quants take rows in blocks of 256)
PAD_MULTIPLE = 256


def padded_intermediate(store: Store, expert_bytes: int) -> int:
    """The intermediate size at which one expert of `store` (its dtype) holds about `expert_bytes`."""
    fam = store.family
    if not fam.pads:
        raise UsageError(f"{fam.model_type} experts cannot be padded: its dense weights depend on the experts' "
                         f"size ({fam.intermediate_key}); benchmark it without --expert-size")
    shapes = fam.expert_part_shapes(store.config)
    inter = store.shape.intermediate_size
    per_unit = sum(math.prod(s) for s in shapes.values()) // inter * store.dtype.itemsize  # bytes per unit of I
    target = -(-expert_bytes // per_unit)
    size = -(-target // PAD_MULTIPLE) * PAD_MULTIPLE
    if target <= inter:
        raise UsageError(f"--expert-size {format_bytes(expert_bytes)} is not above this model's experts "
                         f"({format_bytes(store.expert_payload_bytes)} each); give a larger size")
    return size


def _pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) == tuple(shape):
        return t.contiguous()
    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def export_checkpoint(store: Store, out: Path, intermediate_size: int | None = None) -> Path:
    """Write `store` as a hub-layout checkpoint in `out` (which must not exist), its experts zero-padded to
    `intermediate_size` when given. One layer's experts are in memory at a time."""
    from safetensors.torch import save_file

    fam = store.family
    config = dict(store.config)
    inter = intermediate_size or store.shape.intermediate_size
    assert inter == store.shape.intermediate_size or fam.pads, "padded_intermediate refuses this family"
    if inter < store.shape.intermediate_size:
        raise UsageError(f"cannot pad experts to {inter}, below the model's {store.shape.intermediate_size}")
    config[fam.intermediate_key] = inter
    shapes = fam.expert_part_shapes(config)
    out.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    files = [f"model-{i + 1:05d}-of-{len(store.shape.moe_layers) + 1:05d}.safetensors"
             for i in range(len(store.shape.moe_layers) + 1)]
    dense = store.load_dense()
    save_file({k: v.contiguous() for k, v in dense.items()}, out / files[0], metadata={"format": "pt"})
    weight_map.update({k: files[0] for k in dense})
    del dense
    total = 0
    buf = aligned_buffer(store.slot_bytes)
    with ExpertReader(store) as reader:
        for i, layer in enumerate(store.shape.moe_layers):
            tensors: dict[str, torch.Tensor] = {}
            rows: dict[str, list[torch.Tensor]] = {}
            for expert in range(store.shape.num_experts):
                entry = reader.read_into(layer, expert, buf)
                parts = {}
                for part, t in by_part(expert_views(buf, entry)).items():
                    fmt = store.experts_format if is_weight(part) else ExpertsFormat()
                    w = fmt.decode(t).to(store.dtype)  # quantized: the weights it computes with
                    parts[part] = _pad(w, shapes[part]).clone()
                if fam.fused is not None:
                    for kind, row in fam.fused.join(parts).items():
                        rows.setdefault(kind, []).append(row)
                else:
                    tensors.update({fam.expert_tensor_name(layer, expert, p): w for p, w in parts.items()})
            if fam.fused is not None:  # the hub's stacked tensors, experts along dim 0
                tensors = {fam.fused.tensors[kind].format(layer=layer): torch.stack(r) for kind, r in rows.items()}
            save_file(tensors, out / files[i + 1], metadata={"format": "pt"})
            weight_map.update({k: files[i + 1] for k in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
    total += sum(f.bytes for f in store.dense_files)
    for f in store.side_files:
        (out / f.file).write_bytes(store.read_checked(f))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def size_label(n: int) -> str:
    """`16MiB` for 16 × 2**20, else the byte count: the suffix of a full-size store's name."""
    return f"{n >> 20}MiB" if n % (1 << 20) == 0 else f"{n}B"


def variant_name(store: Store, expert_bytes: int | None = None, fmt: ExpertsFormat | None = None,
                 dtype: str = "keep") -> str:
    """`NAME-experts-16MiB`, `NAME-int4-g64`, `NAME-experts-16MiB-int4-g64`, `NAME-bfloat16`: where a variant
    is kept."""
    name = store.path.name
    if dtype not in ("keep", store.dtype_name):
        name += f"-{dtype}"
    if expert_bytes is not None:
        name += f"-experts-{size_label(expert_bytes)}"
    if quantized(fmt):
        name += f"-{fmt.label()}"
    return name


def variant_store(store: Store, expert_bytes: int | None = None, fmt: ExpertsFormat | None = None,
                  out: Path | None = None, force: bool = False, note: Callable[[str], None] | None = None,
                  dtype: str = "keep") -> Store:
    """The variant of `store` with experts zero-padded to about `expert_bytes` (`padded_intermediate`, in the
    source's dtype; the full-size store), and/or written in experts format `fmt` (quantized), and/or in
    another `dtype`, built once at `out` (default
    ADAPMOE_HOME/stores/`variant_name`, replaced when it was made from another store) and reused while it
    was made from this very store in this very way."""
    from adapmoe_cli.store.writer import check_free, shard

    if store.experts_format.quantized and quantized(fmt):
        raise UsageError(f"{store.path.name} already holds {store.experts_format.label()} experts; quantize the "
                         "store they were made from")
    inter = padded_intermediate(store, expert_bytes) if expert_bytes is not None else None
    if out is None:
        out, force = stores_dir() / variant_name(store, expert_bytes, fmt, dtype), True
    origin: dict[str, Any] = {"padded_from": store.fingerprint, "intermediate_size": inter} if inter else \
        {"derived_from": store.fingerprint}
    if quantized(fmt):
        origin["experts_format"] = fmt.label()
    target = store.dtype_name if dtype == "keep" else dtype
    if target != store.dtype_name:
        origin["dtype"] = target
    same_outputs = not quantized(fmt) and target == store.dtype_name  # the source's profile and plan hold
    if (out / "manifest.json").exists():
        try:
            made: Store | None = Store.open(out)
        except StoreError:
            made = None
        source = made.manifest.get("source", {}) if made is not None else {}
        if made is not None and all(source.get(k) == v for k, v in origin.items()) and \
                source.get("experts_format") == origin.get("experts_format") and made.dtype_name == target and \
                made.manifest.get("experts_format") == (fmt.spec() if fmt is not None else None):
            if same_outputs:
                carry_method(store, made)  # what it lacks, or carried from what the source has since replaced
            return made
    check_free(out)  # (before the export: the whole checkpoint was written out, then the folder refused)
    if note is not None:
        what = [f"experts padded from {format_bytes(store.expert_payload_bytes)} to ~{format_bytes(expert_bytes)}"
                ] if expert_bytes is not None else []
        if quantized(fmt):
            what.append(f"experts in {fmt.label()}")
        if target != store.dtype_name:
            what.append(f"weights in {target}")
        note(f"building the variant of {store.path.name} ({', '.join(what)}) in {out}" if what else
             f"copying {store.path.name} to {out}")
    tmp = out.parent / f".{out.name}.export"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_checkpoint(store, tmp, inter)
        shard(tmp, out, dtype=target, force=force, source={"path": str(store.path), **origin},
              experts_format=fmt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    made = Store.open(out)
    if same_outputs:
        carry_method(store, made)  # else it is profiled as its own
    return made


def carry_method(src: Store, dst: Store) -> None:
    """Give the padded store its source's profile (with the trace and expert statistics) and plan,
    re-addressed to it: its routing, outputs and so the sensitivities, trace, expert statistics and cost
    curves (counted loads) are the source's. A file is carried where the padded store lacks it or holds
    one carried from another version of the source's (`carried_from`, its sha256: a re-made plan or an
    upgraded shipped one follows); one made for the padded store itself stays. Files made for another
    model, or damaged, are left behind (the padded store is then profiled as any other)."""
    import hashlib

    from adapmoe_cli.errors import ProfileError
    from adapmoe_cli.planning.plan_file import read_plan
    from adapmoe_cli.profiling.profile_file import read_profile
    from adapmoe_cli.safe_io import write_atomic

    checks = {"profile.json": read_profile, "plan.json": read_plan}
    for name, check in checks.items():
        path = src.path / name
        if not path.exists():
            continue
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if (dst.path / name).exists():
            try:
                carried = json.loads((dst.path / name).read_text()).get("carried_from")
            except (OSError, ValueError):
                carried = None
            if carried is None or carried == digest:  # its own, or carried from this very file
                continue
        try:
            check(path, src)
        except ProfileError:
            continue
        doc = json.loads(blob)
        if name == "profile.json":
            for entry in (doc["trace"], doc.get("experts")):  # the trace, and the expert statistics if any
                if entry is not None:
                    write_atomic(dst.path / entry["file"], (src.path / entry["file"]).read_bytes())
        doc["model"]["fingerprint"] = dst.fingerprint
        doc["carried_from"] = digest
        write_atomic(dst.path / name, json.dumps(doc, indent=1))
        check(dst.path / name, dst)
