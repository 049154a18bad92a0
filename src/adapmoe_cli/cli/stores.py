"""`adapmoe list` and `adapmoe rm NAME`: the stores kept in ADAPMOE_HOME."""

from __future__ import annotations

import datetime
import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from adapmoe_cli.catalog import StoreEntry, find_store, list_stores, remove_store
from adapmoe_cli.cli.common import JsonFlag, console, emit
from adapmoe_cli.errors import UsageError
from adapmoe_cli.paths import stores_dir
from adapmoe_cli.units import format_bytes


def register(app: typer.Typer) -> None:
    app.command("list", help="List the stores in ADAPMOE_HOME.")(list_cmd)
    app.command("rm", help="Remove a store from ADAPMOE_HOME.")(rm_cmd)


def list_cmd(as_json: JsonFlag = False) -> None:
    """Example: adapmoe list"""
    emit([e.public() for e in list_stores()], as_json, lambda _rows: render(list_stores()))


def render(entries: list[StoreEntry]) -> None:
    if not entries:
        console.print(f"no stores in {escape(str(stores_dir()))} yet (`adapmoe chat` makes the embedded one)")
        return
    t = Table(title=f"stores in {escape(str(stores_dir()))}")
    for c in ("name", "source", "size", "dtype", "profile", "plan", "last used"):
        t.add_column(c, justify="right" if c == "size" else "left")
    for e in entries:
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M") if e.last_used else "—"
        t.add_row(e.name, escape(e.source), format_bytes(e.bytes), e.dtype, "yes" if e.profile else "no",
                  "yes" if e.plan else "no", used)
    console.print(t)


def rm_cmd(
    name: Annotated[str, typer.Argument(help="A store's name (as `adapmoe list` shows it) or its source.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Examples:

      adapmoe rm Mixtral-8x7B-v0.1

      adapmoe rm mistralai/Mixtral-8x7B-Instruct-v0.1 --yes
    """
    entry = find_store(name)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"removing {entry.name} ({format_bytes(entry.bytes)}) needs confirmation: add --yes")
        if not typer.confirm(f"remove {entry.name} ({escape(entry.source)}, {format_bytes(entry.bytes)})?"):
            raise typer.Exit(1)
    freed = remove_store(entry)
    console.print(f"removed {entry.name}: {format_bytes(freed)} freed")
