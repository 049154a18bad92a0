"""`adapmoe shard SRC OUT`: a local checkpoint directory → an expert store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from adapmoe_cli.cli.common import DTYPE_HELP, ExpertsFormatOpt, GroupSizeOpt, byte_progress, console
from adapmoe_cli.units import format_bytes, parse_size

if TYPE_CHECKING:
    from adapmoe_cli.experts_format import ExpertsFormat


def register(app: typer.Typer) -> None:
    app.command("shard", help="Turn a local Hugging Face checkpoint into an expert store.")(shard_cmd)


def shard_cmd(
    src: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json + *.safetensors).")],
    out: Annotated[Path, typer.Argument(help="Store folder to create.")],
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "keep",
    force: Annotated[bool, typer.Option("--force", help="Replace a different store already at OUT.")] = False,
    expert_size: Annotated[str | None, typer.Option(
        "--expert-size", help="Write the full-size variant: experts zero-padded to about this size (e.g. 16MiB); "
        "same outputs, the bytes and FLOPs of a larger model. SRC may then be a store.", show_default=False)] = None,
    experts_format: ExpertsFormatOpt = "native",
    group_size: GroupSizeOpt = None,
) -> None:
    """Examples:

      adapmoe shard ./Mixtral-8x7B-v0.1 ./mixtral-store

      adapmoe shard ./ckpt ./store --dtype float32 --force

      adapmoe shard ./ckpt ./store-16m --expert-size 16MiB

      adapmoe shard ./ckpt ./store-int4 --experts-format int4 --group-size 64
    """
    from adapmoe_cli.experts_format import parse_format
    from adapmoe_cli.paths import is_store
    from adapmoe_cli.store.writer import shard

    fmt = parse_format(experts_format, group_size)
    if expert_size is not None or is_store(src):
        _variant(src, out, parse_size(expert_size) if expert_size is not None else None, fmt, dtype, force)
        return
    with byte_progress("sharding") as progress:
        res = shard(src, out, dtype=dtype, force=force, progress=progress, experts_format=fmt)
    if res.reused:
        console.print(
            f"{res.store} already holds this store; nothing to do (pass --force to rebuild)", soft_wrap=True
        )
        return
    rate = res.bytes_written / max(res.seconds, 1e-9)
    console.print(
        f"wrote {res.store}: {format_bytes(res.bytes_written)} in {res.seconds:.1f} s "
        f"({format_bytes(rate)}/s)",
        soft_wrap=True,  # one line, whatever the path's length
    )


def _variant(src: Path, out: Path, expert_bytes: int | None, fmt: ExpertsFormat, dtype: str, force: bool) -> None:
    """SRC (a store, or a checkpoint sharded first into a temporary store) → its full-size and/or quantized
    variant at OUT."""
    import tempfile

    from adapmoe_cli.paths import is_store
    from adapmoe_cli.store.export import variant_store
    from adapmoe_cli.store.manifest import Store
    from adapmoe_cli.store.writer import shard

    with tempfile.TemporaryDirectory(dir=Path(out).absolute().parent, prefix=f".{Path(out).name}.") as tmp:
        if is_store(src):
            source = Store.open(src)
        else:
            with byte_progress("sharding") as progress:
                source = Store.open(shard(src, Path(tmp) / "store", dtype=dtype, progress=progress).store)
        made = variant_store(source, expert_bytes, fmt, Path(out), force=force, note=lambda m: console.print(m),
                             dtype=dtype)
    console.print(f"wrote {made.path}: {made.shape.num_experts * len(made.shape.moe_layers)} experts of "
                  f"{format_bytes(made.expert_payload_bytes)} ({made.experts_format.label()}, intermediate size "
                  f"{made.shape.intermediate_size}), {format_bytes(made.total_bytes)} in all", soft_wrap=True)
