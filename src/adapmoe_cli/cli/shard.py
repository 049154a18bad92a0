"""`adapmoe shard SRC OUT`: a local checkpoint directory → an expert store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapmoe_cli.cli.common import byte_progress, console
from adapmoe_cli.store.writer import DTYPE_CHOICES, shard
from adapmoe_cli.units import format_bytes


def register(app: typer.Typer) -> None:
    app.command("shard", help="Turn a local Hugging Face checkpoint into an expert store.")(shard_cmd)


def shard_cmd(
    src: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json + *.safetensors).")],
    out: Annotated[Path, typer.Argument(help="Store folder to create.")],
    dtype: Annotated[str, typer.Option(help=f"Store dtype: {' | '.join(DTYPE_CHOICES)}.")] = "keep",
    force: Annotated[bool, typer.Option("--force", help="Replace a different store already at OUT.")] = False,
) -> None:
    """Examples:

      adapmoe shard ./Mixtral-8x7B-v0.1 ./mixtral-store

      adapmoe shard ./ckpt ./store --dtype float32 --force
    """
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
