"""Turns settings and what the store holds (plan, profile) into the runtime's two decisions — slots per
layer (`Budget`) and the adaptive gate (`GatePolicy`) — with notes saying where each came from, and
opens the engine with them (`open_engine`: what chat, eval and serve start from)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapmoe_cli import budget as budgets
from adapmoe_cli.budget import Budget
from adapmoe_cli.errors import ProfileError
from adapmoe_cli.planning import gate_rules
from adapmoe_cli.planning.plan_file import Plan, default_path, read_plan
from adapmoe_cli.profiling.profile_file import default_path as default_profile
from adapmoe_cli.profiling.profile_file import read_profile
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import Settings
from adapmoe_cli.store import Store


@dataclass(frozen=True)
class RuntimeChoices:
    budget: Budget
    gate: GatePolicy
    plan: Plan | None
    notes: tuple[str, ...]


def resolve(store: Store, settings: Settings) -> RuntimeChoices:
    """The settings' budget (`budget.resolve`), split over the layers by the cache plan (`--plan FILE`, else
    the store's plan.json) — the plan's own split when it was made for that many slots, else the DP
    re-solved on its cost curves for them — and the gate (the plan's, `--gate-scale`, or off). The plan
    never changes how many slots there are: that is the budget's alone."""
    notes: list[str] = []
    shape = store.cache_shape
    budget = budgets.resolve(settings.cache.budget, shape)
    plan = None
    if settings.plan not in ("auto", "none"):
        plan = read_plan(Path(settings.plan), store)
    elif settings.plan == "auto" and default_path(store).exists():
        try:
            plan = read_plan(default_path(store), store)
            _ = plan.gate  # its gate's files (a compensating gate's expert statistics) are there and whole
        except ProfileError as e:
            plan = None
            notes.append(f"not using the store's plan: {e}")
    gate = GatePolicy.off()
    if plan is not None and budget.total < shape.total_experts:  # (with every expert cached, nothing to split)
        solved = "" if budget.total == plan.budget_slots else f", re-solved for {budget.total} slots"
        try:
            quotas = plan.quotas_for(budget.total)
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{plan.path} holds no usable cost curves ({e}); re-run `adapmoe plan-cache`") from None
        budget = budgets.planned(shape, quotas, f"{budget.source}; split by plan {plan.path.name}{solved}")
    if plan is not None:
        gate = plan.gate
    if settings.gate.scale is not None and settings.gate.adaptive and not gate_rules.gateable(store.shape.top_k):
        notes.append(gate_rules.ONE_EXPERT)
    elif settings.gate.scale is not None:
        prof = read_profile(default_profile(store), store)
        gate = gate_rules.gate(settings.gate.rule, settings.gate.scale, prof.layers, store.shape.top_k,
                               prof.expert_stats_for(settings.gate.rule, store.shape.top_k))
    if not settings.gate.adaptive:
        gate = GatePolicy.off()
    return RuntimeChoices(budget, gate, plan, tuple(notes))


def open_engine(store: Store, settings: Settings, note: Callable[[str], None] | None = None) -> Engine:
    """The engine with the budget and gate `resolve` picks; `note` hears where they came from."""
    choices = resolve(store, settings)
    for text in choices.notes:
        if note is not None:
            note(text)
    return Engine(store, settings, choices.budget, gate=choices.gate, note=note)
