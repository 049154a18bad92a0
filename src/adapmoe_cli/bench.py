"""`run_bench()`: the designs side by side on one model, one budget, one machine, in one run — the library
function behind `adapmoe bench`.

Each policy is a named configuration of the one runtime (`policies.py`); no policy has a code path of
its own. Repeats are interleaved across policies so drift hits all alike; every run starts from a cold
cache, and experts come from disk through O_DIRECT reads (page cache bypassed; `o_direct` and `page_cache`
report what the engines' own file descriptors had). Perplexity depends only
on the gate, so it is measured once per distinct gate on held-out text. The store is profiled first
when it has no profile (adapmoe's gate and the DP plans need one); the plans are kept under STORE/bench."""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapmoe_cli import budget as budgets
from adapmoe_cli.bench_runs import (
    Outcome,
    PeerRun,
    Runner,
    capped_runner,
    compile_outside_cap,
    in_process,
    last_line,
    ram_bytes,
    worker_argv,
)
from adapmoe_cli.budget import BudgetRequest
from adapmoe_cli.conversation import chat_ids, load_tokenizer
from adapmoe_cli.errors import AdapmoeError, UsageError
from adapmoe_cli.experts_format import ExpertsFormat
from adapmoe_cli.experts_format import quantized as is_quantized
from adapmoe_cli.model_arg import default_text
from adapmoe_cli.planning import HELDOUT_TOKENS
from adapmoe_cli.planning.gate_rules import GateQuality
from adapmoe_cli.planning.plan_file import Plan, bench_path
from adapmoe_cli.planning.planner import PlanRequest, make_plan
from adapmoe_cli.planning.quality import gate_perplexity, gate_quality
from adapmoe_cli.policies import BENCH_DEFAULT, PEERS, get, is_policy, policy_budget
from adapmoe_cli.profiling.profiler import ensure_profile
from adapmoe_cli.progress import Steps
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.measure import DecodeTiming, Setup
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.safe_io import read_text
from adapmoe_cli.settings import Settings, replace
from adapmoe_cli.store import Store
from adapmoe_cli.units import format_bytes, parse_cap


@dataclass(frozen=True)
class BenchRequest:
    policies: tuple[str, ...] = BENCH_DEFAULT
    prompts: tuple[str, ...] = ()  # user messages (chat template applied); empty: the default prompts
    tokens: int = 32  # decoded per prompt
    repeat: int = 3
    quality_budget: float = 0.01  # adapmoe's gate
    sweep: bool = False
    simulate: bool = False
    text: Path | None = None  # held-out text for perplexity (default: the embedded held-out split)
    calibration: Path | None = None  # profiling and the quality search (default: the embedded calibration split)
    memory_caps: tuple[str, ...] = ()  # each a size or a share of the model's bytes on disk: one run per cap
    peer_width: str | None = None  # the GGUF llama.cpp runs (f32, bf16, f16, q8_0, q4_0); default: the store's
    fallback_format: str = "int4"  # the resident low-bit copy of the *+fallback policies
    heldout_tokens: int = HELDOUT_TOKENS  # of `text`, each gate's perplexity is measured on

    def __post_init__(self) -> None:
        if self.tokens < 2 or self.repeat < 1:
            raise UsageError("--tokens must be ≥ 2 and --repeat ≥ 1")
        if self.heldout_tokens < 2:
            raise UsageError("--heldout-tokens must be ≥ 2 (a perplexity needs a token to predict the next one)")


