"""How much the adaptive gate's perplexity increase differs between the calibration and the held-out
text, and whether a wider confidence bound on the calibration text would cover the difference.

    python scripts/measure_gate_drift.py [--model embedded] [--scales 0.003,0.00602] [--rule RULE]
                                         [--calibration-tokens 4096] [--heldout-tokens 8192]

For each gate scale (rule: the store's plan's), on both splits of the embedded models' texts: the increase
over the ungated model, the quality search's one-sided 95 % bound (each token one sample) and the same
bound with each scored 256-token window one sample (`quality.increase_bound`, what the search uses since
windows come from different documents, which differ more than tokens). Prints one line per split and scale and
writes the figures as JSON (--out). docs/bench.md quotes a run of it."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from adapmoe_cli.model_arg import default_text, open_model
from adapmoe_cli.planning import gate_rules
from adapmoe_cli.planning.plan_file import default_path as default_plan
from adapmoe_cli.planning.plan_file import read_plan
from adapmoe_cli.planning.quality import CONFIDENCE_Z, WINDOW, increase_bound, token_losses
from adapmoe_cli.profiling.profile_file import default_path, read_profile
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import load_settings


def bound(d: torch.Tensor) -> float:
    return math.exp(float(d.mean()) + CONFIDENCE_Z * float(d.std()) / math.sqrt(d.numel())) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--scales", default=None, help="comma-separated gate scales (default: the shipped plan's)")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--heldout-tokens", type=int, default=8192)
    ap.add_argument("--rule", default=None, help="the gate rule (default: the shipped plan's)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    store = open_model(a.model)
    settings = load_settings()
    prof = read_profile(default_path(store), store)
    layers = prof.layers
    plan = read_plan(default_plan(store), store)
    rule = a.rule or plan.gate.rule
    stats = prof.expert_stats_for(rule, store.shape.top_k)
    scales = [float(x) for x in a.scales.split(",")] if a.scales else [float(plan.gate.scale)]
    out: dict = {"model": a.model, "rule": rule, "splits": {}}
    for split, n in (("calibration", a.calibration_tokens), ("heldout", a.heldout_tokens)):
        with token_losses(store, settings, default_text(split), n) as losses:
            base = losses(GatePolicy.off())
            rows = []
            for scale in scales:
                gated = losses(gate_rules.gate(rule, scale, layers, store.shape.top_k, stats))
                d, experts = gated.losses - base.losses, gated.experts_per_token
                row = {"scale": scale, "tokens": d.numel(), "increase": math.exp(float(d.mean())) - 1,
                       "bound_tokens": bound(d), "bound_windows": increase_bound(d, base.windows),
                       "experts_per_token": experts}
                rows.append(row)
                print(f"{split:11s} scale {scale:.4g}: {row['increase']:+.2%} (95% bound {row['bound_tokens']:+.2%} "
                      f"per token, {row['bound_windows']:+.2%} per {WINDOW}-token window) on {d.numel()} tokens, "
                      f"{experts:.2f} experts/token", flush=True)
            out["splits"][split] = rows
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
