"""Shared pieces of the CLI: the console, option aliases reused across commands, progress bars."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from adapmoe_cli.progress import Steps
from adapmoe_cli.settings import DTYPE_CHOICES, load_settings

if TYPE_CHECKING:
    from adapmoe_cli.settings import Settings
    from adapmoe_cli.store import Store

#: the settings before any flag (configs/default.yaml), shown as the defaults in `--help`
DEFAULTS = load_settings()
# lines are never wrapped by rich (the terminal wraps them, at spaces); off a terminal, tables get 120
# columns (or COLUMNS) instead of 80, so names are not cut
_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS") or 120)
console = Console(highlight=False, soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=_WIDTH)

# `--json` is the same flag everywhere: one JSON object on stdout instead of the table (progress and notes
# go to stderr); `--out FILE` names the file a command writes (its result, plan or profile)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the table.")]


@contextlib.contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over bytes, on stderr; yields the callback the library calls with (done, total). The
    bar appears only when work is reported (nothing shows while an existing store is merely opened)."""
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console, transient=True, disable=not sys.stderr.isatty(),
    )
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()


@contextlib.contextmanager
def steps_progress(title: str) -> Iterator[Steps]:
    """A progress bar on stderr for a library function's `Steps`: the step's name, done/total, time elapsed
    and the ETA (appears at the first report; steps without a total show a spinner-like bar)."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=True)
    task = None

    def report(name: str, done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(title)
        bar.update(task, description=f"{title}: {name}", completed=done, total=total or None)

    try:
        yield report
    finally:
        bar.stop()


def _model_named(model: str | None) -> str | None:
    """MODEL checked as it is parsed, before the command imports torch: one that names nothing adapmoe can
    open is said at once (0.4 against 2.5–3 s)."""
    from adapmoe_cli.model_arg import check_model

    check_model(model)
    return model


ModelArg = Annotated[
    str | None,
    typer.Argument(help="Store folder, checkpoint folder or hub id (default: the embedded model).",
                   show_default=False, callback=_model_named),
]
_AUTO = "auto: as many experts as fit in memory"
CacheExpertsOpt = Annotated[
    int | None, typer.Option("--cache-experts", "-c", help="Expert slots in memory, over all layers.",
                             show_default=_AUTO),
]
MemoryOpt = Annotated[
    str | None, typer.Option("--memory", "-m", help="Memory for expert slots, e.g. 6GiB (instead of -c); more than "
                             "the model needs is capped at the model.", show_default=_AUTO),
]
BudgetOpt = Annotated[
    str | None, typer.Option("--budget", "-b", help="Expert slots (32), memory for them (6GiB), a share of all "
                             "experts (50%) or auto (as many as fit in memory).", show_default=False),
]
PrefetchOpt = Annotated[
    bool | None, typer.Option("--prefetch/--no-prefetch", help="Prefetch the next layer's predicted experts (those "
                              "of a kind that has proven right often enough: prefetch_precision in the config).",
                              show_default="prefetch" if DEFAULTS.prefetch else "no-prefetch"),
]
CompileOpt = Annotated[
    bool | None, typer.Option("--compile/--no-compile", help="Compile the decode step (torch.compile): faster "
                              "decoding after a one-time compile (tens of seconds; seconds once cached).",
                              show_default="compile" if DEFAULTS.compile else "no-compile"),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu | cuda | auto.", show_default=DEFAULTS.device)]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML preset over configs/default.yaml.", show_default=False),
]
PlanOpt = Annotated[str | None, typer.Option("--plan", help="Cache plan file, or 'none' to ignore the store's plan. "
                                            "A plan made for another budget is re-solved for this one.",
                                            show_default="the store's plan.json")]
AdaptiveOpt = Annotated[bool | None, typer.Option("--adaptive-gate/--no-adaptive-gate",
                                                  help="Route with the plan's adaptive gate.",
                                                  show_default="adaptive-gate" if DEFAULTS.gate.adaptive
                                                  else "no-adaptive-gate")]


def scale_in_range(scale: float | None) -> float | None:
    """`--gate-scale`, checked as it is read: a finite number ≥ 0 (`plan-cache --gate-scale nan` wrote a plan of
    NaN thresholds over the store's own, which the runtime then refused)."""
    if scale is not None and not 0 <= scale < math.inf:  # (False for NaN too)
        raise typer.BadParameter(f"give a finite number ≥ 0, not {scale}")
    return scale


GateScaleOpt = Annotated[float | None, typer.Option("--gate-scale", help="Adaptive-gate scale c (thresholds from "
                                                    "the profile), overriding the plan's.",
                                                    show_default="the plan's", callback=scale_in_range)]
PolicyOpt = Annotated[str | None, typer.Option("--policy", help="Eviction policy within a layer: auto (markov when "
                                               "the store has a profile, else lru) | lru | lfu | lrfu | markov | "
                                               "learned (the last two predict from the store's profile; "
                                               "docs/cache.md).",
                                               show_default=DEFAULTS.cache.policy)]


def format_named(ctx: typer.Context, param: typer.CallbackParam, name: str) -> str:
    """`--experts-format` (and bench's `--fallback-format`) checked as it is parsed, before torch loads (an
    unknown name took ~3 s to be said), with `--group-size` where that was read first (`_group_for_format`)."""
    from adapmoe_cli.format_names import check_format

    group = ctx.params.get("group_size") if param.name == "experts_format" else None
    check_format(name, group, flag=param.opts[0])
    return name


def _group_for_format(ctx: typer.Context, group_size: int | None) -> int | None:
    """`--group-size` checked against `--experts-format` where that was read first (`format_named`)."""
    from adapmoe_cli.format_names import check_format

    if group_size is not None and "experts_format" in ctx.params:
        check_format(ctx.params["experts_format"], group_size)
    return group_size


ExpertsFormatOpt = Annotated[str, typer.Option(
    "--experts-format", callback=format_named, help="How experts are stored and cached: native (the store's "
    "dtype) | int8 (per channel) | int4 | int2 (group-wise, HQQ) | mxfp4 (GPT-OSS's 4-bit format, kept as "
    "published); dense weights stay as they are (docs/quantization.md).")]
DTYPE_HELP = f"Store dtype: {' | '.join(DTYPE_CHOICES)}."
GroupSizeOpt = Annotated[int | None, typer.Option(
    "--group-size", help="Weights per scale for int4/int2: 32, 64, 128 or 256.", show_default="int4 64, int2 32",
    callback=_group_for_format)]
RuleOpt = Annotated[str | None, typer.Option("--rule", help="Threshold rule of the gate: auto | paper | global | "
                                             "weighted | top-p | weighted-tail | weighted-l2; compensating "
                                             "(a dropped expert replaced by its mean output): weighted+mean | "
                                             "weighted-tail+mean | spread-tail (docs/gating.md).",
                                             show_default=DEFAULTS.gate.rule)]


#: what `--plot FILE` can write, by its suffix (formats matplotlib writes without extra packages)
PLOT_FORMATS = ("png", "svg", "svgz", "pdf", "eps", "ps", "jpg", "jpeg", "tif", "tiff")


def _plot_file(plot: Path | None) -> Path | None:
    """`--plot FILE` checked as it is parsed: the chart's format is FILE's suffix (said before any run, not
    after it: matplotlib refused `bench.json` once the bench had finished)."""
    if plot is not None and plot.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise typer.BadParameter(f"name a .png, .svg or .pdf file (the chart's format is its suffix), not {plot}")
    return _writable("--plot", plot)


def _writable(flag: str, path: Path | None) -> Path | None:
    """A result file (`--out`, `--plot`) checked as it is parsed: not a folder, in a folder that exists — said
    before a run of minutes, not after it."""
    if path is None:
        return None
    from adapmoe_cli.errors import UsageError

    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder: name a file to write")
    if not path.expanduser().absolute().parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {path.expanduser().absolute().parent} does not exist")
    return path


def _out_file(out: Path | None) -> Path | None:
    return _writable("--out", out)


#: `--out FILE` of the commands that report results (bench, simulate)
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Write the results as JSON to this file.", show_default=False,
                              callback=_out_file),
]