def run(store: Store, settings: Settings, req: BenchRequest, progress: Steps | None = None,
        quality_store: Store | None = None, native_store: Store | None = None,
        fallback: tuple[Store, Store] | None = None) -> dict[str, Any]:
    """Everything `adapmoe bench` measures, as one result dict (the sweep under `sweep`, the simulator's
    check under `simulated`). `quality_store`: where perplexity is computed when it is the same model at a
    lower cost (the unpadded source of a full-size store: the same outputs, store/export.py).
    `native_store`: for a store of quantized experts, the store they were quantized from — the format's own
    perplexity increase is measured against it and the gate's quality budget is what the format leaves of
    `req.quality_budget` (the budget is for the sum of the two losses). `fallback`: the low-bit copies the
    *+fallback policies hold (of `store`, and of `quality_store` or `store` for their quality cost)."""
    say = progress or (lambda _what, _done, _total: None)
    names = list(req.policies)
    if req.simulate:  # the runtime's two ends calibrate the simulator
        names += [n for n in ("naive", "resident") if n not in names]
    shape = store.cache_shape
    # a comparison needs experts to load: without a budget, half of them (not `auto`, which may hold all)
    request = settings.cache.budget if settings.cache.budget.explicit else BudgetRequest(fraction=0.5, flag="--budget")
    slots, _ = budgets.total_slots(request, shape)
    calib_text = req.calibration or default_text("calibration")
    ensure_profile(store, settings, calib_text, str(calib_text), progress=say)
    tok = load_tokenizer(store)
    prompt_ids = [chat_ids(tok, [{"role": "user", "content": t}]) for t in (req.prompts or default_prompts())]
    with contextlib.ExitStack() as stack:
        qstore = quality_store or store
        calib = stack.enter_context(gate_quality(qstore, settings, calib_text))
        heldout_text = req.text or default_text("heldout")
        held = stack.enter_context(gate_perplexity(qstore, settings, heldout_text, req.heldout_tokens))
        formats = None
        if native_store is not None:
            formats = format_quality(native_store, qstore, settings, calib, held, calib_text, heldout_text, req)
            req = dataclasses.replace(req, quality_budget=formats["gate_quality_budget"])
        bench = _Bench(store, settings, req, prompt_ids, calib, held, say, tok, fallback=fallback,
                       quality=qstore, heldout_text=heldout_text)
        before = cpu_times()
        if req.memory_caps:
            result = capped_runs(bench, names, slots, say)
        else:
            result = bench.at(names, slots, simulate=req.simulate)
        result["machine_load"] = machine_load(before)
        if req.sweep:
            swept = [n for n in names if is_policy(n) and get(n).slots == "budget"]
            points = [result] + [bench.at(swept, s) for s in budgets.sweep_totals(shape) if s != slots]
            result["sweep"] = sorted(
                ({"budget_slots": r["budget_slots"],
                  "policies": {n: p["decode_tokens_per_s"] for n, p in r["policies"].items()}} for r in points),
                key=lambda r: r["budget_slots"])
    if quality_store is not None:
        result["perplexity_from"] = (f"{quality_store.path} (the unpadded source of this full-size store: the same "
                                     "outputs, at a fraction of the compute)")
    result["experts_format"] = store.experts_format.label()
    result["heldout_tokens"] = req.heldout_tokens  # (at most: a shorter text is scored whole)
    if formats is not None:
        result["format_quality"] = formats
    result["warnings"] = warnings(result)
    return result


@dataclass(frozen=True)
class BenchStores:
    """What one bench times (`store`), where its perplexity is computed (`quality`: None for the store
    itself) and, for quantized experts, the native store they were made from (`native`)."""

    store: Store
    quality: Store | None = None
    native: Store | None = None
    fallback: tuple[Store, Store] | None = None  # the low-bit copy of `store`, and of the quality store


def bench_stores(model: Store, expert_bytes: int | None, fmt: ExpertsFormat | None, settings: Settings,
                 calibration: Path | None = None, note: Callable[[str], None] | None = None,
                 progress: Steps | None = None, fallback: ExpertsFormat | None = None) -> BenchStores:
    """MODEL's store → the variant `bench --expert-size/--experts-format` times, built once in ADAPMOE_HOME
    (store/export.py). A quantized full-size store gets its profile from the unpadded quantized store (the
    same weights: HQQ quantizes each row's groups on their own, and zero padding quantizes to zeros)."""
    from adapmoe_cli.store.export import carry_method, variant_store

    quantized = is_quantized(fmt)
    if fallback is not None and not fallback.quantized:
        raise UsageError("--fallback-format must be a quantized format (int8, int4, int2)")
    source = variant_store(model, fmt=fmt, note=note) if quantized else model
    small_fb = variant_store(model, fmt=fallback, note=note) if fallback is not None else None
    if expert_bytes is None:
        return BenchStores(source, None, model if quantized else None,
                           (small_fb, small_fb) if small_fb is not None else None)
    big = variant_store(model, expert_bytes, fmt, note=note)
    if quantized:
        calib_text = calibration or default_text("calibration")
        ensure_profile(source, settings, calib_text, str(calib_text), progress=progress)
        carry_method(source, big)  # what it lacks, or carried from what the source has since replaced
    big_fb = variant_store(model, expert_bytes, fallback, note=note) if fallback is not None else None
    return BenchStores(big, source, model if quantized else None,
                       (big_fb, small_fb) if big_fb is not None and small_fb is not None else None)


