"""`adapmoe profile [MODEL]`: measure gating sensitivity, routing statistics and the routing trace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from adapmoe_cli.cli.common import (
    CacheExpertsOpt,
    ConfigOpt,
    DeviceOpt,
    ExpertsFormatOpt,
    GroupSizeOpt,
    MemoryOpt,
    ModelArg,
    console,
    open_store,
    runtime_settings,
    steps_progress,
)


def register(app: typer.Typer) -> None:
    app.command("profile", help="Measure gating sensitivity, routing statistics and the routing trace.")(profile_cmd)


def profile_cmd(
    model: ModelArg = None,
    text: Annotated[Path | None, typer.Option("--text", help="Calibration text (default: the embedded "
                                              "model's calibration split).", show_default=False)] = None,
    tokens: Annotated[int, typer.Option("--tokens", "-N", help="Calibration tokens to use.")] = 8192,
    window: Annotated[int, typer.Option("--window", help="Tokens per forward pass.")] = 256,
    method: Annotated[str, typer.Option("--method", help="auto | gradient | forward.")] = "auto",
    validate: Annotated[bool, typer.Option("--validate", help="Also measure each layer's real loss increase "
                                           "on held-out text and rank-correlate it with the prediction.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Profile file (default: STORE/profile.json).",
                                             show_default=False)] = None,
    cache_experts: CacheExpertsOpt = None,
    memory: MemoryOpt = None,
    device: DeviceOpt = None,
    experts_format: ExpertsFormatOpt = "native",
    group_size: GroupSizeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe profile --validate

      adapmoe profile ./mixtral-store --text wiki.txt --tokens 4096 --method forward -c 96
    """
    from adapmoe_cli.model_arg import default_text

    if tokens < 2:
        raise typer.BadParameter("must be at least 2", param_hint="--tokens")
    settings = runtime_settings(config, cache_experts=cache_experts, memory=memory, device=device)
    from adapmoe_cli.profiling.profile_file import read_profile  # (after the flags are read: imports torch)
    from adapmoe_cli.profiling.profiler import ProfileRequest, make_profile

    calib = text or default_text("calibration")
    label = str(text) if text else "embedded calibration split (Python documentation)"
    req = ProfileRequest(
        text=calib, text_label=label, tokens=tokens, window=window, method=method,
        validate_text=default_text("heldout") if validate else None,
        validate_label="embedded held-out split" if validate else "", out=out,
    )
    store = open_store(model, experts_format, group_size)
    with steps_progress("profile") as progress:
        path = make_profile(store, settings, req, progress=progress)
    prof = read_profile(path)
    render(prof.data)
    console.print(f"wrote {path}")


def render(data: dict) -> None:
    val = data.get("validation")
    t = Table(title=f"profile ({data['method']} method, {data['calibration']['tokens']} tokens)")
    for col in ("layer", "F_l", "predicted ΔL", *(["measured ΔL"] if val else []), "median w2",
                "1-expert @0.1", "pred. acc."):
        t.add_column(col, justify="right")
    for i, layer in enumerate(data["layers"]):
        q = layer["weight_quantiles"].get("rank2", {}).get("p50", float("nan"))
        single = layer.get("single_expert_ratio", {}).get("0.1", float("nan"))
        acc = layer.get("prediction_accuracy")
        row = [str(layer["layer"]), f"{layer['sensitivity']:.4g}", f"{layer['predicted_drop_loss']:.4g}"]
        if val:
            row.append(f"{val['measured_drop_loss'][i]:.4g}")
        row += [f"{q:.3f}", f"{single:.0%}", "—" if acc is None else f"{acc:.0%}"]
        t.add_row(*row)
    console.print(t)
    if val:
        rho = ", ".join(f"{k} {v:.2f}" for k, v in val["spearman"].items())
        console.print(f"Spearman rank correlation with the measured loss increase: {rho}")
