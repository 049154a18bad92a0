"""The cache plan on disk (format version 1, JSON): slots per layer for a budget, the adaptive gate's
thresholds, the cost curves they were chosen from, and the model it was made for. Read by one function
that refuses other models and newer versions with a message; `Plan.quotas_for` re-solves the slots for
another budget from the stored curves."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from adapmoe_cli import __version__
from adapmoe_cli.errors import ProfileError
from adapmoe_cli.planning.allocate import allocate
from adapmoe_cli.planning.gate_rules import compensates, mode_of, spreads
from adapmoe_cli.profiling import expert_stats
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.store import Store
from adapmoe_cli.versioned import integer, number, read_versioned, write_atomic

FORMAT = "adapmoe-plan"
FORMAT_VERSION = 1
DEFAULT_NAME = "plan.json"


def default_path(store: Store) -> Path:
    return store.path / DEFAULT_NAME


def bench_path(store: Store, slots: int, gated: bool, eviction: str = "lru") -> Path:
    """Where `bench` keeps the plans it makes for its policies (never the store's own plan.json)."""
    tail = "" if eviction == "lru" else f"-{eviction}"
    return store.path / "bench" / f"plan-{slots}-{'gated' if gated else 'topk'}{tail}.json"


@dataclass(frozen=True)
class Plan:
    path: Path | None
    data: dict[str, Any]

    @property
    def budget_slots(self) -> int:
        return int(self.data["budget_slots"])

    @property
    def quotas(self) -> dict[int, int]:
        return {int(x["layer"]): int(x["slots"]) for x in self.data["layers"]}

    def quotas_for(self, total: int) -> dict[int, int]:
        """Slots per layer for a budget of `total` slots: the plan's own when it was made for that budget
        (`read_plan` checked that they add up to it), else the exact DP re-solved on the plan's cost curves
        (instant)."""
        if total == self.budget_slots:
            return self.quotas
        layers = [int(x["layer"]) for x in self.data["layers"]]
        curves = [[float(c) for c in x["cost_curve"]] for x in self.data["layers"]]
        return dict(zip(layers, allocate(curves, total), strict=True))

    @cached_property
    def gate(self) -> GatePolicy:
        th = {int(x["layer"]): float(x["threshold"]) for x in self.data["layers"] if x.get("threshold") is not None}
        rule = self.data.get("gate_rule", "off")
        stats = None
        if th and compensates(rule):
            model = self.data["model"]
            stats = expert_stats.from_entry(self.data.get("gate_stats"), self.path.parent, sorted(th),
                                            int(model["num_experts"]), str(self.path))
        return GatePolicy(th, rule=rule, scale=self.data.get("gate_scale"), mode=mode_of(rule), stats=stats,
                          spreads=spreads(rule))

    def public(self) -> dict[str, Any]:
        """The documented `--json` shape."""
        return {
            "budget_slots": self.budget_slots,
            "gate_scale": self.data.get("gate_scale"),
            "layers": [{k: x.get(k) for k in ("layer", "slots", "threshold", "cost_curve", "expected_cost")}
                       for x in self.data["layers"]],
            "total_expected_cost": self.data.get("total_expected_cost"),
        }


def write_plan(path: Path, data: dict[str, Any]) -> Path:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"adapmoe {__version__}", **data}
    return write_atomic(path, doc)


def read_plan(path: Path, store: Store) -> Plan:
    path = Path(path)
    data = read_versioned(path, FORMAT, FORMAT_VERSION, ProfileError, "cache plan", "adapmoe plan-cache --budget …")
    return parse_plan(data, store, path)


def parse_plan(data: dict[str, Any], store: Store, path: Path) -> Plan:
    """Check a plan's content against the store: same model; slots integers in 1 … num_experts that add up to
    its `budget_slots`; thresholds absent or finite ≥ 0; a cost curve of num_experts finite costs ≥ 0
    per layer; every MoE layer exactly once. Everything wrong is a ProfileError naming the field."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("fingerprint") != store.fingerprint:
        raise ProfileError(f"{path} was made for another model; run `adapmoe plan-cache` on {store.path}")
    total = integer(data.get("budget_slots"), f"{path}: budget_slots", ProfileError, 1)
    layers = data.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise ProfileError(f"{path}: layers must be a list of objects")
    seen = []
    for x in layers:
        layer = integer(x.get("layer"), f"{path}: a layer number", ProfileError, 0)
        what = f"{path}: layer {layer}"
        integer(x.get("slots"), f"{what} slots", ProfileError, 1, store.shape.num_experts)
        if x.get("threshold") is not None:
            # (no upper bound: a compensating rule's costs reach its largest spread, above 1 — gate_rules._top)
            number(x["threshold"], f"{what} threshold", ProfileError, 0.0)
        curve = x.get("cost_curve")  # what `quotas_for` re-solves the DP on for another budget
        if not isinstance(curve, list) or len(curve) != store.shape.num_experts:
            raise ProfileError(f"{what}: cost_curve must list the cost at 1 … {store.shape.num_experts} slots")
        for c in curve:
            number(c, f"{what} cost_curve", ProfileError, 0.0)
        seen.append(layer)
    if sorted(seen) != sorted(store.shape.moe_layers):
        raise ProfileError(f"{path} does not list this model's MoE layers (each once)")
    if sum(int(x["slots"]) for x in layers) != total:
        raise ProfileError(f"{path}: its layers' slots add up to {sum(int(x['slots']) for x in layers)}, "
                           f"not its budget_slots {total}; re-run `adapmoe plan-cache`")
    if data.get("gate_scale") is not None:
        number(data["gate_scale"], f"{path}: gate_scale", ProfileError, 0.0)
    if not isinstance(data.get("gate_rule", "off"), str):
        raise ProfileError(f"{path}: gate_rule must be a name")
    return Plan(path, data)
