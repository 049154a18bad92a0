"""`adapmoe eval [MODEL] --text FILE`: perplexity, experts per token and single-expert ratio per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from adapmoe_cli.cli.common import (
    AdaptiveOpt,
    CacheExpertsOpt,
    ConfigOpt,
    DeviceOpt,
    ExpertsFormatOpt,
    GateScaleOpt,
    GroupSizeOpt,
    JsonFlag,
    MemoryOpt,
    ModelArg,
    PlanOpt,
    PolicyOpt,
    QualityBudgetOpt,
    RuleOpt,
    console,
    emit,
    note,
    open_store,
    runtime_settings,
    steps_progress,
)
from adapmoe_cli.planning import CALIBRATION_TOKENS
from adapmoe_cli.units import parse_fraction


def register(app: typer.Typer) -> None:
    app.command("eval", help="Perplexity and experts per token over a text.")(eval_cmd)


def _whole_or_two(tokens: int) -> int:
    """`--tokens`: 0 (the whole text) or at least 2 (a perplexity needs a token to predict the next one)."""
    if tokens != 0 and tokens < 2:
        raise typer.BadParameter(f"give 0 (the whole text) or at least 2, not {tokens}")
    return tokens


def eval_cmd(
    model: ModelArg = None,
    text: Annotated[Path | None, typer.Option("--text", help="Text to score (default: the embedded model's "
                                              "held-out split).", show_default=False)] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Score at most this many tokens (0: the whole text).",
                                        callback=_whole_or_two)] = 8192,
    window: Annotated[int, typer.Option("--window", help="Context window for the sliding evaluation.", min=2)
                      ] = 256,
    stride: Annotated[int | None, typer.Option("--stride", help="New tokens per window, at most the window "
                                               "(default: window/2).", show_default=False, min=1)] = None,
    as_json: JsonFlag = False,
    plan: PlanOpt = None,
    adaptive_gate: AdaptiveOpt = None,
    gate_scale: GateScaleOpt = None,
    quality_budget: Annotated[str | None, QualityBudgetOpt(
        "Search the largest gate scale within this perplexity increase on the calibration split (e.g. 1%), "
        "then evaluate with it.")] = None,
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Text for the --quality-budget search "
                                                     "(default: the embedded calibration split).",
                                                     show_default=False)] = None,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens", help="Calibration tokens the "
                                                    "--quality-budget search scores each gate on.", min=2)
                                  ] = CALIBRATION_TOKENS,
    rule: RuleOpt = None,
    cache_experts: CacheExpertsOpt = None,
    memory: MemoryOpt = None,
    policy: PolicyOpt = None,
    device: DeviceOpt = None,
    experts_format: ExpertsFormatOpt = "native",
    group_size: GroupSizeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe eval --json

      adapmoe eval --quality-budget 1% --json

      adapmoe eval ./mixtral-store --text wiki.txt --gate-scale 0.002 -c 96
    """
    if stride is not None and stride > window:
        raise typer.BadParameter(f"give at most the window ({window}), not {stride}", param_hint="--stride")
    if quality_budget is not None and gate_scale is not None:
        raise typer.BadParameter("give either --quality-budget or --gate-scale", param_hint="--quality-budget")
    settings = runtime_settings(config, cache_experts=cache_experts, memory=memory, device=device, plan=plan,
                                adaptive=adaptive_gate, gate_scale=gate_scale, rule=rule, policy=policy)
    from adapmoe_cli.evaluation import EvalRequest, evaluate_model  # (after the flags are read: imports torch)

    req = EvalRequest(text=text, tokens=tokens or None, window=window, stride=stride, calibration=calibration,
                      calibration_tokens=calibration_tokens,
                      quality_budget=parse_fraction(quality_budget) if quality_budget is not None else None)
    store = open_store(model, experts_format, group_size)
    with steps_progress("eval") as progress:
        out = evaluate_model(store, settings, req, note=note, progress=progress)
    emit(out, as_json, render)


def render(out: dict[str, Any]) -> None:
    gate = out["gate"]
    console.print(f"perplexity {out['perplexity']:.3f} over {out['tokens']} tokens · "
                  f"{out['experts_per_token']:.3f} experts/token (top-{out['top_k']}) · "
                  f"gate {gate['rule']}" + (f" c={gate['scale']:.4g}" if gate["scale"] is not None else ""))
    t = Table(show_header=True)
    t.add_column("layer", justify="right")
    t.add_column("threshold", justify="right")
    t.add_column("single-expert ratio", justify="right")
    for layer, ratio in out["single_expert_ratio"].items():
        th = gate["thresholds"].get(layer)
        t.add_row(layer, "—" if th is None else f"{th:.3f}", f"{ratio:.1%}")
    console.print(t)
    q = out.get("quality_search")
    if q:
        console.print(f"quality budget {q['budget']:.2%}: perplexity {q['calibration']['increase']:+.2%} on the "
                      f"calibration text (95% bound {q['calibration']['increase_bound']:+.2%}), "
                      f"{q['evaluated']['increase']:+.2%} on this text")
