"""Decode speed of the runtime on one store, for comparing two versions of the code (the experts seam
against the block it replaced): run it with PYTHONPATH pointing at each version's `src`, alternating.
Prints one JSON line: tokens/s per setup (all experts resident; half of them, LRU with prefetch; the same
with the store's planned gate thresholds), and the loads counted.
Usage: python scripts/measure_seam.py [STORE] [--tokens 64] [--prompts 4]"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    from adapmoe_cli import budget as budgets
    from adapmoe_cli.conversation import load_tokenizer
    from adapmoe_cli.model_arg import default_text, open_model
    from adapmoe_cli.runtime.engine import Engine
    from adapmoe_cli.runtime.gating import GatePolicy
    from adapmoe_cli.runtime.measure import timed_decode
    from adapmoe_cli.settings import load_settings, replace

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    a = ap.parse_args()
    store = open_model(a.model)
    tok = load_tokenizer(store)
    words = default_text("heldout").read_text().split()
    prompts = [tok(" ".join(words[i * 50:i * 50 + 40]))["input_ids"] for i in range(a.prompts)]
    settings = load_settings()
    shape = store.cache_shape
    out = {"code": __import__("adapmoe_cli").__file__}
    plan = json.loads((store.path / "plan.json").read_text()) if (store.path / "plan.json").exists() else None
    gate = GatePolicy({x["layer"]: x["threshold"] for x in plan["layers"]}, rule="plan") if plan else None
    runs = [("resident", len(store.experts), None), ("half", len(store.experts) // 2, None)]
    if gate is not None:
        runs.append(("half+gate", len(store.experts) // 2, gate))  # the store's plan's thresholds, even split
    for label, slots, g in runs:
        s = replace(settings, prefetch=True)
        budget = budgets.resolve(budgets.BudgetRequest.parse(slots), shape)
        with Engine(store, s, budget, gate=g) as eng:
            timed_decode(eng, prompts[0], 8)  # warm the cache and the code paths
            t0, n, loads = time.perf_counter(), 0, 0
            secs = 0.0
            for p in prompts:
                d = timed_decode(eng, p, a.tokens, warmup=2)
                secs += d.decode_s
                n += d.decode_tokens
                loads += d.stats.loads
            out[label] = {"tok_s": round(n / secs, 2), "loads": loads, "wall_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
