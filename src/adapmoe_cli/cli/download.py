"""`adapmoe download REPO_ID`: fetch a hub checkpoint and shard it into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapmoe_cli.cli.common import DTYPE_HELP, ExpertsFormatOpt, GroupSizeOpt, byte_progress, console
from adapmoe_cli.paths import store_dir_for_repo


def register(app: typer.Typer) -> None:
    app.command("download", help="Download a hub checkpoint and shard it into an expert store.")(download_cmd)


def download_cmd(
    repo_id: Annotated[str, typer.Argument(help="Hub model id, e.g. mistralai/Mixtral-8x7B-Instruct-v0.1.")],
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
    out: Annotated[Path | None, typer.Option(help="Store folder (default: under ADAPMOE_HOME).")] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "keep",
    force: Annotated[bool, typer.Option("--force", help="Replace a different store already at --out.")] = False,
    experts_format: ExpertsFormatOpt = "native",
    group_size: GroupSizeOpt = None,
) -> None:
    """Gated or private models need a hub token: set HF_TOKEN (or run `hf auth login`).
    HF_ENDPOINT points at a mirror; HF_HUB_OFFLINE=1 uses the local hub cache only.

    Examples:

      adapmoe download mistralai/Mixtral-8x7B-Instruct-v0.1

      HF_ENDPOINT=http://localhost:8080 adapmoe download org/tiny-moe --out ./store

      adapmoe download mistralai/Mixtral-8x7B-Instruct-v0.1 --experts-format int4 --out ./mixtral-int4
    """
    from adapmoe_cli.experts_format import parse_format
    from adapmoe_cli.hub import download_checkpoint
    from adapmoe_cli.store.writer import check_free, shard

    fmt = parse_format(experts_format, group_size)  # a bad format is refused before anything is downloaded
    target = out or store_dir_for_repo(repo_id, revision)
    if out is None and fmt.quantized:  # beside the native store, not in its place
        target = target.with_name(f"{target.name}-{fmt.label()}")
    check_free(target.absolute())  # (a folder of the user's was refused only after the whole download)
    ckpt = download_checkpoint(repo_id, revision)
    with byte_progress("sharding") as progress:
        res = shard(ckpt, target, dtype=dtype, force=force, progress=progress,
                    source={"repo_id": repo_id, "revision": revision or "main"}, experts_format=fmt)
    console.print(f"store ready: {res.store}" + (" (already up to date)" if res.reused else ""))
