"""Turns settings and what the store holds (plan, profile) into the runtime's two decisions: slots per
layer (`Budget`) and the adaptive gate (`GatePolicy`), with a note saying where each came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapmoe_cli.errors import ProfileError
from adapmoe_cli.planning import gate_rules
from adapmoe_cli.planning.plan_file import Plan, default_path, read_plan
from adapmoe_cli.profiling.profile_file import default_path as default_profile
from adapmoe_cli.profiling.profile_file import read_profile
from adapmoe_cli.runtime.engine import Budget, plan_budget
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
    notes: list[str] = []
    explicit = plan_budget(store, settings).total if settings.explicit_budget else None
    plan = None
    if settings.plan not in ("auto", "none"):
        plan = read_plan(Path(settings.plan), store, explicit)
    elif settings.plan == "auto" and default_path(store).exists():
        try:
            plan = read_plan(default_path(store), store, explicit)
        except ProfileError as e:
            notes.append(f"not using the store's plan: {e}")
    if plan is not None:
        budget = Budget(plan.quotas, f"plan {plan.path}")
        gate = plan.gate
    else:
        budget = plan_budget(store, settings)
        gate = GatePolicy.off()
    if settings.gate.scale is not None:
        prof = read_profile(default_profile(store), store)
        gate = gate_rules.gate(settings.gate.rule, settings.gate.scale, prof.layers)
    if not settings.gate.adaptive:
        gate = GatePolicy.off()
    return RuntimeChoices(budget, gate, plan, tuple(notes))
