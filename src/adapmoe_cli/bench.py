"""`run_bench()`: the designs side by side on one model, one budget, one machine, in one run.

Each policy is a named configuration of the one runtime (slots, split, eviction, prefetch, gate); no
policy has a code path of its own. Repeats are interleaved across policies so drift hits all alike; every
run starts from a cold cache, and experts come from disk through O_DIRECT reads (page cache bypassed).
Perplexity depends only on the gate, so it is measured once per distinct gate on held-out text."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapmoe_cli.errors import UsageError
from adapmoe_cli.runtime.cache import even_quotas
from adapmoe_cli.runtime.engine import Budget, Engine
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.settings import GenerationSettings, Settings, replace
from adapmoe_cli.store import Store


@dataclass(frozen=True)
class PolicySpec:
    name: str
    description: str
    slots: str = "budget"  # budget | topk (per layer) | all
    split: str = "even"  # even | plan
    eviction: str = "lru"
    prefetch: bool = False
    gate: bool = False
    preload: bool = False


POLICIES: dict[str, PolicySpec] = {p.name: p for p in (
    PolicySpec("naive", "no cache across tokens: every needed expert is loaded on demand", slots="topk",
               eviction="none"),
    PolicySpec("lru", "per-layer LRU, even split, no prefetch"),
    PolicySpec("lru+prefetch", "mixtral-offloading: per-layer LRU, even split, next-layer prefetch of the top-k",
               prefetch=True),
    PolicySpec("lfu", "per-layer LFU, even split, no prefetch", eviction="lfu"),
    PolicySpec("planned", "LRU with the DP slot plan and prefetch, no adaptive gate", split="plan", prefetch=True),
    PolicySpec("adapmoe", "adaptive gate at the quality budget, gate-aware prefetch, DP slot plan", split="plan",
               prefetch=True, gate=True),
    PolicySpec("resident", "every expert in memory (upper bound)", slots="all", preload=True),
)}
DEFAULT_POLICIES = ("naive", "lru", "lru+prefetch", "adapmoe", "resident")


def parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        raise UsageError(f"unknown policy {unknown[0] if unknown else '(none)'}; known: {', '.join(POLICIES)}")
    return names


@dataclass
class RunResult:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    stats: Stats = field(default_factory=Stats)  # decode steps only

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0


@dataclass(frozen=True)
class Setup:
    """What a policy runs with: slots per layer, gate, and runtime settings."""

    budget: Budget
    gate: GatePolicy
    settings: Settings
    spec: PolicySpec


def run_once(store: Store, setup: Setup, prompts: list[list[int]], tokens: int,
             observe: Callable[[Engine], Callable[[Any], None]] | None = None) -> RunResult:
    """One cold-cache run over the prompts. `observe(engine)` gives a `LayerRecord` callback that then
    sees every MoE layer call (recording the routing)."""
    gen = GenerationSettings(max_new_tokens=tokens + 1, temperature=0.0, repetition_penalty=1.0)
    res = RunResult()
    with Engine(store, setup.settings, budget=setup.budget, gate=setup.gate, verify=False) as eng:
        if observe is not None:
            eng.observers.callbacks.append(observe(eng))
        if setup.spec.preload:
            for layer in store.shape.moe_layers:
                eng.manager.preload(layer, range(store.shape.num_experts))
        for prompt in prompts:
            kv = new_kv_cache(eng)
            t0 = time.perf_counter()
            n = 0
            for _tok, _ in generate_step(eng, prompt, kv, gen):
                if n == 0:
                    t1 = time.perf_counter()
                    before = eng.stats.copy()
                n += 1
                if n > tokens:
                    break
            t2 = time.perf_counter()
            eng.manager.drain()
            res.prefill_tokens += len(prompt)
            res.prefill_s += t1 - t0
            res.decode_tokens += tokens
            res.decode_s += t2 - t1
            res.stats.add(eng.stats.delta(before))
    return res


def summarise(runs: list[RunResult], bandwidth: float, top_k: int) -> dict[str, Any]:
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
        "repeats": len(runs),
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


Progress = Callable[[str, int, int], None]


def setups(store: Store, settings: Settings, names: list[str], budget_slots: int,
           plan_for: Callable[[bool], tuple[dict[int, int], GatePolicy]]) -> tuple[dict[str, Setup], dict[str, str]]:
    """Build each policy's setup; policies that cannot run here are skipped with a note."""
    import psutil

    shape = store.shape
    out, skipped = {}, {}
    for name in names:
        spec = POLICIES[name]
        st = replace(settings, prefetch=spec.prefetch,
                     cache=replace(settings.cache, policy=spec.eviction, experts=None, memory=None))
        gate = GatePolicy.off()
        if spec.slots == "all":
            need = len(store.experts) * store.expert_stride + store.dense_bytes
            if need > 0.8 * psutil.virtual_memory().available:
                skipped[name] = f"needs {need / 2**30:.1f} GiB, more than 80% of the available memory"
                continue
            budget = Budget(even_quotas(shape.moe_layers, len(store.experts), shape.num_experts), "all experts")
        elif spec.slots == "topk":
            budget = Budget({layer: shape.top_k for layer in shape.moe_layers}, "top-k per layer")
        elif spec.split == "plan":
            quotas, gate = plan_for(spec.gate)
            budget = Budget(quotas, "DP plan")
        else:
            budget = Budget(even_quotas(shape.moe_layers, budget_slots, shape.num_experts), "even split")
        out[name] = Setup(budget, gate, st, spec)
    return out, skipped


