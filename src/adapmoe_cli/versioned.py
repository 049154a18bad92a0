"""The files adapmoe writes (store manifest, profile, plan) are JSON objects with a `format` name and a
`format_version`. One reader checks that header for all of them and refuses newer versions clearly; one
writer replaces a file atomically (temporary name, then rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapmoe_cli.errors import AdapmoeError


def read_versioned(path: Path, fmt: str, version: int, error: type[AdapmoeError], what: str,
                   remedy: str) -> dict[str, Any]:
    """Parse `path`; raise `error` with a message naming `what` and the command (`remedy`) that makes it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"no {what} at {path}; make one with `{remedy}`")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); re-run `{remedy}`") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path} is not an adapmoe {what}")
    found = data.get("format_version")
    if not isinstance(found, int) or found > version:
        raise error(f"{path} was written by a newer adapmoe ({what} format {found}, this one reads up to "
                    f"{version}); upgrade adapmoe or re-run `{remedy}`")
    return data


def write_atomic(path: Path, doc: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
