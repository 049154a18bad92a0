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
    from adapmoe_cli.runtime.engine import Engine
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
PlanOpt = Annotated[str | None, typer.Option("--plan", help="Cache plan file (default: the store's plan.json "
                                            "when it fits the budget; 'none' to ignore it).", show_default=False)]
AdaptiveOpt = Annotated[bool | None, typer.Option("--adaptive-gate/--no-adaptive-gate",
                                                  help="Route with the plan's adaptive gate.", show_default=False)]
GateScaleOpt = Annotated[float | None, typer.Option("--gate-scale", help="Adaptive-gate scale c (thresholds from "
                                                    "the profile), overriding the plan's.", show_default=False)]
PolicyOpt = Annotated[str | None, typer.Option("--policy", help="Eviction policy: lru | lfu.", show_default=False)]


def open_store(model: str | None) -> Store:
    """Resolve MODEL (sharding or downloading on first use, with a progress bar)."""
    from adapmoe_cli.models import open_model

    with byte_progress("preparing the store") as progress:
        return open_model(model, progress=progress)


def runtime_settings(config: Path | None, cache_experts: int | None, memory: str | None,
                     prefetch: bool | None, device: str | None, policy: str | None = None,
                     plan: str | None = None, adaptive: bool | None = None, gate_scale: float | None = None,
                     **generation: object) -> Settings:
    from adapmoe_cli.settings import load_settings

    overrides: dict[str, object] = {
        "cache.experts": cache_experts, "cache.memory": memory, "cache.policy": policy,
        "prefetch": prefetch, "device": device, "plan": plan, "gate.adaptive": adaptive,
        "gate.scale": gate_scale,
    }
    overrides.update({f"generation.{k}": v for k, v in generation.items()})
    return load_settings(config, overrides)


def start_engine(store: Store, settings: Settings) -> Engine:
    """The engine with the budget and gate `planning.resolve` picks; its notes go to stderr."""
    from adapmoe_cli.planning.resolve import resolve
    from adapmoe_cli.runtime.engine import Engine

    choices = resolve(store, settings)
    for note in choices.notes:
        err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    return Engine(store, settings, budget=choices.budget, gate=choices.gate)
