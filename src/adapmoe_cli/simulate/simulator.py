"""`simulate()`: the library function behind `adapmoe simulate`. Gates the trace with
`planning.replay.prepare`, drives the runtime's `ExpertManager` (same cache, eviction policies, prefetch
accounting) exactly as `planning.replay.replay` does, but with the simulated loader and clock of
`timing`, for each named policy of `bench.POLICIES` plus the limits `belady` and `oracle`. Returns plain
numbers; rendering is the CLI's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapmoe_cli.bench import POLICIES as BENCH_POLICIES
from adapmoe_cli.errors import UsageError
from adapmoe_cli.planning.allocate import allocate
from adapmoe_cli.planning.costs import cost_curves
from adapmoe_cli.planning.replay import Routing, prepare
from adapmoe_cli.runtime.cache import ExpertCache, even_quotas
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.manager import ExpertManager
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.simulate.hardware import Hardware
from adapmoe_cli.simulate.limits import Belady, io_floor_s, layer_futures, oracle_routing
from adapmoe_cli.simulate.models import ModelSpec
from adapmoe_cli.simulate.timing import Clock, ComputeTimes, SimLoader
from adapmoe_cli.simulate.traces import SimTrace
from adapmoe_cli.units import parse_size


@dataclass(frozen=True)
class SimPolicy:
    name: str
    description: str
    slots: str = "budget"  # budget | topk | all
    split: str = "even"  # even | plan
    eviction: str = "lru"  # lru | lfu | none | belady
    prefetch: str = "none"  # none | trace | oracle
    gate: bool = False
    preload: bool = False


def _from_bench() -> dict[str, SimPolicy]:
    out = {n: SimPolicy(n, p.description, p.slots, p.split, p.eviction, "trace" if p.prefetch else "none",
                        p.gate, p.preload) for n, p in BENCH_POLICIES.items()}
    out["belady"] = SimPolicy("belady", "limit: Belady's optimal eviction (knows the future), even split, no "
                              "prefetch", eviction="belady")
    out["oracle"] = SimPolicy("oracle", "limit: LRU, even split, prefetch of exactly the next layer's experts",
                              prefetch="oracle")
    return out


POLICIES: dict[str, SimPolicy] = _from_bench()
LIMITS = ("belady", "oracle")
DEFAULT_POLICIES = ("naive", "lru", "lru+prefetch", "planned", "adapmoe", "resident")
SWEEP_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


def parse_policies(text: str) -> list[str]:
    """The bench's names plus the limits; the limits are always added."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        raise UsageError(f"unknown policy {unknown[0] if unknown else '(none)'}; known: {', '.join(POLICIES)}")
    return names + [n for n in LIMITS if n not in names]


def parse_budget(text: str, model: ModelSpec) -> int:
    """`64` → 64 slots; `24GiB` → as many of the model's experts as fit."""
    t = str(text).strip()
    slots = int(t) if t.isdigit() else parse_size(t) // model.expert_bytes
    if slots < model.num_layers:
        raise UsageError(f"a budget of {slots} slots is below one per MoE layer ({model.num_layers}); raise --budget")
    if slots > model.total_experts:
        raise UsageError(f"a budget of {slots} slots is larger than the model ({model.total_experts} experts)")
    return slots


@dataclass
class PolicyRun:
    """Counted numbers of the decode steps of one replay, and the simulated time they took."""

    hits: int
    misses: int
    prefetch_hits: int
    prefetches_issued: int
    wasted_prefetches: int
    expert_uses: int
    expert_activations: int
    layer_tokens: int
    transfers: int
    stall_s: float
    decode_s: float
    tokens: int


