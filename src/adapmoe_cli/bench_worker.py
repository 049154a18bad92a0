"""One timed run of one policy in a process of its own — what `bench --memory-cap` runs inside a capped
memory cgroup (memcap.py), so the cap holds the whole process: Python, torch, the dense weights, the
cache and the page cache it causes. The job goes in as JSON on stdin (`job`), the timing comes back as
JSON on stdout (`timing_from`). `python -m adapmoe_cli.bench_worker`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from adapmoe_cli.runtime.measure import DecodeTiming, Setup
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.store import Store


def job(store: Store, setup: Setup, prompts: list[list[int]], tokens: int) -> str:
    """The JSON a worker runs: the store, the setup (slots per layer, gate, eviction, prefetch, preload,
    device) and the prompts."""
    return json.dumps({
        "store": str(store.path),
        "quotas": {str(k): v for k, v in setup.budget.quotas.items()},
        "source": setup.budget.source,
        "gate": {"thresholds": {str(k): v for k, v in setup.gate.thresholds.items()}, "rule": setup.gate.rule,
                 "scale": setup.gate.scale, "mode": setup.gate.mode,
                 "stats": {"file": setup.gate.stats.file, "sha256": setup.gate.stats.sha256}
                 if setup.gate.stats is not None else None, "spreads": setup.gate.spreads},
        "settings": {"cache.policy": setup.settings.cache.policy, "prefetch": setup.settings.prefetch,
                     "prefetch_precision": setup.settings.prefetch_precision,
                     "device": setup.settings.device, "compile": setup.settings.compile},
        "preload": setup.preload,
        "fallback": str(setup.fallback.path) if setup.fallback is not None else None,
        "prompts": prompts,
        "tokens": tokens,
    })


def run_job(text: str) -> dict[str, Any]:
    from adapmoe_cli import budget as budgets
    from adapmoe_cli.profiling import expert_stats
    from adapmoe_cli.runtime.gating import GatePolicy
    from adapmoe_cli.runtime.measure import run_setup
    from adapmoe_cli.settings import load_settings
    from adapmoe_cli.store.verify import check_experts

    j = json.loads(text)
    store = Store.open(j["store"])
    budget = budgets.planned(store.cache_shape, {int(k): int(v) for k, v in j["quotas"].items()}, j["source"])
    g = j["gate"]
    thresholds = {int(k): float(v) for k, v in g["thresholds"].items()}
    stats = (expert_stats.from_entry(g["stats"], Path("/"), sorted(thresholds), store.shape.num_experts, "bench job")
             if g.get("stats") else None)
    gate = GatePolicy(thresholds, rule=g["rule"], scale=g["scale"], mode=g["mode"], stats=stats,
                      spreads=bool(g.get("spreads")))
    fallback = Store.open(j["fallback"]) if j.get("fallback") else None
    setup = Setup(budget, gate, load_settings(overrides=j["settings"]), bool(j["preload"]), fallback)
    check_experts(store)  # outside the timing, as in-process (bench.measure)
    t = run_setup(store, setup, j["prompts"], int(j["tokens"]))
    return {"prompt_tokens": t.prompt_tokens, "prefill_s": t.prefill_s, "decode_tokens": t.decode_tokens,
            "decode_s": t.decode_s, "stats": vars(t.stats), "direct_io": t.direct_io, "compile_s": t.compile_s,
            "compiled_afresh": t.compiled_afresh, "row_products": t.row_products}


def timing_from(text: str) -> DecodeTiming:
    d = json.loads(text)
    return DecodeTiming(d["prompt_tokens"], d["prefill_s"], d["decode_tokens"], d["decode_s"], Stats(**d["stats"]),
                        d["direct_io"], d.get("compile_s"), d.get("compiled_afresh"), d.get("row_products"))


def main() -> None:
    print(json.dumps(run_job(sys.stdin.read())))


if __name__ == "__main__":
    main()
