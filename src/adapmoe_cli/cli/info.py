"""`adapmoe info STORE`: what a store holds."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from adapmoe_cli.cli.common import JsonFlag, ModelArg, console, open_store
from adapmoe_cli.units import format_bytes


def register(app: typer.Typer) -> None:
    app.command("info", help="Describe an expert store.")(info_cmd)


def info_cmd(model: ModelArg = None, as_json: JsonFlag = False) -> None:
    """Examples:

      adapmoe info

      adapmoe info ./mixtral-store --json
    """
    data = open_store(model).info()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        if key.endswith("_bytes"):
            value = f"{format_bytes(value)} ({value:,} B)"
        elif key == "source" and isinstance(value, dict):  # the whole record is in --json
            value = (f"{value.get('path', '?')} (fingerprint {str(value.get('fingerprint', ''))[:16]}…, "
                     f"{len(value.get('files') or [])} weight files)")
        table.add_row(key, str(value))
    console.print(table)