def not_an_input(outputs: dict[str, Path | None], inputs: list[str | Path | None]) -> None:
    """Refuse a result file (`--out`, `--plot`) that is one of the command's own input files: writing the
    results would replace the trace, the model config or the prompts it read."""
    import os

    from adapmoe_cli.errors import UsageError

    for flag, out in outputs.items():
        if out is None or not out.exists():
            continue
        for given in inputs:
            read = Path(given).expanduser() if given is not None else None
            if read is not None and read.is_file() and os.path.samefile(out, read):
                raise UsageError(f"{flag} {out} is a file this command reads ({given}); name another file to write")


PlotOpt = Annotated[
    Path | None, typer.Option("--plot", help="Write a chart here (.png, .svg or .pdf).", show_default=False,
                              callback=_plot_file),
]


def bits_in_range(bits: float | None) -> float | None:
    """`--bits` of `fit` and `simulate`, checked as it is read: a number of bits a weight, 1 to 32 (NaN was
    blamed on the model's file, 100 on its byte counts)."""
    if bits is not None and not 1 <= bits <= 32:  # (False for NaN too)
        raise typer.BadParameter(f"give a number of bits from 1 to 32, not {bits}")
    return bits


def QualityBudgetOpt(help: str) -> typer.models.OptionInfo:  # noqa: N802 (used like the aliases above)
    return typer.Option("--quality-budget", "-q", help=help, show_default=False)


