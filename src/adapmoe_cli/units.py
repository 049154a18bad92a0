"""Parsing and formatting of byte sizes (`6GiB`, `512MB`, `1.5G`), of percentages (`1%`) and of memory caps
(a size or a share of the model, `60%`)."""

from __future__ import annotations

import re

from adapmoe_cli.errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """`'6GiB'` → 6442450944. Bare `K/M/G/T` are binary (as in `free -h`); `KB/MB/GB` are decimal."""
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot parse size {text!r}: use a number with a unit, e.g. 6GiB, 512MiB or 2GB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_fraction(text: str) -> float:
    """`1%` → 0.01, `0.01` → 0.01 (a quality budget). Refuses ≤ 0 and absurd values (> 50%)."""
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"cannot read quality budget {text!r}: use a percentage like 1%") from None
    if not 0 < value <= 0.5:
        raise UsageError(f"quality budget {text!r} must be above 0% and at most 50%")
    return value


def parse_cap(text: str, model_bytes: int) -> int:
    """`1.5GiB` → bytes; `60%` → that share of the model's bytes on disk."""
    text = text.strip()
    bad = UsageError(f"--memory-cap {text!r}: give a size (1.5GiB) or a share of the model's size (60%)")
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 10:
            raise bad
        return int(share * model_bytes)
    try:
        return parse_size(text)
    except UsageError:
        raise bad from None