def format_quality(native: Store, quantized: Store, settings: Settings, calib: Callable[[GatePolicy], GateQuality],
                   held: Callable[[GatePolicy], float], calib_text: Path, heldout_text: Path,
                   req: BenchRequest) -> dict[str, Any]:
    """What quantizing the experts costs, ungated: perplexity against the native store on held-out text
    (reported) and on calibration text (what the gate's search budgets), and the gate's share of the
    quality budget that is left."""
    off = GatePolicy.off()
    with gate_perplexity(native, settings, calib_text) as native_calib, \
            gate_perplexity(native, settings, heldout_text, req.heldout_tokens) as native_held:
        n_cal, n_held = native_calib(off), native_held(off)
    q_cal, q_held = calib(off).perplexity, held(off)
    loss = q_cal / n_cal - 1
    return {"native_store": str(native.path), "native_perplexity": n_held, "perplexity": q_held,
            "increase": q_held / n_held - 1, "calibration_increase": loss, "quality_budget": req.quality_budget,
            "gate_quality_budget": max(0.0, req.quality_budget - loss)}


#: the GGUF width of the same weights as a store of this dtype
GGUF_WIDTH = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
#: … and of a store of quantized experts (its nearest llama.cpp type; int2 has none in the peer's list)
GGUF_OF_FORMAT = {"int8": "q8_0", "int4": "q4_0"}
#: kept free under a cap beyond the measured baseline and the slots: activations, the KV cache, allocator slack
CAP_MARGIN = 64 << 20


def runtime_baseline(bench: _Bench) -> int:
    """Bytes one worker process needs besides its expert slots: Python, torch, transformers, the dense weights,
    the KV cache of a short run — measured, in a group of its own, as the peak working set (memcap.py) of a
    run with one slot per layer, less those slots. The working set leaves out the page cache that a run
    reads once and the cap would reclaim first (the imports' files; with `--compile`, the compiler's cache:
    ~270 MiB the group's usage counted, which left a compiled run 11 slots at a 90 % cap where it runs in
    27). With `--compile` the run is compiled first outside the group (`compile_outside_cap`), as the timed
    runs are: the measured run loads its kernels from the compiler's cache."""
    from adapmoe_cli import bench_worker
    from adapmoe_cli.memcap import run_capped

    shape = bench.store.cache_shape
    setup = Setup(budgets.per_layer(shape, 1, "one per layer"), GatePolicy.off(),
                  replace(bench.settings, prefetch=False), False)
    job = bench_worker.job(bench.store, setup, bench.prompts[:1], 2)
    if bench.settings.compile:
        compile_outside_cap(job)
    run = run_capped(worker_argv(), ram_bytes(), input=job)
    if not run.ok or run.peak_bytes is None:
        raise AdapmoeError(f"measuring the runtime's baseline memory failed: {last_line(run.stderr)}")
    # no sample (a run shorter than one interval): the group's peak usage, which is never less
    peak = run.peak_working_bytes if run.peak_working_bytes is not None else run.peak_bytes
    return peak - len(shape.layers) * shape.slot_bytes