def drive(routing: Routing, quotas: dict[int, int], hw: Hardware, model: ModelSpec, eviction: str = "lru",
          prefetch: bool = False, preload: bool = False, untimed: frozenset[int] = frozenset()) -> PolicyRun:
    """Replay `routing` through a fresh manager on the simulated clock. Numbers and time count the steps
    not in `untimed` (prompt passes), as the bench counts decode steps only."""
    clock = Clock()
    loader = SimLoader(hw, model.expert_bytes, clock)
    cache = ExpertCache(quotas, stride=0, policy="lru" if eviction == "belady" else eviction)
    belady: dict[int, Belady] = {}
    if eviction == "belady":
        for layer, future in zip(routing.layers, layer_futures(routing), strict=True):
            belady[layer] = cache.policies[layer] = Belady(future)
    manager = ExpertManager(cache, loader)
    stats, times, layers = manager.stats, ComputeTimes.of(hw, model), routing.layers
    if preload:
        for layer in layers:
            manager.preload(layer, range(model.num_experts))

    def compute(expert: int, views: object) -> None:
        loader.compute(times.expert_s)

    counted, elapsed, transfers, tokens = Stats(), 0.0, 0, 0
    for step, need_row in enumerate(routing.needed):
        before, t0, n0 = stats.copy(), clock.now, loader.transfers
        n = routing.rows[step]
        for i, layer in enumerate(layers):
            loader.compute(times.dense_layer_s)  # attention and router of this layer
            nxt = routing.predicted[step][i + 1] if i + 1 < len(layers) else None
            if prefetch and nxt is not None:
                loader.compute(times.predict_s)  # the next layer's router on this layer's input
                if belady:
                    belady[layers[i + 1]].now = step
                manager.prefetch(layers[i + 1], nxt)
            stats.layer_tokens += n
            stats.expert_activations += routing.activations[step][i]
            if belady:
                belady[layer].now = step + 1  # this call's experts are kept; what is ahead counts
            manager.run_layer(layer, list(need_row[i]), compute)
        loader.compute(times.head_s)
        stats.tokens += n
        if step not in untimed:
            counted.add(stats.delta(before))
            elapsed += clock.now - t0
            transfers += loader.transfers - n0
            tokens += n
    d = counted
    run = PolicyRun(d.hits, d.misses, d.prefetch_hits, d.prefetches_issued, d.wasted_prefetches, d.expert_uses,
                    d.expert_activations, d.layer_tokens, transfers, d.stall_s, elapsed, tokens)
    loader.flush()
    manager.close()
    return run


def _entry(run: PolicyRun, model: ModelSpec, quotas: dict[int, int], desc: str) -> dict[str, Any]:
    tok = run.tokens or 1
    return {
        "hits": run.hits, "misses": run.misses, "prefetch_hits": run.prefetch_hits,
        "stall_s_per_token": run.stall_s / tok,
        "decode_tokens_per_s": run.tokens / run.decode_s if run.decode_s else 0.0,
        "decode_s_per_token": run.decode_s / tok,
        "hit_rate": (run.hits + run.prefetch_hits) / run.expert_uses if run.expert_uses else 0.0,
        "experts_per_token": run.expert_activations / run.layer_tokens if run.layer_tokens else 0.0,
        "prefetches_issued": run.prefetches_issued, "wasted_prefetches": run.wasted_prefetches,
        "bytes_read_per_token": run.transfers * model.expert_bytes / tok,
        "slots": sum(quotas.values()), "slots_per_layer": [quotas[k] for k in sorted(quotas)],
        "description": desc,
    }


@dataclass(frozen=True)
class SimRequest:
    budget_slots: int
    policies: list[str]
    gate: GatePolicy = GatePolicy()  # adapmoe's gate (from a plan or --gate-scale)
    sweep: bool = False


class _Planner:
    """Gated routings and DP slot plans, computed once per gate and reused across budgets."""

    def __init__(self, st: SimTrace, gate: GatePolicy, num_experts: int):
        self.st, self.num_experts = st, num_experts
        self.routing = {False: prepare(st.trace, GatePolicy.off(), st.steps)}
        self.routing[True] = (prepare(st.trace, gate, st.steps) if gate.thresholds and st.has_weights
                              else self.routing[False])
        self._curves: dict[bool, list[list[float]]] = {}

    def quotas(self, gated: bool, budget: int) -> dict[int, int]:
        if gated not in self._curves:
            c = cost_curves(self.routing[gated], self.num_experts, policy="lru", prefetch=self.st.has_predictions)
            self._curves[gated] = c.curves
        slots = allocate(self._curves[gated], budget)
        return dict(zip(self.routing[gated].layers, slots, strict=True))


