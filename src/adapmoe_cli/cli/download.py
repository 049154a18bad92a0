"""`adapmoe download REPO_ID`: fetch a hub checkpoint and shard it into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapmoe_cli.cli.common import byte_progress, console
from adapmoe_cli.hub import download_checkpoint
from adapmoe_cli.paths import store_dir_for_repo
from adapmoe_cli.store.writer import DTYPE_CHOICES, shard


def register(app: typer.Typer) -> None:
    app.command("download", help="Download a hub checkpoint and shard it into an expert store.")(download_cmd)


def download_cmd(
    repo_id: Annotated[str, typer.Argument(help="Hub model id, e.g. mistralai/Mixtral-8x7B-Instruct-v0.1.")],
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
    out: Annotated[Path | None, typer.Option(help="Store folder (default: under ADAPMOE_HOME).")] = None,
    dtype: Annotated[str, typer.Option(help=f"Store dtype: {' | '.join(DTYPE_CHOICES)}.")] = "keep",
    force: Annotated[bool, typer.Option("--force", help="Replace a different store already at --out.")] = False,
) -> None:
    """Gated or private models need a hub token: set HF_TOKEN (or run `hf auth login`).
    HF_ENDPOINT points at a mirror; HF_HUB_OFFLINE=1 uses the local hub cache only.

    Examples:

      adapmoe download mistralai/Mixtral-8x7B-Instruct-v0.1

      HF_ENDPOINT=http://localhost:8080 adapmoe download org/tiny-moe --out ./store
    """
    ckpt = download_checkpoint(repo_id, revision)
    target = out or store_dir_for_repo(repo_id, revision)
    with byte_progress("sharding") as progress:
        res = shard(ckpt, target, dtype=dtype, force=force, progress=progress,
                    source={"repo_id": repo_id, "revision": revision or "main"})
    console.print(f"store ready: {res.store}" + (" (already up to date)" if res.reused else ""))
