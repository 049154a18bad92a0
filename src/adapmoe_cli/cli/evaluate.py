"""`adapmoe eval [MODEL] --text FILE`: perplexity, experts per token and single-expert ratio per layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from adapmoe_cli.cli.common import (
    AdaptiveOpt,
    CacheExpertsOpt,
    ConfigOpt,
    DeviceOpt,
    GateScaleOpt,
    MemoryOpt,
    ModelArg,
    PlanOpt,
    console,
    err_console,
    open_store,
    runtime_settings,
    start_engine,
)
from adapmoe_cli.conversation import load_tokenizer
from adapmoe_cli.evaluation import evaluate, read_text_tokens
from adapmoe_cli.models import default_text
from adapmoe_cli.runtime.moe_block import LayerRecord
from adapmoe_cli.settings import Settings, replace
from adapmoe_cli.store import Store


def search_scale(store: Store, settings: Settings, quality_budget: str, calibration: Path | None) -> float:
    """The largest gate scale whose calibration perplexity stays within the budget (bisection)."""
    from adapmoe_cli.planning import gate_rules
    from adapmoe_cli.planning.run import gate_perplexity, parse_fraction
    from adapmoe_cli.profiling.profile_file import default_path, read_profile

    budget = parse_fraction(quality_budget)
    layers = read_profile(default_path(store), store).layers
    with gate_perplexity(store, settings, calibration or default_text("calibration"), 4096) as perplexity:
        found = gate_rules.find_scale(settings.gate.rule, layers, budget, perplexity)
    err_console.print(f"[dim]gate scale {found.scale:.4g}: calibration perplexity {found.increase:+.2%}[/]")
    return found.scale


def register(app: typer.Typer) -> None:
    app.command("eval", help="Perplexity and experts per token over a text.")(eval_cmd)


def eval_cmd(
    model: ModelArg = None,
    text: Annotated[Path | None, typer.Option("--text", help="Text to score (default: the embedded model's "
                                              "held-out split).", show_default=False)] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Score at most this many tokens.",
                                               show_default=False)] = None,
    window: Annotated[int, typer.Option("--window", help="Context window for the sliding evaluation.")] = 256,
    stride: Annotated[int | None, typer.Option("--stride", help="New tokens per window (default: window/2).",
                                               show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plan: PlanOpt = None,
    adaptive_gate: AdaptiveOpt = None,
    gate_scale: GateScaleOpt = None,
    quality_budget: Annotated[str | None, typer.Option("--quality-budget", "-q", help="Search the largest gate "
                                                       "scale within this perplexity increase on the calibration "
                                                       "split (e.g. 1%), then evaluate with it.",
                                                       show_default=False)] = None,
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Text for the --quality-budget search "
                                                     "(default: the embedded calibration split).",
                                                     show_default=False)] = None,
    rule: Annotated[str | None, typer.Option("--rule", help="Threshold rule for --gate-scale/--quality-budget.",
                                             show_default=False)] = None,
    cache_experts: CacheExpertsOpt = None,
    memory: MemoryOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe eval --json

      adapmoe eval --quality-budget 1% --json

      adapmoe eval ./mixtral-store --text wiki.txt --gate-scale 0.002 -c 96
    """
    if quality_budget is not None and gate_scale is not None:
        raise typer.BadParameter("give either --quality-budget or --gate-scale", param_hint="--quality-budget")
    settings = runtime_settings(config, cache_experts, memory, None, device, None, plan, adaptive_gate, gate_scale)
    if rule is not None:
        settings = replace(settings, gate=replace(settings.gate, rule=rule))
    store = open_store(model)
    if quality_budget is not None:
        settings = replace(settings, gate=replace(settings.gate, scale=search_scale(store, settings, quality_budget,
                                                                                   calibration)))
    max_ctx = int(store.config.get("max_position_embeddings", window))
    window = min(window, max_ctx)
    with start_engine(store, settings) as engine:
        ids = read_text_tokens(load_tokenizer(engine), text or default_text("heldout"), min_tokens=2,
                               max_tokens=tokens)
        layers = list(store.shape.moe_layers)
        single = {layer: 0 for layer in layers}
        seen = {layer: 0 for layer in layers}

        def count(rec: LayerRecord) -> None:
            single[rec.layer] += int((rec.keep.sum(-1) == 1).sum())
            seen[rec.layer] += int(rec.keep.shape[0])

        engine.observers.callbacks.append(count)
        with Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), console=err_console,
                      transient=True) as bar:
            task = bar.add_task("eval", total=None)
            res = evaluate(engine, ids, window, stride or max(1, window // 2),
                           progress=lambda d, t: bar.update(task, completed=d, total=t))
        gate = engine.gate
    out = {
        "perplexity": res.perplexity,
        "loss": res.loss,
        "tokens": res.tokens,
        "experts_per_token": res.stats.experts_per_token,
        "top_k": store.shape.top_k,
        "single_expert_ratio": {str(layer): single[layer] / seen[layer] if seen[layer] else 0.0 for layer in layers},
        "gate": {"rule": gate.rule, "scale": gate.scale,
                 "thresholds": {str(k): v for k, v in gate.thresholds.items()}},
        "window": window,
    }
    if as_json:
        print(json.dumps(out, indent=2))
        return
    console.print(f"perplexity {res.perplexity:.3f} over {res.tokens} tokens · "
                  f"{res.stats.experts_per_token:.3f} experts/token (top-{store.shape.top_k}) · "
                  f"gate {gate.rule}" + (f" c={gate.scale:.4g}" if gate.scale is not None else ""))
    t = Table(show_header=True)
    t.add_column("layer", justify="right")
    t.add_column("threshold", justify="right")
    t.add_column("single-expert ratio", justify="right")
    for layer in layers:
        th = gate.threshold(layer)
        t.add_row(str(layer), "—" if th is None else f"{th:.3f}", f"{out['single_expert_ratio'][str(layer)]:.1%}")
    console.print(t)
