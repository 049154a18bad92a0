"""How long-running library functions report progress: `Steps(name, done, total)` callbacks, one step
name at a time (`profiling`, `searching the gate scale`, `cost curves`, …), rendered by the CLI as a bar
with an ETA. `within` turns one step's (done, total) callback into a `Steps` call."""

from __future__ import annotations

from collections.abc import Callable

Steps = Callable[[str, int, int], None]


def quiet(_name: str, _done: int, _total: int) -> None:
    """A `Steps` that shows nothing."""


def within(progress: Steps | None, name: str) -> Callable[[int, int], None]:
    """A (done, total) callback reporting as step `name` of `progress`."""
    report = progress or quiet
    return lambda done, total: report(name, done, total)