def capped_runs(bench: _Bench, names: list[str], slots: int, say: Steps) -> dict[str, Any]:
    """One bench run per memory cap, every timed run in a worker process inside the cap; the slots under a
    cap are what it leaves after the runtime's measured baseline (`runtime_baseline`) and `CAP_MARGIN`.
    Without permission for a cgroup, one uncapped run at the budget (`slots`), saying why."""
    from adapmoe_cli.memcap import why_unavailable

    store, shape = bench.store, bench.store.cache_shape
    model_bytes = store.total_bytes
    caps = [(text, parse_cap(text, model_bytes)) for text in bench.req.memory_caps]
    why = why_unavailable()
    if why is not None:
        result = bench.at(names, slots)
        result["memory_cap"] = {"applied": False, "why": f"cannot cap memory: {why}; ran uncapped"}
        return result
    say("measuring the runtime's baseline memory", 0, 0)
    baseline = runtime_baseline(bench)
    minimum = baseline + CAP_MARGIN + len(shape.layers) * shape.slot_bytes
    points, refused = [], {}
    for text, cap in caps:
        left = min(shape.total_experts, (cap - baseline - CAP_MARGIN) // shape.slot_bytes)
        if left < len(shape.layers):
            refused[text] = (f"a cap of {format_bytes(cap)} is below what the runtime needs: its baseline "
                             f"{format_bytes(baseline)} (Python, torch, dense weights) + one expert slot per layer + "
                             f"{format_bytes(CAP_MARGIN)} margin = {format_bytes(minimum)}; give at least that")
            continue
        r = bench.at(names, int(left), cap=cap)
        r["memory_cap"] = {"applied": True, "text": text, "cap_bytes": cap, "baseline_bytes": baseline,
                           "margin_bytes": CAP_MARGIN, "model_bytes": model_bytes}
        points.append(r)
    if not points:
        raise UsageError(next(iter(refused.values())))
    result = dict(points[0])
    result["caps"] = points
    result["caps_refused"] = refused
    return result


def cpu_times() -> list[int]:
    """The machine's CPU time counters (user … steal) from /proc/stat; empty where there is none."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def machine_load(before: list[int]) -> dict[str, Any]:
    """How busy the machine was during the run: the 1-minute load average at its end and the share of
    CPU time the hypervisor stole (a VM's neighbours) since `before`."""
    import os

    after = cpu_times()
    steal = None
    if before and len(after) == len(before) == 8:
        delta = [a - b for a, b in zip(after, before, strict=True)]
        steal = delta[7] / sum(delta) if sum(delta) else 0.0
    return {"load_average_1m": os.getloadavg()[0], "steal_share": steal, "cpus": os.cpu_count()}


def warnings(r: dict[str, Any]) -> list[str]:
    """What makes the numbers less trustworthy than they look: policies whose repeats overlap (their
    difference is within this machine's noise) and a busy machine during the run."""
    out = []
    pol = sorted(r["policies"].items(), key=lambda kv: kv[1]["decode_tokens_per_s"])
    if r["repeats"] > 1:
        for (a, pa), (b, pb) in zip(pol, pol[1:], strict=False):
            if pa["decode_tokens_per_s_max"] >= pb["decode_tokens_per_s_min"]:
                out.append(f"{a} and {b} overlap across repeats ({pa['decode_tokens_per_s_min']:.1f}–"
                           f"{pa['decode_tokens_per_s_max']:.1f} vs {pb['decode_tokens_per_s_min']:.1f}–"
                           f"{pb['decode_tokens_per_s_max']:.1f} tok/s): their difference is within this machine's "
                           "noise; use more --repeat or a quieter machine")
    load = r.get("machine_load", {})
    threads = r["machine"]["torch_threads"]
    if load.get("load_average_1m", 0) > threads + 1:
        out.append(f"the machine was busy: load average {load['load_average_1m']:.1f} with {threads} compute threads "
                   "of ours; other work slows the policies unevenly")
    if (load.get("steal_share") or 0) > 0.05:
        out.append(f"the hypervisor took {load['steal_share']:.0%} of the CPU time during the run (a noisy "
                   "virtual machine)")
    return out


@dataclass
class _Bench:
    """One bench run's shared state: prompts, the gate's quality on calibration text (for the search), its
    perplexity on held-out text (reported) and the plans made so far."""

    store: Store
    settings: Settings
    req: BenchRequest
    prompts: list[list[int]]
    calibration: Callable[[GatePolicy], GateQuality]
    heldout: Callable[[GatePolicy], float]
    say: Steps
    tokenizer: Any = None
    plans: dict[tuple[int, bool, str], tuple[dict[int, int], GatePolicy]] = field(default_factory=dict)
    fallback: tuple[Store, Store] | None = None  # (the copy the runs hold, the quality store's copy)
    quality: Store | None = None  # where perplexity is computed
    heldout_text: Path | None = None

    def perplexity(self, setup: Setup) -> tuple[float, float | None]:
        """Held-out perplexity of a setup, and for a fallback one the increase its copies cost (`fallback_cost`
        on the quality store at the same slots per layer; the perplexity is the gate's times that)."""
        ppl = self.heldout(setup.gate)
        if setup.fallback is None or self.fallback is None:
            return ppl, None
        from adapmoe_cli.planning.quality import fallback_cost

        store = self.quality or self.store
        budget = budgets.planned(store.cache_shape, setup.budget.quotas, setup.budget.source)
        cost = fallback_cost(store, setup.settings, self.heldout_text or default_text("heldout"), budget,
                             setup.gate, self.fallback[1])
        return ppl * (1 + cost), cost

    def plan(self, slots: int, gated: bool, eviction: str = "lru") -> tuple[dict[int, int], GatePolicy]:
        """Slots per layer and gate of the DP plan for `slots`, with (adapmoe) or without (planned) the gate
        at the quality budget, its cost curves replayed with `eviction`. The store's own plan is reused
        (re-solved for `slots`) when it was made the way the bench would make it; else a plan is made under
        STORE/bench, searching the gate only if no plan at hand has searched it (the gate's quality does
        not depend on what is cached). With no quality budget left (the experts' format took it all) the
        gate stays off."""
        gated = gated and self.req.quality_budget > 0
        key = (slots, gated, eviction)
        if key not in self.plans:
            found = self._stores_plan() if gated else None
            if found is not None and found.data.get("policy") == eviction:
                plan = found
            else:
                searched = found.gate if found is not None else None  # a gate already searched at these slots
                if gated and searched is None:
                    searched = next((g for (n, gd, _), (_, g) in self.plans.items() if n == slots and gd), None)
                settings = replace(self.settings, cache=replace(self.settings.cache, policy=eviction))
                out = bench_path(self.store, slots, gated, eviction)
                if searched is not None:
                    req = PlanRequest(budget_slots=slots, gate_mode="scale", rule=searched.rule, scale=searched.scale,
                                      out=out)
                    plan = Plan(*make_plan(self.store, settings, req, progress=self.say))
                else:
                    req = PlanRequest(budget_slots=slots, gate_mode="quality" if gated else "off",
                                      quality_budget=self.req.quality_budget, rule=self.settings.gate.rule, out=out)
                    plan = Plan(*make_plan(self.store, settings, req, self.calibration if gated else None,
                                           progress=self.say))
            self.plans[key] = (plan.quotas_for(slots), plan.gate)
        return self.plans[key]

    def peers(self, names: list[str], cap: int | None, skipped: dict[str, str]) -> dict[str, PeerRun]:
        """The peer programs' runs (`llama.cpp` under `cap`, `llama.cpp-uncapped` never capped); one that
        cannot run here (not built, a failed conversion) is skipped with its one-line reason."""
        if not names:
            return {}
        from adapmoe_cli.bench_runs import llamacpp_runner
        from adapmoe_cli.peers.llamacpp import why_unavailable

        out: dict[str, PeerRun] = {}
        width = self.req.peer_width or GGUF_OF_FORMAT.get(self.store.experts_format.name) or \
            GGUF_WIDTH.get(self.store.dtype_name, "f32")
        for name in names:
            why = why_unavailable()
            if why is not None:
                skipped[name] = why
                continue
            try:
                out[name] = llamacpp_runner(self.store, self.tokenizer, cap if name == "llama.cpp" else None, width,
                                            note=lambda m: self.say(m, 0, 0))
            except AdapmoeError as e:
                skipped[name] = str(e)
        return out

    def _stores_plan(self) -> Plan | None:
        """STORE/plan.json if it was searched at this quality budget and rule, with prefetch, on the default
        calibration text (`plan-cache`'s defaults; the embedded model ships one), with whichever eviction."""
        from adapmoe_cli.planning.gate_rules import resolve_rule
        from adapmoe_cli.planning.plan_file import default_path, read_plan
        from adapmoe_cli.profiling.profile_file import default_path as default_profile
        from adapmoe_cli.profiling.profile_file import read_profile

        if self.req.calibration is not None or not default_path(self.store).exists():
            return None
        try:
            plan = read_plan(default_path(self.store), self.store)
            prof = read_profile(default_profile(self.store), self.store)
            rule = resolve_rule(self.settings.gate.rule, prof.layers, self.store.shape.top_k, prof.has_expert_stats)
        except AdapmoeError:
            return None
        d = plan.data
        made_so = (d.get("quality_search", {}).get("budget") == self.req.quality_budget and d.get("gate_rule") == rule
                   and d.get("prefetch") is True)
        return plan if made_so else None

    def at(self, names: list[str], slots: int, simulate: bool = False, cap: int | None = None) -> dict[str, Any]:
        plan, skipped = setups(self.store, self.settings, [n for n in names if is_policy(n)], slots,
                               self.plan, capped=cap is not None,
                               fallback=self.fallback[0] if self.fallback is not None else None)
        peers = self.peers([n for n in names if n in PEERS], cap, skipped)
        runner = in_process if cap is None else capped_runner(cap)
        result = measure(self.store, plan, skipped, slots, self.prompts, self.req.tokens, self.req.repeat,
                         self.perplexity, self.say, runner, peers)
        if simulate:  # the simulator does not model the fallback's compute
            from adapmoe_cli.simulate.check import simulate_bench

            result["simulated"] = simulate_bench(self.store, {n: s for n, s in plan.items() if s.fallback is None},
                                                 self.prompts, self.req.tokens, result,
                                                 progress=lambda m: self.say(m, 0, 0))
        return result


def summarise(runs: list[DecodeTiming], bandwidth: float, top_k: int) -> dict[str, Any]:
    dec = [r.decode_tps for r in runs]
    pre = [r.prefill_tps for r in runs]
    s = Stats()
    for r in runs:
        s.add(r.stats)
    tokens = sum(r.decode_tokens for r in runs)
    needed_loads = s.misses + s.prefetch_hits
    bytes_per_token = s.bytes_read / tokens if tokens else 0.0
    floor_s = bytes_per_token / bandwidth if bandwidth else 0.0
    return {
        "decode_tokens_per_s": statistics.median(dec),
        "decode_tokens_per_s_min": min(dec),
        "decode_tokens_per_s_max": max(dec),
        "prefill_tokens_per_s": statistics.median(pre),
        "prefill_tokens_per_s_min": min(pre),
        "prefill_tokens_per_s_max": max(pre),
        "experts_per_token": s.experts_per_token,
        "experts_per_token_ratio": s.experts_per_token / top_k,
        "hit_rate": s.hit_rate,
        "prefetch_precision": s.prefetch_hits / s.prefetches_issued if s.prefetches_issued else None,
        "prefetch_recall": s.prefetch_hits / needed_loads if needed_loads else None,
        "bytes_read_per_token": bytes_per_token,
        "stall_s_per_token": s.stall_s / tokens if tokens else 0.0,
        "decode_s_per_token": sum(r.decode_s for r in runs) / tokens if tokens else 0.0,
        "io_floor_s_per_token": floor_s,
        "io_floor_tokens_per_s": 1 / floor_s if floor_s else None,
        "counts": vars(s),
        "compile_s": (statistics.median(c) if (c := [r.compile_s for r in runs if r.compile_s is not None])
                      else None),
        # graphs the timed runs compiled rather than found cached: under a memory cap, 0 (capped_runner)
        "compiled_afresh": (sum(c) if (c := [r.compiled_afresh for r in runs if r.compiled_afresh is not None])
                            else None),
        "repeats": len(runs),
        # eagerly, one row's products by BLAS or a multiply-and-sum, as measured in the run (row_linear.py)
        "row_products": next((r.row_products for r in reversed(runs) if r.row_products), None),
        "runs": [{"decode_tokens_per_s": r.decode_tps, "decode_tokens": r.decode_tokens,
                  "stall_s_per_token": r.stats.stall_s / r.decode_tokens if r.decode_tokens else 0.0,
                  "misses": r.stats.misses} for r in runs],
    }


def machine_info() -> dict[str, Any]:
    import os

    import psutil
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_bytes": psutil.virtual_memory().total, "processor": platform.processor() or platform.machine()}


def setups(store: Store, settings: Settings, names: list[str], total: int,
           plan: Callable[[int, bool, str], tuple[dict[int, int], GatePolicy]],
           capped: bool = False, fallback: Store | None = None) -> tuple[dict[str, Setup], dict[str, str]]:
    """Each policy's setup at a budget of `total` slots (`plan(slots, gated, eviction)`: the DP plan for the
    policies that split by one); a policy that cannot run here is skipped with a note. `capped`: `total` is all a
    memory cap leaves, so a policy that holds every expert runs only if they all fit in it. A fallback
    policy pays for its resident copy (`fallback`: every expert of it) out of the same budget."""
    shape = store.cache_shape
    out, skipped = {}, {}
    for name in names:
        policy = get(name)
        slots = total
        if policy.fallback:
            if fallback is None:
                skipped[name] = "no fallback copy was made (bench makes one of --fallback-format)"
                continue
            copy = len(fallback.experts) * fallback.slot_bytes
            slots = total - -(-copy // shape.slot_bytes)
            if slots < len(shape.layers):
                skipped[name] = (f"its resident copy ({copy / 2**20:.1f} MiB) leaves fewer than one slot a layer "
                                 f"of the budget's {total}")
                continue
        if policy.slots == "all" and capped and total < shape.total_experts:
            skipped[name] = (f"needs all {shape.total_experts} experts; the memory cap leaves room for {total}")
            continue
        if policy.slots == "all" and not budgets.fits(shape):
            need = shape.total_experts * shape.slot_bytes + store.dense_bytes
            skipped[name] = (f"needs {need / 2**30:.1f} GiB, more than {budgets.RESIDENT_SHARE:.0%} of the "
                             "available memory")
            continue
        budget = policy_budget(policy, shape, slots, lambda gated, n=slots, ev=policy.eviction: plan(n, gated, ev)[0])
        gate = plan(slots, True, policy.eviction)[1] if policy.gate else GatePolicy.off()
        runtime = replace(settings, prefetch=policy.prefetches, cache=replace(settings.cache, policy=policy.eviction),
                          prefetch_precision=policy.prefetch_precision(settings.prefetch_precision))
        out[name] = Setup(budget, gate, runtime, policy.preload, fallback if policy.fallback else None)
    return out, skipped


def measure(store: Store, plan: dict[str, Setup], skipped: dict[str, str], total: int, prompts: list[list[int]],
            tokens: int, repeats: int, perplexity: Callable[[Setup], tuple[float, float | None]],
            progress: Steps | None = None, runner: Runner = in_process,
            peers: dict[str, PeerRun] | None = None) -> dict[str, Any]:
    """Run the policies of `plan` (from `setups`) and the `peers` (other programs, bench_runs.py) `repeats`
    times, interleaved; one result dict. One whose run fails (killed by a memory cap) is listed under
    `failed` with why, and not run again."""
    from adapmoe_cli.store.reader import read_bandwidth
    from adapmoe_cli.store.verify import check_experts

    if not prompts:
        raise UsageError("no prompts to run")
    peers = peers or {}
    bandwidth, bw_direct = read_bandwidth(store, max_bytes=512 << 20)
    if runner is in_process:
        check_experts(store)  # each expert's first-read check once, before any timing (workers do the same)
    jobs: dict[str, Callable[[], Outcome]] = {
        **{n: (lambda s=s: runner(store, s, prompts, tokens)) for n, s in plan.items()},
        **{n: (lambda p=p: p(prompts, tokens)) for n, p in peers.items()}}
    runs: dict[str, list[DecodeTiming]] = {n: [] for n in jobs}
    peaks: dict[str, list[int]] = {n: [] for n in jobs}
    failed: dict[str, dict[str, Any]] = {}
    count = repeats * len(jobs)
    done = 0
    for _ in range(repeats):
        for name, job in jobs.items():
            if progress:
                progress(name, done, count)
            done += 1
            if name in failed:
                continue
            out = job()
            if out.peak_bytes is not None:
                peaks[name].append(out.peak_bytes)
            if out.timing is None:
                failed[name] = {"why": out.failure, "peak_bytes": out.peak_bytes}
                continue
            runs[name].append(out.timing)
    if progress:
        progress("perplexity", done, count)
    # from the file descriptors of the engines that ran, not from a probe of the file system
    direct = all(r.direct_io for n, rs in runs.items() if n in plan and n not in failed for r in rs)
    ppl: dict[tuple, tuple[float, float | None]] = {}
    result: dict[str, Any] = {
        "machine": machine_info(),
        "disk_read_bytes_per_s": bandwidth,
        "o_direct": direct,
        "page_cache": ("bypassed: experts are read with O_DIRECT" if direct else
                       "O_DIRECT refused by the file system: pages dropped with posix_fadvise(DONTNEED) after reads"),
        "bandwidth_measured_with": "O_DIRECT sequential reads of the expert files" if bw_direct else "buffered reads",
        "budget_slots": total,
        "budget_bytes": total * store.slot_bytes,
        "expert_slot_bytes": store.slot_bytes,
        "total_experts": len(store.experts),
        "tokens": tokens, "prompts": len(prompts), "repeats": repeats,
        "policies": {},
        "skipped": skipped,
        "failed": failed,
    }
    for name, setup in plan.items():
        if name in failed:
            continue
        # perplexity depends on the gate alone, except with the fallback (then on the cache too)
        key = (setup.gate.mode, tuple(sorted(setup.gate.thresholds.items()))) + (
            (tuple(sorted(setup.budget.quotas.items())), setup.settings.prefetch) if setup.fallback else ())
        if key not in ppl:
            ppl[key] = perplexity(setup)
        entry = summarise(runs[name], bandwidth, store.shape.top_k)
        entry["perplexity"] = ppl[key][0]
        if ppl[key][1] is not None:
            entry["fallback_perplexity_increase"] = ppl[key][1]
            entry["fallback_store"] = str(setup.fallback.path) if setup.fallback is not None else None
        entry["description"] = get(name).description
        entry["slots"] = setup.budget.total
        entry["slots_per_layer"] = [setup.budget.quotas[layer] for layer in store.shape.moe_layers]
        entry["gate"] = {"rule": setup.gate.rule, "scale": setup.gate.scale}
        entry["peak_bytes"] = max(peaks[name]) if peaks[name] else None
        result["policies"][name] = entry
    for name in peers:
        if name in failed:
            continue
        entry = summarise(runs[name], bandwidth, store.shape.top_k)
        # what only our runtime counts does not apply; llama.cpp's reads go through the page cache
        for key in ("experts_per_token", "experts_per_token_ratio", "hit_rate", "prefetch_precision",
                    "prefetch_recall", "bytes_read_per_token", "stall_s_per_token", "io_floor_s_per_token",
                    "io_floor_tokens_per_s", "perplexity", "slots"):
            entry[key] = None
        entry["description"] = PEERS[name]
        entry["peak_bytes"] = max(peaks[name]) if peaks[name] else None
        entry["peer"] = True
        result["policies"][name] = entry
    return result


def default_prompts() -> list[str]:
    return [
        "What does the json module do?",
        "How do I read a file line by line in Python?",
        "What is a generator?",
        "Explain the with statement.",
    ]


def read_prompts(path: Path) -> list[str]:
    lines = [ln.strip() for ln in read_text(path, "prompt file", UsageError).splitlines()]
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise UsageError(f"prompt file {path} holds no prompts (one per line)")
    return prompts
