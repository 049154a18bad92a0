"""`make_plan()`: the library function behind `adapmoe plan-cache`: gate from the profile (a given scale,
or the largest within a quality budget on the calibration text, `quality.py`), cost curves from the
trace replayed with that gate, slots by dynamic programming, and the plan file."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapmoe_cli.budget import even_quotas
from adapmoe_cli.model_arg import default_text
from adapmoe_cli.planning import CALIBRATION_TOKENS, gate_rules
from adapmoe_cli.planning.allocate import allocate, total_cost
from adapmoe_cli.planning.costs import cost_curves
from adapmoe_cli.planning.gate_rules import GateQuality
from adapmoe_cli.planning.plan_file import default_path, parse_plan, write_plan
from adapmoe_cli.planning.quality import counted, gate_quality
from adapmoe_cli.planning.replay import prepare
from adapmoe_cli.profiling import expert_stats
from adapmoe_cli.profiling.profile_file import default_path as default_profile
from adapmoe_cli.profiling.profile_file import model_identity, read_profile
from adapmoe_cli.profiling.routing_model import eviction_for
from adapmoe_cli.progress import Steps, within
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import Settings
from adapmoe_cli.store import Store


@dataclass
class PlanRequest:
    budget_slots: int
    gate_mode: str  # "quality" | "scale" | "off"
    rule: str = "auto"
    quality_budget: float = 0.01
    scale: float | None = None
    calibration: Path | None = None  # text for the quality search (default: the embedded calibration split)
    calibration_tokens: int = CALIBRATION_TOKENS
    profile: Path | None = None
    out: Path | None = None


def make_method(store: Store, settings: Settings, progress: Steps | None = None) -> Path:
    """Turn AdapMoE on for a store that has no profile: profile it on the calibration text, then plan the
    cache for the budget in use with the gate at a 1 % quality budget (what the embedded model ships)."""
    from adapmoe_cli import budget as budgets
    from adapmoe_cli.profiling.profiler import ensure_profile

    text = default_text("calibration")
    ensure_profile(store, settings, text, "embedded calibration split (Python documentation)", progress)
    total, _ = budgets.total_slots(settings.cache.budget, store.cache_shape)
    return make_plan(store, settings, PlanRequest(budget_slots=total, gate_mode="quality"), progress=progress)[0]


def make_plan(store: Store, settings: Settings, req: PlanRequest,
              quality: Callable[[GatePolicy], GateQuality] | None = None,
              progress: Steps | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the plan; returns its path and content. `quality` (gate → its quality on the calibration text,
    `quality.gate_quality`) lets a caller that makes several plans share one engine for the quality search;
    without it, one is opened."""
    prof = read_profile(req.profile or default_profile(store), store)
    out = req.out or default_path(store)
    layers_p = prof.layers
    stats = prof.expert_stats_for(req.rule, store.shape.top_k) if req.gate_mode != "off" else None
    search = None
    if req.gate_mode == "off":
        gate = GatePolicy.off()
    elif req.gate_mode == "scale":
        gate = gate_rules.gate(req.rule, float(req.scale or 0.0), layers_p, store.shape.top_k, stats)
    else:
        with contextlib.ExitStack() as stack:
            if quality is None:
                text = req.calibration or default_text("calibration")
                quality = stack.enter_context(gate_quality(store, settings, text, req.calibration_tokens))
            search = gate_rules.find_scale(req.rule, layers_p, req.quality_budget, counted(quality, progress),
                                            top_k=store.shape.top_k, stats=stats)
        gate = gate_rules.gate(req.rule, search.scale, layers_p, store.shape.top_k, stats)
    trace = prof.trace()
    routing = prepare(trace, gate)
    shape = store.shape
    eviction, model = eviction_for(store, settings.cache.policy)
    curves = cost_curves(routing, shape.num_experts, policy=eviction, prefetch=settings.prefetch,
                         progress=within(progress, "cost curves"), model=model,
                         prefetch_precision=settings.prefetch_precision)
    slots = allocate(curves.curves, req.budget_slots)
    even = even_quotas(shape.moe_layers, req.budget_slots, shape.num_experts)
    even_slots = [even[layer] for layer in curves.layers]
    layers = []
    for i, layer in enumerate(curves.layers):
        layers.append({
            "layer": layer, "slots": slots[i], "threshold": gate.threshold(layer),
            "cost_curve": curves.curves[i], "expected_cost": curves.curves[i][slots[i] - 1],
            "predicted_hit_rate": curves.hit_rate(i, slots[i]),
            "uses_per_token": curves.uses_per_token[i],
        })
    data: dict[str, Any] = {
        "model": model_identity(store),
        "budget_slots": req.budget_slots,
        "gate_rule": gate.rule,
        "gate_scale": gate.scale,
        **({"gate_stats": expert_stats.entry(gate.stats, out.parent)} if gate.stats is not None else {}),
        "policy": eviction,
        "prefetch": settings.prefetch,
        "prefetch_precision": settings.prefetch_precision,
        "layers": layers,
        "total_expected_cost": total_cost(curves.curves, slots),
        "even_split_expected_cost": total_cost(curves.curves, even_slots),
        "experts_per_token": sum(curves.uses_per_token) / len(curves.uses_per_token),
        # inside the store: its name only (the plan stays true when the store is copied or shipped)
        "profile": {"path": prof.path.name if prof.path.parent == store.path else str(prof.path),
                    "tokens": trace.num_tokens},
    }
    if search is not None:
        data["quality_search"] = {
            "budget": req.quality_budget, "base_perplexity": search.base_perplexity,
            "perplexity": search.perplexity, "increase": search.increase, "increase_bound": search.bound,
            "tried": [{"scale": s, "perplexity": q.perplexity, "increase_bound": q.bound,
                       "experts_per_token": q.experts_per_token} for s, q in search.evaluations],
            "reachable": search.reachable, "unreachable": search.unreachable_text(req.quality_budget),
        }
    parse_plan(data, store, out)  # (never write a plan the runtime would refuse: a NaN threshold replaced one)
    path = write_plan(out, data)
    return path, data

