"""`adapmoe verify STORE`: check every checksum; exit 0 only if the store is whole."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from adapmoe_cli.cli.common import byte_progress, console, err_console
from adapmoe_cli.units import format_bytes


def register(app: typer.Typer) -> None:
    app.command("verify", help="Check every checksum of an expert store.")(verify_cmd)


def verify_cmd(store: Annotated[Path, typer.Argument(help="Store folder.")]) -> None:
    """Example: adapmoe verify ./mixtral-store"""
    from adapmoe_cli.errors import StoreError
    from adapmoe_cli.paths import not_a_store

    problem = not_a_store(store)  # said before torch loads
    if problem is not None:
        raise StoreError(problem)
    from adapmoe_cli.store import Store
    from adapmoe_cli.store.verify import verify

    s = Store.open(store)
    with byte_progress("verifying") as progress:
        rep = verify(s, progress=progress)
    if rep.ok:
        console.print(f"ok: {len(s.experts)} experts and {len(s.dense_files)} dense files, "
                      f"{format_bytes(rep.bytes_checked)} checked in {rep.seconds:.1f} s", soft_wrap=True)
        return
    for p in rep.problems:
        err_console.print(f"[red]bad:[/] {escape(p)}", soft_wrap=True)
    err_console.print(f"[red]error:[/] {len(rep.problems)} problem(s); re-run `adapmoe shard --force`")
    raise typer.Exit(1)
