"""`simulate_bench()`: the simulator checked against a measured `bench` run (`adapmoe bench --simulate`).

1. The routing of the bench's own prompts is recorded (`profiling.record`) in one untimed run per
   distinct gate, with every expert resident: routing does not depend on the cache, so it is the routing
   each policy saw.
2. This machine is calibrated from the same run (`calibrate.measured_hardware`): the bench's own disk
   bandwidth and its runs of the runtime's two ends, `resident` (every expert in memory: the compute of
   a token) and `naive` (every needed expert loaded on demand: what a load takes and costs) —
   interleaved with the other policies, so drift hits all alike — plus one expert's compute and the
   block's prediction, measured right after in decodes no longer than the bench's own decoding (its
   tokens × prompts; 8 to 48 tokens).
3. Each policy's setup — the same slots per layer, eviction, prefetch and gate — is replayed through the
   runtime's manager on the simulated clock (`run.drive`), prompt passes untimed as in the bench.

The counted hits, misses and prefetch hits must equal the bench's; the times of the policies between
the two ends are the simulator's prediction (those of `resident` and `naive` are its calibration).
Times are compared with each policy's fastest repeat, as the calibration uses the fastest repeats: the
simulator models the machine, not what else runs on it (the medians are reported too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapmoe_cli import budget as budgets
from adapmoe_cli.errors import UsageError
from adapmoe_cli.planning.replay import prepare
from adapmoe_cli.profiling.record import RoutingRecorder
from adapmoe_cli.profiling.routing_model import eviction_for
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.measure import Setup, run_setup
from adapmoe_cli.settings import replace
from adapmoe_cli.simulate.calibrate import DecodeTimes, measured_hardware
from adapmoe_cli.simulate.model_spec import from_store
from adapmoe_cli.simulate.simulator import drive
from adapmoe_cli.simulate.traces import SimTrace, from_trace
from adapmoe_cli.store import Store

COUNTED = ("hits", "misses", "prefetch_hits", "expert_activations")
CALIBRATION = ("resident", "naive")  # the runtime's two ends, which calibrate the simulator
TOLERANCE = 0.15  # simulated decode tok/s within 15 % of the measured (fastest repeat)


def record(store: Store, setup: Setup, prompts: list[list[int]], tokens: int) -> SimTrace:
    """The routing `measure.run_setup` sees for these prompts under `setup`'s gate: one step per forward
    pass, each prompt's pass marked untimed."""
    shape = store.shape
    resident = Setup(budgets.all_experts(store.cache_shape), setup.gate, replace(setup.settings, prefetch=False),
                     preload=True)
    recorders: list[RoutingRecorder] = []

    def observe(engine: Engine) -> RoutingRecorder:
        recorders.append(RoutingRecorder(engine))
        return recorders[-1]

    run_setup(store, resident, prompts, tokens, observe=observe)
    tr, steps = recorders[0].trace()
    per_prompt = tokens + 1  # the prompt pass, then `tokens` decode steps
    if len(set(steps)) != per_prompt * len(prompts):
        raise AssertionError(f"recorded {len(set(steps))} forward passes, expected {per_prompt * len(prompts)}")
    prompt_steps = frozenset(i * per_prompt for i in range(len(prompts)))
    return from_trace(tr, shape.num_experts, "the bench's prompts, recorded", steps=steps, prompt_steps=prompt_steps)


def _fastest(entry: dict[str, Any]) -> dict[str, Any]:
    return max(entry["runs"], key=lambda r: r["decode_tokens_per_s"])


def bench_times(measured: dict[str, Any]) -> DecodeTimes:
    """The runtime's two ends as the bench measured them, each from its fastest repeat (the least
    disturbed by the rest of the machine): `resident` (None when it could not run) and `naive`."""
    pol = measured["policies"]
    if "naive" not in pol:
        raise UsageError("bench --simulate calibrates with the naive policy: add it to --policies")
    naive = _fastest(pol["naive"])
    res = _fastest(pol["resident"]) if "resident" in pol else None
    return DecodeTimes(resident_token_s=1 / res["decode_tokens_per_s"] if res else None,
                       demand_token_s=1 / naive["decode_tokens_per_s"], demand_stall_s=naive["stall_s_per_token"],
                       demand_loads=naive["misses"] / naive["decode_tokens"])


def simulate_bench(store: Store, plan: dict[str, Setup], prompts: list[list[int]], tokens: int,
                   measured: dict[str, Any], progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Simulated next to measured for each policy of `plan` (the setups the bench ran)."""
    say = progress or (lambda _msg: None)
    times = bench_times(measured)
    hw = measured_hardware(store, next(iter(plan.values())).settings, measured["disk_read_bytes_per_s"],
                           measured["page_cache"].startswith("bypassed"), times,
                           "adapmoe bench --simulate: the bench's disk bandwidth and its resident and naive runs", say,
                           tokens=min(48, max(8, tokens * len(prompts))))  # a quick bench calibrates quickly
    model = from_store(store)
    traces: dict[tuple, SimTrace] = {}
    out: dict[str, Any] = {"hardware": hw.public(), "calibrated_with": [n for n in CALIBRATION if n in plan],
                           "tolerance": TOLERANCE, "policies": {}}
    for name, setup in plan.items():
        key = (setup.gate.mode, *sorted(setup.gate.thresholds.items()))
        if key not in traces:
            say(f"recording the routing ({setup.gate.rule if setup.gate.thresholds else 'top-k'})")
            traces[key] = record(store, setup, prompts, tokens)
        st = traces[key]
        say(f"simulating {name}")
        routing = prepare(st.trace, setup.gate, st.steps)
        eviction, routing_model = eviction_for(store, setup.settings.cache.policy)  # what the engine ran
        run = drive(routing, dict(setup.budget.quotas), hw, model, eviction, prefetch=setup.settings.prefetch,
                    preload=setup.preload, untimed=st.prompt_steps, routing_model=routing_model,
                    prefetch_precision=setup.settings.prefetch_precision)
        m = measured["policies"][name]
        tps = run.tokens / run.decode_s if run.decode_s else 0.0
        counts, best = m["counts"], _fastest(m)
        out["policies"][name] = {
            "decode_tokens_per_s": tps,
            "measured_decode_tokens_per_s": best["decode_tokens_per_s"],
            "measured_median": m["decode_tokens_per_s"],
            "measured_min": m["decode_tokens_per_s_min"], "measured_max": m["decode_tokens_per_s_max"],
            "error": tps / best["decode_tokens_per_s"] - 1,
            "error_vs_median": tps / m["decode_tokens_per_s"] - 1 if m["decode_tokens_per_s"] else None,
            "stall_s_per_token": run.stall_s / run.tokens if run.tokens else 0.0,
            "measured_stall_s_per_token": best["stall_s_per_token"],
            "hits": run.hits, "misses": run.misses, "prefetch_hits": run.prefetch_hits,
            "expert_activations": run.expert_activations, "tokens": run.tokens,
            # the bench adds up its repeats, each with the same routing and cache contents
            "counts_match": all(getattr(run, k) * m["repeats"] == counts[k] for k in COUNTED),
            "calibration_point": name in CALIBRATION,
        }
    errs = [abs(p["error"]) for p in out["policies"].values() if p["error"] is not None and not p["calibration_point"]]
    out["max_error"] = max(errs) if errs else None
    out["within_tolerance"] = bool(errs) and max(errs) <= TOLERANCE
    return out
