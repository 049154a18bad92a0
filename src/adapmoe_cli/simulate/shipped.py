"""The routing traces shipped in the package (adapmoe_cli/traces/NAME/, each with its README and licence).
No torch here: `adapmoe simulate --help` names them without loading the library."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: name → file (all in the h39s format)
SHIPPED = {"mixtral-8x7b-instruct-h39s": "active_experts.txt"}


def shipped_trace(name: str) -> Path | None:
    """The file of a trace shipped with adapmoe, or None for another name."""
    if name not in SHIPPED:
        return None
    return Path(str(resources.files("adapmoe_cli").joinpath("traces", name, SHIPPED[name])))
