"""`adapmoe shard SRC OUT`: a local checkpoint directory → an expert store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapmoe_cli.cli.common import byte_progress, console
from adapmoe_cli.store.writer import DTYPE_CHOICES, shard
from adapmoe_cli.units import format_bytes, parse_size


def register(app: typer.Typer) -> None:
    app.command("shard", help="Turn a local Hugging Face checkpoint into an expert store.")(shard_cmd)


def shard_cmd(
    src: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json + *.safetensors).")],
    out: Annotated[Path, typer.Argument(help="Store folder to create.")],
    dtype: Annotated[str, typer.Option(help=f"Store dtype: {' | '.join(DTYPE_CHOICES)}.")] = "keep",
    force: Annotated[bool, typer.Option("--force", help="Replace a different store already at OUT.")] = False,
    expert_size: Annotated[str | None, typer.Option(
        "--expert-size", help="Write the full-size variant: experts zero-padded to about this size (e.g. 16MiB); "
        "same outputs, the bytes and FLOPs of a larger model. SRC may then be a store.", show_default=False)] = None,
) -> None:
    """Examples:

      adapmoe shard ./Mixtral-8x7B-v0.1 ./mixtral-store

      adapmoe shard ./ckpt ./store --dtype float32 --force

      adapmoe shard ./ckpt ./store-16m --expert-size 16MiB
    """
    if expert_size is not None:
        _full_size(src, out, parse_size(expert_size), dtype, force)
        return
    with byte_progress("sharding") as progress:
        res = shard(src, out, dtype=dtype, force=force, progress=progress)
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


def _full_size(src: Path, out: Path, expert_bytes: int, dtype: str, force: bool) -> None:
    """SRC (a store, or a checkpoint sharded first into a temporary store) → its full-size variant at OUT."""
    import tempfile

    from adapmoe_cli.store.export import full_size_store
    from adapmoe_cli.store.manifest import Store, is_store

    with tempfile.TemporaryDirectory(dir=Path(out).absolute().parent, prefix=f".{Path(out).name}.") as tmp:
        if is_store(src) and dtype == "keep":
            source = Store.open(src)
        else:
            with byte_progress("sharding") as progress:
                source = Store.open(shard(src, Path(tmp) / "store", dtype=dtype, progress=progress).store)
        made = full_size_store(source, expert_bytes, Path(out), force=force, note=lambda m: console.print(m))
    console.print(f"wrote {made.path}: {made.shape.num_experts * len(made.shape.moe_layers)} experts of "
                  f"{format_bytes(made.expert_payload_bytes)} (intermediate size {made.shape.intermediate_size}), "
                  f"{format_bytes(made.total_bytes)} in all", soft_wrap=True)
