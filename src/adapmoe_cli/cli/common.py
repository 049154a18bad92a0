"""Shared pieces of the CLI: the console, option aliases reused across commands, progress bars."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

if TYPE_CHECKING:
    from adapmoe_cli.settings import Settings
    from adapmoe_cli.store import Store

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


@contextlib.contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over bytes, on stderr; yields the callback the library calls with (done, total)."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console, transient=True, disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


ModelArg = Annotated[
    str | None,
    typer.Argument(help="Store folder, checkpoint folder or hub id (default: the embedded model).",
                   show_default=False),
]
CacheExpertsOpt = Annotated[
    int | None, typer.Option("--cache-experts", "-c", help="Expert slots in memory, over all layers.",
                             show_default=False),
]
MemoryOpt = Annotated[
    str | None, typer.Option("--memory", "-m", help="Memory for expert slots, e.g. 6GiB (instead of -c).",
                             show_default=False),
]
PrefetchOpt = Annotated[
    bool | None, typer.Option("--prefetch/--no-prefetch", help="Prefetch the next layer's predicted experts.",
                              show_default=False),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu | cuda | auto.", show_default=False)]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML preset over configs/default.yaml.", show_default=False),
]
PolicyOpt = Annotated[str | None, typer.Option("--policy", help="Eviction policy: lru | lfu.", show_default=False)]


def open_store(model: str | None) -> Store:
    """Resolve MODEL (sharding or downloading on first use, with a progress bar)."""
    from adapmoe_cli.models import open_model

    with byte_progress("preparing the store") as progress:
        return open_model(model, progress=progress)


def runtime_settings(config: Path | None, cache_experts: int | None, memory: str | None,
                     prefetch: bool | None, device: str | None, policy: str | None = None,
                     **generation: object) -> Settings:
    from adapmoe_cli.settings import load_settings

    overrides: dict[str, object] = {
        "cache.experts": cache_experts, "cache.memory": memory, "cache.policy": policy,
        "prefetch": prefetch, "device": device,
    }
    overrides.update({f"generation.{k}": v for k, v in generation.items()})
    return load_settings(config, overrides)
