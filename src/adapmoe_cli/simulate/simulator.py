"""`simulate()`: the library function behind `adapmoe simulate`. Gates the trace with
`planning.replay.prepare` and replays it with `planning.replay.replay` — the runtime's `ExpertManager`
(same cache, eviction policies, prefetch accounting) — with the simulated loader and clock of `timing`,
for each named policy of the registry (`policies.py`), the limits `belady` and `oracle` included.
Returns plain numbers; rendering is the CLI's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from adapmoe_cli import budget as budgets
from adapmoe_cli.errors import UsageError
from adapmoe_cli.planning.allocate import allocate
from adapmoe_cli.planning.costs import cost_curves
from adapmoe_cli.planning.replay import ReplayHooks, Routing, prepare, replay
from adapmoe_cli.policies import get, policy_budget
from adapmoe_cli.profiling.routing_model import fit as fit_routing
from adapmoe_cli.runtime.cache import ExpertCache
from adapmoe_cli.runtime.eviction import NEEDS_ROUTING, RoutingModel
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.manager import ExpertManager
from adapmoe_cli.runtime.prefetch import DEFAULT_MIN_PRECISION, PrefetchAdmission
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.simulate.hardware import Hardware
from adapmoe_cli.simulate.limits import Belady, io_floor_s, layer_futures, oracle_routing
from adapmoe_cli.simulate.model_spec import ModelSpec
from adapmoe_cli.simulate.timing import Clock, ComputeTimes, SimLoader
from adapmoe_cli.simulate.traces import SimTrace


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


class _Timed(ReplayHooks):
    """Advances the simulated clock where the runtime computes, tells Belady where the replay stands, and
    adds up the counts and time of the steps not in `untimed`."""

    def __init__(self, loader: SimLoader, times: ComputeTimes, stats: Stats, layers: list[int],
                 belady: dict[int, Belady], untimed: frozenset[int]):
        self.loader, self.times, self.stats, self.layers = loader, times, stats, layers
        self.belady, self.untimed = belady, untimed
        self.counted, self.elapsed, self.transfers, self.tokens = Stats(), 0.0, 0, 0
        self._mark()

    def _mark(self) -> None:
        self.before, self.t0, self.n0 = self.stats.copy(), self.loader.clock.now, self.loader.transfers

    def layer(self, step: int, i: int) -> None:
        self.loader.compute(self.times.dense_layer_s)  # attention and router of this layer

    def predict(self, step: int, i: int) -> None:
        self.loader.compute(self.times.predict_s)  # layer i's router on layer i-1's input
        if self.belady:
            self.belady[self.layers[i]].now = step

    def experts(self, step: int, i: int) -> None:
        if self.belady:
            self.belady[self.layers[i]].now = step + 1  # this call's experts are kept; what is ahead counts

    def compute(self, expert: int, views: object) -> None:
        self.loader.compute(self.times.expert_s)

    def step_end(self, step: int) -> None:
        self.loader.compute(self.times.head_s)
        if step not in self.untimed:
            delta = self.stats.delta(self.before)
            self.counted.add(delta)
            self.elapsed += self.loader.clock.now - self.t0
            self.transfers += self.loader.transfers - self.n0
            self.tokens += delta.tokens
        self._mark()


def drive(routing: Routing, quotas: dict[int, int], hw: Hardware, model: ModelSpec, eviction: str = "lru",
          prefetch: bool = False, preload: bool = False, untimed: frozenset[int] = frozenset(),
          routing_model: RoutingModel | None = None, prefetch_precision: float = 0.0) -> PolicyRun:
    """Replay `routing` through a fresh manager on the simulated clock. Numbers and time count the steps
    not in `untimed` (prompt passes), as the bench counts decode steps only. `routing_model`: what a
    predicting eviction policy predicts from."""
    loader = SimLoader(hw, model.slot_bytes, Clock())
    cache = ExpertCache(quotas, stride=0, policy="lru" if eviction == "belady" else eviction, routing=routing_model)
    belady: dict[int, Belady] = {}
    if eviction == "belady":
        for layer, future in zip(routing.layers, layer_futures(routing), strict=True):
            belady[layer] = cache.policies[layer] = Belady(future)
    manager = ExpertManager(cache, loader, admission=PrefetchAdmission(prefetch_precision))
    if preload:
        for layer in routing.layers:
            manager.preload(layer, range(model.num_experts))
    timed = _Timed(loader, ComputeTimes.of(hw, model), manager.stats, routing.layers, belady, untimed)
    replay(routing, manager, prefetch, timed)
    d = timed.counted
    run = PolicyRun(d.hits, d.misses, d.prefetch_hits, d.prefetches_issued, d.wasted_prefetches, d.expert_uses,
                    d.expert_activations, d.layer_tokens, timed.transfers, d.stall_s, timed.elapsed, timed.tokens)
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
        "bytes_read_per_token": run.transfers * model.slot_bytes / tok,
        "slots": sum(quotas.values()), "slots_per_layer": [quotas[k] for k in sorted(quotas)],
        "description": desc,
    }


@dataclass(frozen=True)
class SimRequest:
    budget_slots: int
    policies: list[str]
    gate: GatePolicy = GatePolicy()  # adapmoe's gate (from a plan or --gate-scale)
    sweep: bool = False
    #: the share of the trace's steps (its end) measured; the rest fits the DP plans and the predicting
    #: eviction policies. 0: fit and measure on the whole trace
    holdout: float = 0.0


class _Planner:
    """Gated routings, DP slot plans (per gate and eviction policy) and the predicting policies' routing
    model, computed once and reused across budgets. With a holdout, plans and model come from the steps
    before `cut` and the policies are measured on the steps from it (`routing`, `prompt_steps` renumbered)."""

    def __init__(self, st: SimTrace, gate: GatePolicy, model: ModelSpec, holdout: float = 0.0):
        self.st, self.num_experts = st, model.num_experts
        self.shape = replace(model.cache_shape, layers=tuple(st.trace.layers))
        whole = {False: prepare(st.trace, GatePolicy.off(), st.steps)}
        whole[True] = (prepare(st.trace, gate, st.steps) if gate.thresholds and st.has_weights else whole[False])
        n = len(whole[False].rows)
        self.cut = min(n - 1, max(1, round(n * (1 - holdout)))) if holdout else 0
        if holdout and self.cut < 2:
            raise UsageError(f"--holdout {holdout:g} leaves {self.cut} of the trace's {n} steps to fit the plans and "
                             "the eviction policies on: lower it (0.5 fits on the first half)")
        self.fitted = {g: r.part(0, self.cut or None) for g, r in whole.items()}
        self.routing = {g: r.part(self.cut) for g, r in whole.items()}
        self.prompt_steps = frozenset(s - self.cut for s in st.prompt_steps if s >= self.cut)
        self._curves: dict[tuple[bool, str], list[list[float]]] = {}
        self._model: RoutingModel | None = None

    def routing_model(self, eviction: str) -> RoutingModel | None:
        if eviction not in NEEDS_ROUTING:
            return None
        if self._model is None:
            part = f"steps 0–{self.cut - 1} of " if self.cut else ""
            self._model = fit_routing(self.fitted[False], self.num_experts, f"{part}{self.st.source}")
        return self._model

    def quotas(self, gated: bool, budget: int, eviction: str = "lru") -> dict[int, int]:
        if (gated, eviction) not in self._curves:
            c = cost_curves(self.fitted[gated], self.num_experts, policy=eviction, prefetch=self.st.has_predictions,
                            model=self.routing_model(eviction), prefetch_precision=DEFAULT_MIN_PRECISION)
            self._curves[(gated, eviction)] = c.curves
        slots = allocate(self._curves[(gated, eviction)], budget)
        return dict(zip(self.routing[gated].layers, slots, strict=True))


def _run_policy(name: str, planner: _Planner, total: int, hw: Hardware, model: ModelSpec) -> dict[str, Any]:
    spec = get(name)
    routing = planner.routing[spec.gate]
    quotas = dict(policy_budget(spec, planner.shape, total,
                                lambda gated: planner.quotas(gated, total, spec.eviction)).quotas)
    if spec.prefetch == "oracle":
        routing = oracle_routing(routing)
    run = drive(routing, quotas, hw, model, spec.eviction, prefetch=spec.prefetches, preload=spec.preload,
                untimed=planner.prompt_steps, routing_model=planner.routing_model(spec.eviction),
                prefetch_precision=spec.prefetch_precision(DEFAULT_MIN_PRECISION))
    entry = _entry(run, model, quotas, spec.description)
    if name == "belady":
        floor = io_floor_s(run.misses, run.tokens, model.slot_bytes, hw.link_bandwidth)
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
    if not st.has_predictions and any(get(n).prefetch in ("predicted", "admitted") for n in req.policies):
        names = "/".join(n for n in req.policies if get(n).prefetch in ("predicted", "admitted"))
        notes.append(f"{names}: the trace holds no next-layer predictions, so they prefetch nothing "
                     "(`oracle` shows what exact prediction would give)")
    if not 0 <= req.holdout < 1:
        raise UsageError(f"--holdout must be a share of the trace in [0, 1), got {req.holdout}")
    planner = _Planner(st, gate, model, req.holdout)
    if planner.cut:
        notes.append(f"holdout: the DP plans and markov/learned eviction fitted on the first {planner.cut} steps, "
                     f"every policy measured on the last {len(planner.routing[False].rows)}")
    elif any(get(n).eviction in NEEDS_ROUTING for n in req.policies):
        notes.append("markov/learned eviction fitted on the very trace it replays (optimistic): --holdout 0.5 fits "
                     "on the first half and measures every policy on the rest")
    times = ComputeTimes.of(hw, model)
    out: dict[str, Any] = {
        "hardware": hw.public(),
        "model": model.public(),
        "trace": {"source": st.source,
                  "decode_tokens": len(planner.routing[False].rows) - len(planner.prompt_steps),
                  "layers": st.num_layers,
                  "measured_from_step": planner.cut,
                  "has_weights": st.has_weights, "has_predictions": st.has_predictions},
        "budget_slots": req.budget_slots,
        "total_experts": model.total_experts,
        "gate": {"rule": gate.rule, "scale": gate.scale, "applied": bool(gate.thresholds and st.has_weights)},
        "compute": {"dense_layer_s": times.dense_layer_s, "expert_s": times.expert_s, "head_s": times.head_s,
                    "transfer_s": hw.transfer_s(model.slot_bytes)},
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
                                                                                            planner.prompt_steps)),
    }
    if req.sweep:
        out["sweep"] = sweep(planner, req.policies, hw, model, progress, done={req.budget_slots: pol})
    return out


def _experts_per_token(routing: Routing, prompt_steps: frozenset[int]) -> float:
    steps = [s for s in range(len(routing.rows)) if s not in prompt_steps]
    acts = sum(sum(routing.activations[s]) for s in steps)
    return acts / (sum(routing.rows[s] for s in steps) * len(routing.layers))


def sweep(planner: _Planner, names: list[str], hw: Hardware, model: ModelSpec,
          progress: Callable[[str], None] | None = None, done: dict[int, dict[str, Any]] | None = None
          ) -> list[dict[str, Any]]:
    """Decode tok/s of the budget-dependent policies at 10%…100% of the experts. `done`: slot total →
    {policy: entry} already run on the same planner (a run is deterministic: the same entry again)."""
    swept = [n for n in names if get(n).slots == "budget"]
    points: list[dict[str, Any]] = []
    for total in budgets.sweep_totals(planner.shape):
        frac = total / model.total_experts
        if progress:
            progress(f"sweep {frac:.0%}")
        known = (done or {}).get(total, {})
        res = {n: known[n] if n in known else _run_policy(n, planner, total, hw, model) for n in swept}
        points.append({"budget_slots": total, "fraction": frac,
                       "policies": {n: r["decode_tokens_per_s"] for n, r in res.items()},
                       "stall_s_per_token": {n: r["stall_s_per_token"] for n, r in res.items()}})
    return points