def emit(result: Any, as_json: bool, render: Callable[[Any], None], out: Path | None = None,
         plot: Path | None = None, draw: Callable[[Any, Path], None] | None = None) -> None:
    """The one way a command hands back its result: one JSON object on stdout (`--json`) or the table,
    the same JSON in `--out FILE`, and a chart in `--plot FILE`; what was written is said on stderr."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    if out is not None:
        try:
            out.write_text(json.dumps(result, indent=2))
        except OSError as e:
            from adapmoe_cli.errors import OutputError

            raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
        err_console.print(f"wrote {out}")
    if plot is not None and draw is not None:
        try:
            draw(result, plot)
        except OSError as e:
            from adapmoe_cli.errors import OutputError

            raise OutputError(f"cannot write {plot}: {e.strerror or e}") from None
        err_console.print(f"wrote {plot}")


def note(text: str) -> None:
    """Where the library's notes (which plan, which gate, what was skipped) go: one line on stderr."""
    err_console.print(f"[yellow]note:[/] {text}", soft_wrap=True)


def open_store(model: str | None, experts_format: str = "native", group_size: int | None = None) -> Store:
    """Resolve MODEL (sharding or downloading on first use, with a progress bar), its experts in the format
    asked for (`--experts-format`, `--group-size`). A MODEL that names nothing is said before torch loads."""
    from adapmoe_cli.model_arg import check_model

    check_model(model)
    from adapmoe_cli.experts_format import parse_format
    from adapmoe_cli.model_arg import open_model

    fmt = parse_format(experts_format, group_size)
    with byte_progress("preparing the store") as progress:
        return open_model(model, progress=progress, experts_format=fmt)


def runtime_settings(config: Path | None, *, cache_experts: int | None = None, memory: str | None = None,
                     budget: str | None = None, prefetch: bool | None = None, device: str | None = None,
                     compile: bool | None = None,
                     policy: str | None = None, plan: str | None = None, adaptive: bool | None = None,
                     gate_scale: float | None = None, rule: str | None = None, auto_profile: str | None = None,
                     **generation: object) -> Settings:
    """Settings from the config file and the flags given (None: not given)."""
    from adapmoe_cli.budget import BudgetRequest
    from adapmoe_cli.errors import UsageError

    given = [(f, v) for f, v in (("--cache-experts", cache_experts), ("--memory", memory), ("--budget", budget))
             if v is not None]
    if len(given) > 1:
        raise UsageError(f"give the expert budget once: {given[0][0]} or {given[1][0]}, not both")
    request = (BudgetRequest(slots=cache_experts, flag="--cache-experts") if cache_experts is not None else
               BudgetRequest.of_size(memory, "--memory") if memory is not None else
               BudgetRequest.parse(budget, "--budget") if budget is not None else None)
    overrides: dict[str, object] = {
        "cache.budget": request, "cache.policy": policy, "prefetch": prefetch, "device": device, "plan": plan,
        "compile": compile,
        "gate.adaptive": adaptive, "gate.scale": gate_scale, "gate.rule": rule, "auto_profile": auto_profile,
    }
    overrides.update({f"generation.{k}": v for k, v in generation.items()})
    return load_settings(config, overrides)
