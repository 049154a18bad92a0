"""The files adapmoe writes (store manifest, profile, plan) are JSON objects with a `format` name and a
`format_version`. One reader checks that header for all of them — size and nesting capped, versions
from 1 up to the one this adapmoe writes — and refuses others clearly; one writer replaces a file
atomically without following links (`safe_io.write_atomic`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from adapmoe_cli.errors import AdapmoeError
from adapmoe_cli.safe_io import MAX_DOC_BYTES, parse_json, read_capped


def read_versioned(path: Path, fmt: str, version: int, error: type[AdapmoeError], what: str,
                   remedy: str, limit: int = MAX_DOC_BYTES) -> dict[str, Any]:
    """Parse `path`; raise `error` with a message naming `what` and the command (`remedy`) that makes it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"no {what} at {path}; make one with `{remedy}`")
    return parse_versioned(read_capped(path, limit, str(path), error, follow=True), path, fmt, version, error,
                           what, remedy)


def parse_versioned(data: bytes, path: Path, fmt: str, version: int, error: type[AdapmoeError], what: str,
                    remedy: str) -> dict[str, Any]:
    """The header check of `read_versioned` on bytes already read (what the fuzz targets call)."""
    try:
        doc = parse_json(data, str(path), error)
    except AdapmoeError as e:
        raise error(f"{e}; re-run `{remedy}`") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise error(f"{path} is not an adapmoe {what}")
    found = doc.get("format_version")
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise error(f"{path} has no valid format_version ({found!r}); re-run `{remedy}`")
    if found > version:
        raise error(f"{path} was written by a newer adapmoe ({what} format {found}, this one reads up to "
                    f"{version}); upgrade adapmoe or re-run `{remedy}`")
    return doc


def write_atomic(path: Path, doc: dict[str, Any]) -> Path:
    from adapmoe_cli.safe_io import write_atomic as write_bytes

    return write_bytes(path, json.dumps(doc, indent=1))



def integer(value: Any, what: str, error: type[AdapmoeError], lo: int | None = None, hi: int | None = None) -> int:
    """`value` if it is an integer (not a bool, not a float) within [lo, hi]; else `error` naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise error(f"{what} = {value} is outside {lo if lo is not None else '…'}…{hi if hi is not None else ''}")
    return value


def number(value: Any, what: str, error: type[AdapmoeError], lo: float | None = None,
           hi: float | None = None) -> float:
    """`value` as a float if it is a finite number (not a bool, NaN or ±inf) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise error(f"{what} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise error(f"{what} = {value} is outside [{lo}, {hi}]")
    return float(value)
