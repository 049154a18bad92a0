"""The experts formats' names and group sizes (experts_format.py), without torch: the CLI checks
`--experts-format` and `--group-size` as it reads them, before a command imports torch."""

from __future__ import annotations

from adapmoe_cli.errors import UsageError

NAMES = ("native", "int8", "int4", "int2", "mxfp4")
#: group sizes the int4 CPU kernel takes
KERNEL_GROUPS = (32, 64, 128, 256)
DEFAULT_GROUP = {"int4": 64, "int2": 32}


def check_format(name: str, group_size: int | None = None, flag: str = "--experts-format") -> None:
    """`--experts-format NAME [--group-size G]`: a one-line UsageError where NAME is unknown or G does not
    apply to it (`flag`: the option that named it)."""
    if name not in NAMES:
        raise UsageError(f"unknown {flag} {name!r}: choose one of {', '.join(NAMES)}")
    if group_size is not None and name not in DEFAULT_GROUP:
        raise UsageError(f"--group-size applies to {' and '.join(DEFAULT_GROUP)}, not {name}")
