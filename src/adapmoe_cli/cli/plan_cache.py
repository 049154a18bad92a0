"""`adapmoe plan-cache [MODEL] [--budget (N | SIZE | SHARE)]`: adaptive-gate thresholds and slots per layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from adapmoe_cli.budget import total_slots
from adapmoe_cli.cli.common import (
    BudgetOpt,
    ConfigOpt,
    DeviceOpt,
    ExpertsFormatOpt,
    GroupSizeOpt,
    JsonFlag,
    ModelArg,
    PolicyOpt,
    PrefetchOpt,
    QualityBudgetOpt,
    RuleOpt,
    console,
    open_store,
    runtime_settings,
    scale_in_range,
    steps_progress,
)
from adapmoe_cli.planning import CALIBRATION_TOKENS
from adapmoe_cli.units import format_bytes, parse_fraction


def register(app: typer.Typer) -> None:
    app.command("plan-cache", help="Choose adaptive-gate thresholds and cache slots per layer.")(plan_cmd)


def plan_cmd(
    model: ModelArg = None,
    budget: BudgetOpt = None,
    quality_budget: Annotated[str, QualityBudgetOpt("Allowed perplexity increase for the gate, e.g. 1% "
                                                     "(default 1%).")] = "1%",
    gate_scale: Annotated[float | None, typer.Option("--gate-scale", callback=scale_in_range, show_default=False,
                                                     help="Set the gate scale c directly.")] = None,
    adaptive_gate: Annotated[bool, typer.Option("--adaptive-gate/--no-adaptive-gate",
                                                help="Plan with the adaptive gate (default) or plain top-k.")] = True,
    rule: RuleOpt = None,
    text: Annotated[Path | None, typer.Option("--text", help="Calibration text for the quality search "
                                              "(default: the embedded calibration split).", show_default=False)] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Calibration tokens for the quality search.", min=2)
                      ] = CALIBRATION_TOKENS,
    profile: Annotated[Path | None, typer.Option("--profile", help="Profile file (default: STORE/profile.json).",
                                                 show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Plan file to write (default: STORE/plan.json).",
                                             show_default=False)] = None,
    as_json: JsonFlag = False,
    prefetch: PrefetchOpt = None,
    policy: PolicyOpt = None,
    device: DeviceOpt = None,
    experts_format: ExpertsFormatOpt = "native",
    group_size: GroupSizeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe plan-cache --budget 32

      adapmoe plan-cache ./mixtral-store --budget 24GiB --quality-budget 0.5% --json
    """
    settings = runtime_settings(config, budget=budget, prefetch=prefetch, device=device, policy=policy, rule=rule)
    from adapmoe_cli.planning.plan_file import Plan  # (after the flags are read: these import torch)
    from adapmoe_cli.planning.planner import PlanRequest, make_plan

    store = open_store(model, experts_format, group_size)
    slots, _ = total_slots(settings.cache.budget, store.cache_shape)
    mode = "off" if not adaptive_gate else ("scale" if gate_scale is not None else "quality")
    req = PlanRequest(budget_slots=slots, gate_mode=mode, rule=settings.gate.rule, scale=gate_scale, profile=profile,
                      out=out, quality_budget=parse_fraction(quality_budget) if mode == "quality" else 0.01,
                      calibration=text, calibration_tokens=tokens)
    with steps_progress("plan-cache") as progress:
        plan = Plan(*make_plan(store, settings, req, progress=progress))
    if as_json:
        print(json.dumps(plan.public(), indent=2))
        return
    render(plan.data, store.slot_bytes)
    console.print(f"wrote {plan.path}")


def render(data: dict, stride: int) -> None:
    t = Table(title=f"cache plan: {data['budget_slots']} slots ({format_bytes(data['budget_slots'] * stride)}), "
                    f"gate {data['gate_rule']} c={data['gate_scale'] if data['gate_scale'] is not None else '—'}")
    for col in ("layer", "slots", "threshold", "experts/token", "predicted hit rate", "expected stalls/token"):
        t.add_column(col, justify="right")
    for x in data["layers"]:
        th = "—" if x["threshold"] is None else f"{x['threshold']:.3f}"
        t.add_row(str(x["layer"]), str(x["slots"]), th, f"{x['uses_per_token']:.2f}",
                  f"{x['predicted_hit_rate']:.1%}", f"{x['expected_cost']:.3f}")
    console.print(t)
    console.print(f"expected stalls per token: {data['total_expected_cost']:.3f} "
                  f"(even split: {data['even_split_expected_cost']:.3f})")
    q = data.get("quality_search")
    if q and q.get("unreachable"):
        console.print(f"[yellow]{escape(q['unreachable'])}[/]")
    elif q:
        console.print(f"quality budget {q['budget']:.2%}: perplexity {q['base_perplexity']:.3f} → "
                      f"{q['perplexity']:.3f} ({q['increase']:+.2%}, 95% bound {q['increase_bound']:+.2%}) "
                      "on the calibration text")
