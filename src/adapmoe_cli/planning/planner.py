"""`make_plan()`: the library function behind `adapmoe plan-cache`: gate from the profile (a given scale,
or the largest within a quality budget on the calibration text), cost curves from the trace replayed
with that gate, slots by dynamic programming, and the plan file. `parse_budget` and `parse_fraction`
turn the user's words into numbers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapmoe_cli.errors import UsageError
from adapmoe_cli.planning import gate_rules
from adapmoe_cli.planning.allocate import allocate, total_cost
from adapmoe_cli.planning.costs import cost_curves
from adapmoe_cli.planning.plan_file import default_path, write_plan
from adapmoe_cli.planning.replay import prepare
from adapmoe_cli.profiling.profile_file import default_path as default_profile
from adapmoe_cli.profiling.profile_file import model_identity, read_profile
from adapmoe_cli.runtime.cache import even_quotas
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import Settings
from adapmoe_cli.store import Store
from adapmoe_cli.units import parse_size


def parse_budget(text: str, store: Store) -> int:
    """`48` → 48 slots; `6GiB` → as many expert slots as fit. Validated against the model's range."""
    text = str(text).strip()
    slots = int(text) if text.isdigit() else parse_size(text) // store.expert_stride
    n_layers, total = len(store.shape.moe_layers), len(store.experts)
    if slots < n_layers:
        raise UsageError(f"a budget of {slots} slots is below one per MoE layer ({n_layers}); raise --budget")
    if slots > total:
        raise UsageError(f"a budget of {slots} slots is larger than the model ({total} experts)")
    return slots


def parse_fraction(text: str) -> float:
    """`1%` → 0.01, `0.01` → 0.01. Refuses ≤ 0 and absurd values (> 50%)."""
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"cannot read quality budget {text!r}: use a percentage like 1%") from None
    if not 0 < value <= 0.5:
        raise UsageError(f"quality budget {text!r} must be above 0% and at most 50%")
    return value


@dataclass
class PlanRequest:
    budget_slots: int
    gate_mode: str  # "quality" | "scale" | "off"
    rule: str = "auto"
    quality_budget: float = 0.01
    scale: float | None = None
    calibration: list[int] | None = None  # token ids for the quality search
    window: int = 256
    profile: Path | None = None
    out: Path | None = None


def make_plan(store: Store, settings: Settings, req: PlanRequest,
              perplexity: Callable[[GatePolicy], float] | None = None) -> tuple[Path, dict[str, Any]]:
    prof = read_profile(req.profile or default_profile(store), store)
    layers_p = prof.layers
    search = None
    if req.gate_mode == "off":
        gate = GatePolicy.off()
    elif req.gate_mode == "scale":
        gate = gate_rules.gate(req.rule, float(req.scale or 0.0), layers_p)
    else:
        if perplexity is None:
            raise UsageError("the quality-budget search needs calibration text")
        search = gate_rules.find_scale(req.rule, layers_p, req.quality_budget, perplexity)
        gate = gate_rules.gate(req.rule, search.scale, layers_p)
    trace = prof.trace()
    routing = prepare(trace, gate)
    shape = store.shape
    curves = cost_curves(routing, shape.num_experts, policy=settings.cache.policy, prefetch=settings.prefetch)
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
        "policy": settings.cache.policy,
        "prefetch": settings.prefetch,
        "layers": layers,
        "total_expected_cost": total_cost(curves.curves, slots),
        "even_split_expected_cost": total_cost(curves.curves, even_slots),
        "experts_per_token": sum(curves.uses_per_token) / len(curves.uses_per_token),
        "profile": {"path": str(prof.path), "tokens": trace.num_tokens},
    }
    if search is not None:
        data["quality_search"] = {
            "budget": req.quality_budget, "base_perplexity": search.base_perplexity,
            "perplexity": search.perplexity, "increase": search.increase,
            "tried": [{"scale": s, "perplexity": p} for s, p in search.evaluations],
        }
    path = write_plan(req.out or default_path(store), data)
    return path, data


@contextlib.contextmanager
def gate_perplexity(store: Store, settings: Settings, text: Path, tokens: int
                           ) -> Iterator[Callable[[GatePolicy], float]]:
    """A function gate → perplexity on `tokens` tokens of `text`, on an engine holding every expert
    (perplexity does not depend on the cache budget, and a full cache makes each pass fast)."""
    from adapmoe_cli.conversation import load_tokenizer
    from adapmoe_cli.evaluation import evaluate, read_text_tokens
    from adapmoe_cli.runtime.engine import Budget, Engine

    shape = store.shape
    full = Budget(even_quotas(shape.moe_layers, len(store.experts), shape.num_experts), "all experts")
    with Engine(store, settings, budget=full) as engine:
        ids = read_text_tokens(load_tokenizer(engine), text, min_tokens=64, max_tokens=tokens)
        window = int(min(256, store.config.get("max_position_embeddings", 256)))

        def perplexity(gate: GatePolicy) -> float:
            engine.use_gate(gate)
            return evaluate(engine, ids, window).perplexity

        yield perplexity