def run_bench(store: Store, plan: dict[str, Setup], skipped: dict[str, str], budget_slots: int,
              prompts: list[list[int]], tokens: int, repeats: int, perplexity: Callable[[GatePolicy], float],
              progress: Progress | None = None) -> dict[str, Any]:
    """Run the policies of `plan` (from `setups`) `repeats` times, interleaved; one result dict."""
    from adapmoe_cli.store.reader import ExpertReader, read_bandwidth

    if not prompts:
        raise UsageError("no prompts to run")
    with ExpertReader(store) as probe:
        probe._fd(next(iter(store.experts.values())).file)
        direct = probe.direct
    bandwidth, bw_direct = read_bandwidth(store, max_bytes=512 << 20)
    runs: dict[str, list[RunResult]] = {n: [] for n in plan}
    total = repeats * len(plan)
    done = 0
    for _ in range(repeats):
        for name, setup in plan.items():
            if progress:
                progress(name, done, total)
            runs[name].append(run_once(store, setup, prompts, tokens))
            done += 1
    if progress:
        progress("perplexity", done, total)
    ppl: dict[tuple, float] = {}
    result: dict[str, Any] = {
        "machine": machine_info(),
        "disk_read_bytes_per_s": bandwidth,
        "page_cache": ("bypassed: experts are read with O_DIRECT" if direct else
                       "O_DIRECT refused by the file system: pages dropped with posix_fadvise(DONTNEED) after reads"),
        "bandwidth_measured_with": "O_DIRECT sequential reads of the expert files" if bw_direct else "buffered reads",
        "budget_slots": budget_slots,
        "total_experts": len(store.experts),
        "tokens": tokens, "prompts": len(prompts), "repeats": repeats,
        "policies": {},
        "skipped": skipped,
    }
    for name, setup in plan.items():
        key = tuple(sorted(setup.gate.thresholds.items()))
        if key not in ppl:
            ppl[key] = perplexity(setup.gate)
        entry = summarise(runs[name], bandwidth, store.shape.top_k)
        entry["perplexity"] = ppl[key]
        entry["description"] = setup.spec.description
        entry["slots"] = setup.budget.total
        entry["slots_per_layer"] = [setup.budget.quotas[layer] for layer in store.shape.moe_layers]
        entry["gate"] = {"rule": setup.gate.rule, "scale": setup.gate.scale}
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
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise UsageError(f"prompt file {path} does not exist") from None
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise UsageError(f"prompt file {path} holds no prompts (one per line)")
    return prompts