def _run_policy(name: str, planner: _Planner, budget: int, hw: Hardware, model: ModelSpec) -> dict[str, Any]:
    spec, st = POLICIES[name], planner.st
    layers = st.trace.layers
    routing = planner.routing[spec.gate]
    if spec.slots == "all":
        quotas = {layer: model.num_experts for layer in layers}
    elif spec.slots == "topk":
        quotas = {layer: min(model.top_k, model.num_experts) for layer in layers}
    elif spec.split == "plan":
        quotas = planner.quotas(spec.gate, budget)
    else:
        quotas = even_quotas(layers, budget, model.num_experts)
    if spec.prefetch == "oracle":
        routing = oracle_routing(routing)
    run = drive(routing, quotas, hw, model, spec.eviction, prefetch=spec.prefetch != "none", preload=spec.preload,
                untimed=st.prompt_steps)
    entry = _entry(run, model, quotas, spec.description)
    if name == "belady":
        floor = io_floor_s(run.misses, run.tokens, model.expert_bytes, hw.link_bandwidth)
        entry["io_floor_s_per_token"] = floor
        entry["io_floor_tokens_per_s"] = 1 / floor if floor else None
    return entry


def simulate(st: SimTrace, hw: Hardware, model: ModelSpec, req: SimRequest,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    if st.num_layers != model.num_layers or st.num_experts != model.num_experts:
        raise UsageError("project the trace onto the model first (simulate.traces.project)")
    if st.decode_steps < 1:
        raise UsageError(f"the trace {st.source} has no decode steps to simulate")
    notes = list(st.notes)
    gate = req.gate
    if "adapmoe" in req.policies:
        if not st.has_weights:
            notes.append("adapmoe: the trace has no routing weights, so its gate falls back to plain top-k")
        elif not gate.thresholds:
            notes.append("adapmoe: no plan or --gate-scale gave thresholds: the adaptive gate is off (plain top-k)")
    if not st.has_predictions and any(POLICIES[n].prefetch == "trace" for n in req.policies):
        names = "/".join(n for n in req.policies if POLICIES[n].prefetch == "trace")
        notes.append(f"{names}: the trace holds no next-layer predictions, so they prefetch nothing "
                     "(`oracle` shows what exact prediction would give)")
    planner = _Planner(st, gate, model.num_experts)
    times = ComputeTimes.of(hw, model)
    out: dict[str, Any] = {
        "hardware": hw.public(),
        "model": model.public(),
        "trace": {"source": st.source, "decode_tokens": st.decode_steps, "layers": st.num_layers,
                  "has_weights": st.has_weights, "has_predictions": st.has_predictions},
        "budget_slots": req.budget_slots,
        "total_experts": model.total_experts,
        "gate": {"rule": gate.rule, "scale": gate.scale, "applied": bool(gate.thresholds and st.has_weights)},
        "compute": {"dense_layer_s": times.dense_layer_s, "expert_s": times.expert_s, "head_s": times.head_s,
                    "transfer_s": hw.transfer_s(model.expert_bytes)},
        "policies": {},
        "notes": notes,
    }
    for name in req.policies:
        if progress:
            progress(name)
        out["policies"][name] = _run_policy(name, planner, req.budget_slots, hw, model)
    pol = out["policies"]
    out["limits"] = {
        "io_floor_s_per_token": pol["belady"]["io_floor_s_per_token"] if "belady" in pol else None,
        "io_floor_tokens_per_s": pol["belady"]["io_floor_tokens_per_s"] if "belady" in pol else None,
        "compute_floor_tokens_per_s": 1 / times.token_s(model.num_layers, _experts_per_token(planner.routing[False],
                                                                                            st.prompt_steps)),
    }
    if req.sweep:
        out["sweep"] = sweep(planner, req.policies, hw, model, progress)
    return out


def _experts_per_token(routing: Routing, prompt_steps: frozenset[int]) -> float:
    steps = [s for s in range(len(routing.rows)) if s not in prompt_steps]
    acts = sum(sum(routing.activations[s]) for s in steps)
    return acts / (sum(routing.rows[s] for s in steps) * len(routing.layers))


def sweep(planner: _Planner, names: list[str], hw: Hardware, model: ModelSpec,
          progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Decode tok/s of the budget-dependent policies at 10%…100% of the experts."""
    swept = [n for n in names if POLICIES[n].slots == "budget"]
    points: list[dict[str, Any]] = []
    budgets = sorted({max(model.num_layers, round(f * model.total_experts)) for f in SWEEP_FRACTIONS})
    for budget in budgets:
        frac = budget / model.total_experts
        if progress:
            progress(f"sweep {frac:.0%}")
        res = {n: _run_policy(n, planner, budget, hw, model) for n in swept}
        points.append({"budget_slots": budget, "fraction": budget / model.total_experts,
                       "policies": {n: r["decode_tokens_per_s"] for n, r in res.items()},
                       "stall_s_per_token": {n: r["stall_s_per_token"] for n, r in res.items()}})
    return points
