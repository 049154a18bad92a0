"""How far per-layer thresholds can go on a model: each layer's own measured drop curve, then the best
per-layer thresholds for a given price of loss (a Lagrangian allocation), fitted on one text and scored
on the held-out split.

    python scripts/measure_gate_ceiling.py [MODEL] [--fit calibration|heldout] [--mode share|tail|l2]

1. On the fitting text (4,096 tokens in spread windows), for every MoE layer alone and every threshold of
   a grid: the mean loss increase (nats/token) and the experts per token saved.
2. For a price λ: per layer, the threshold maximising saved − λ · increase (assumes the layers' increases
   add up), then that gate scored on 8,192 held-out tokens.
Fitted on the calibration split this is a deployable rule ("measured per-layer"); fitted on the held-out
text itself it is what per-layer thresholds could reach if the layers' increases added up — not a
strict ceiling (they do not quite add up), an estimate of one. docs/gating.md reports both.
Writes OUT.json (default /tmp/gate-ceiling-MODEL-FIT-MODE.json)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from adapmoe_cli import budget as budgets
from adapmoe_cli.conversation import load_tokenizer
from adapmoe_cli.model_arg import default_text, open_model
from adapmoe_cli.perplexity import evaluate, read_text_tokens, spread_windows
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import load_settings

GRIDS = {2: [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5],
         "fine": [0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.17, 0.2, 0.25, 0.3, 0.4]}
PRICES = {2: [3, 5, 8, 10, 12, 15, 20, 25, 30, 40, 60], "fine": [10, 20, 30, 40, 50, 60, 75, 100, 150, 200, 300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--fit", choices=("calibration", "heldout"), default="calibration")
    ap.add_argument("--mode", choices=("share", "tail", "l2"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    store = open_model(a.model)
    k = store.shape.top_k
    mode = a.mode or ("share" if k == 2 else "tail")
    grid, prices = (GRIDS[2], PRICES[2]) if k == 2 else (GRIDS["fine"], PRICES["fine"])
    tok = load_tokenizer(store)
    t0 = time.time()
    with Engine(store, load_settings(), budgets.all_experts(store.cache_shape)) as eng:
        def run(gate: GatePolicy, pieces: list[list[int]]) -> tuple[torch.Tensor, float]:
            eng.use_gate(gate)
            before = eng.stats.copy()
            nll = torch.cat([evaluate(eng, p, 256).token_nll for p in pieces])
            return nll, eng.stats.delta(before).experts_per_token

        fit = spread_windows(read_text_tokens(tok, default_text(a.fit)), 4096, 256)
        held = [read_text_tokens(tok, default_text("heldout"), max_tokens=8192)]
        base_fit, e0 = run(GatePolicy.off(), fit)
        layers = list(store.shape.moe_layers)
        curves: dict[int, list[tuple[float | None, float, float]]] = {}
        for layer in layers:
            rows: list[tuple[float | None, float, float]] = [(None, 0.0, 0.0)]
            for t in grid:
                nll, e = run(GatePolicy({layer: t}, mode=mode), fit)
                rows.append((t, float((nll - base_fit).mean()), e0 - e))
            curves[layer] = rows
            print(f"layer {layer}: " + " ".join(f"{t}:{dl * 1e3:.2f}m/{sv:.3f}" for t, dl, sv in rows[1:])
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
        base_held, _ = run(GatePolicy.off(), held)
        points = []
        for lam in prices:
            th = {}
            for layer in layers:
                best = max(curves[layer], key=lambda r, lam=lam: r[2] - lam * r[1])
                if best[0] is not None:
                    th[layer] = best[0]
            nll, e = run(GatePolicy(th, mode=mode), held)
            inc = math.exp(float(nll.mean()) - float(base_held.mean())) - 1
            points.append({"price": lam, "thresholds": th, "experts_per_token": e, "saved": 1 - e / k,
                           "heldout_increase": inc})
            print(f"λ {lam}: saved {1 - e / k:.1%} at {inc:+.2%} held-out  {th}", flush=True)
    out = a.out or Path(f"/tmp/gate-ceiling-{a.model or 'embedded'}-{a.fit}-{mode}.json")
    out.write_text(json.dumps({"model": str(store.path), "fit": a.fit, "mode": mode, "curves": curves,
                               "points": points}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
