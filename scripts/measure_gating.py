"""Measure the adaptive gate's threshold rules and the cache plan on a model (default: the embedded one).

    python scripts/measure_gating.py [MODEL] [--out docs/gating] [--tokens 8192] [--decode-tokens 2048]

1. For each rule (paper: sqrt(c/F_l); global: one threshold; weighted: sqrt(c/S_l); with top-k > 2 also
   top-p: post-hoc top-p, and weighted-tail: weighted's thresholds on the dropped tail; where the profile
   has expert statistics, the compensating rules: weighted+mean, and with top-k > 2 weighted-tail+mean and
   spread-tail), a sweep of the
   scale, and static top-k' for every k' < k: experts per token and perplexity on the held-out split (not
   the calibration split). Each rule's experts saved at the quality budget, read off its held-out curve
   by bisection (static top-k': interpolated between its integer points).
2. For each rule, the quality-budget search (1 %) on the calibration split, then its held-out result.
3. For a budget of half the experts: the plan's expected stalls against an even split's, and the stalls
   counted by the runtime when it decodes held-out text one token at a time with each.
Writes OUT.json, OUT.png and prints markdown tables. Needs `adapmoe profile` to have run on the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adapmoe_cli import budget as budgets
from adapmoe_cli.conversation import load_tokenizer
from adapmoe_cli.model_arg import default_text, open_model
from adapmoe_cli.perplexity import evaluate, read_text_tokens
from adapmoe_cli.planning import (
    CALIBRATION_TOKENS,  # noqa: E402
    gate_rules,
)
from adapmoe_cli.planning.plan_file import Plan
from adapmoe_cli.planning.planner import PlanRequest, make_plan
from adapmoe_cli.planning.quality import gate_quality
from adapmoe_cli.profiling.profile_file import default_path, read_profile
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.gating import ExpertStats, GatePolicy
from adapmoe_cli.runtime.generate import new_kv_cache
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.settings import load_settings


def rules_for(top_k: int, stats: ExpertStats | None = None) -> tuple[str, ...]:
    """At top-2 the tail rules are the share rules (one expert beyond the top-1): measured once. The
    compensating rules where the profile has expert statistics."""
    rules = ("paper", "global", "weighted") + (("top-p", "weighted-tail", "weighted-l2") if top_k > 2 else ())
    if stats is not None:
        rules += ("weighted+mean",) + (("weighted-tail+mean", "spread-tail") if top_k > 2 else ())
    return rules


def sweep(engine: Engine, prof_layers: list[dict], held: list[int], window: int, points: int, top_k: int,
          spacing: float = 1.0, stats: ExpertStats | None = None) -> dict:
    base = evaluate(engine, held, window)
    out = {"base": {"perplexity": base.perplexity, "experts_per_token": base.stats.experts_per_token}}
    for rule in rules_for(top_k, stats):
        hi = gate_rules.max_scale(rule, prof_layers, top_k, stats)
        rows = []
        for i in range(1, points + 1):
            # thresholds grow like sqrt(c): space the scales so thresholds are evenly spread (`--spacing`
            # above 1 crowds the points towards the small thresholds, where a quality budget lands)
            c = hi * (i / points) ** (spacing * (1 if rule in ("global", "top-p") else 2))
            engine.use_gate(gate_rules.gate(rule, c, prof_layers, top_k, stats))
            r = evaluate(engine, held, window)
            rows.append({"scale": c, "perplexity": r.perplexity, "experts_per_token": r.stats.experts_per_token})
            print(f"{rule:13} c={c:.4g}  ppl {r.perplexity:.3f}  experts/token {r.stats.experts_per_token:.3f}",
                  flush=True)
        out[rule] = rows
    layers = [int(x["layer"]) for x in prof_layers]
    rows = []
    for k in range(top_k - 1, 0, -1):
        engine.use_gate(GatePolicy.static(k, layers))
        r = evaluate(engine, held, window)
        rows.append({"scale": k, "perplexity": r.perplexity, "experts_per_token": r.stats.experts_per_token})
        print(f"static top-{k}  ppl {r.perplexity:.3f}  experts/token {r.stats.experts_per_token:.3f}", flush=True)
    out["static"] = rows
    engine.use_gate(GatePolicy.off())
    return out


def at_budget(engine: Engine, rule: str, prof_layers: list[dict], held: list[int], window: int, top_k: int,
              base: dict, budget: float, iterations: int = 9, stats: ExpertStats | None = None) -> dict:
    """The rule's point on the held-out curve at the budget: bisection (in sqrt-scale for the per-layer
    rules) for the largest scale whose held-out increase stays within `budget`. Reading the curve there
    rather than interpolating between sweep points (the curves are convex, so a straight line between
    two points under-reads them)."""
    lo, hi = 0.0, gate_rules.max_scale(rule, prof_layers, top_k, stats)
    flat = rule in ("global", "top-p")
    best = {"scale": 0.0, "perplexity": base["perplexity"], "experts_per_token": base["experts_per_token"]}
    for _ in range(iterations):
        mid = (lo + hi) / 2 if flat else ((lo ** 0.5 + hi ** 0.5) / 2) ** 2
        engine.use_gate(gate_rules.gate(rule, mid, prof_layers, top_k, stats))
        r = evaluate(engine, held, window)
        if r.perplexity / base["perplexity"] - 1 <= budget:
            lo, best = mid, {"scale": mid, "perplexity": r.perplexity, "experts_per_token": r.stats.experts_per_token}
        else:
            hi = mid
    engine.use_gate(GatePolicy.off())
    best["increase"] = best["perplexity"] / base["perplexity"] - 1
    best["saved"] = 1 - best["experts_per_token"] / top_k
    print(f"{rule:13} at +{budget:.0%} on held-out: c={best['scale']:.4g} {best['increase']:+.2%} "
          f"{best['saved']:.1%} fewer expert evaluations", flush=True)
    return best


def saved_at(rows: list[dict], base: dict, budget: float) -> float | None:
    """Fraction of expert evaluations saved where a curve crosses `budget` (relative perplexity increase),
    interpolated linearly between the sweep points around it (the curve from the ungated point on)."""
    points = [(base["experts_per_token"], 0.0)] + sorted(
        ((r["experts_per_token"], r["perplexity"] / base["perplexity"] - 1) for r in rows), reverse=True)
    best = None
    for (e0, i0), (e1, i1) in zip(points, points[1:], strict=False):
        if i0 <= budget:
            best = e0
        if i0 <= budget < i1:
            best = e0 + (e1 - e0) * (budget - i0) / (i1 - i0)
            break
        if i1 <= budget:
            best = e1
    return None if best is None else 1 - best / base["experts_per_token"]


def decode_stalls(engine: Engine, tokens: list[int], ctx: int) -> Stats:
    """Feed held-out tokens one at a time (teacher forcing) and count what the runtime counts."""
    before = engine.stats.copy()
    with torch.inference_mode():
        for start in range(0, len(tokens), ctx):
            kv = new_kv_cache(engine)
            for t in tokens[start:start + ctx]:
                engine.model(input_ids=torch.tensor([[t]]), cache=kv, use_cache=True)
    engine.manager.drain()
    return engine.stats.delta(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--out", type=Path, default=Path("docs/gating"))
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens for perplexity")
    ap.add_argument("--decode-tokens", type=int, default=2048, help="held-out tokens decoded one at a time")
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--spacing", type=float, default=1.0, help="> 1: sweep points crowd towards small scales")
    ap.add_argument("--quality-budget", type=float, default=0.01)
    ap.add_argument("--skip-plan", action="store_true", help="stop after the rules (no plan against even split)")
    a = ap.parse_args()
    store = open_model(a.model)
    settings = load_settings()
    prof = read_profile(default_path(store), store)
    stats = prof.expert_stats() if prof.has_expert_stats else None
    window = int(min(256, store.config.get("max_position_embeddings", 256)))
    shape = store.shape
    result: dict = {"model": str(store.path), "profile_method": prof.data["method"]}
    with Engine(store, settings, budgets.all_experts(store.cache_shape)) as eng:
        tok = load_tokenizer(store)
        held = read_text_tokens(tok, default_text("heldout"), max_tokens=a.tokens)
        result["heldout_tokens"] = len(held)
        result["sweep"] = sweep(eng, prof.layers, held, window, a.points, shape.top_k, a.spacing, stats)
        base_ppl = result["sweep"]["base"]["perplexity"]
        result["saved_at_budget"] = {name: saved_at(rows, result["sweep"]["base"], a.quality_budget)
                                     for name, rows in result["sweep"].items() if name != "base"}
        for name, saved in result["saved_at_budget"].items():
            print(f"{name}: {'-' if saved is None else f'{saved:.1%}'} fewer expert evaluations at "
                  f"+{a.quality_budget:.0%} (interpolated)", flush=True)
        result["at_budget_heldout"] = {rule: at_budget(eng, rule, prof.layers, held, window, shape.top_k,
                                                       result["sweep"]["base"], a.quality_budget, stats=stats)
                                       for rule in rules_for(shape.top_k, stats)}
        searches = {}
        with gate_quality(store, settings, default_text("calibration"), CALIBRATION_TOKENS) as calib_quality:
            for rule in rules_for(shape.top_k, stats):
                s = gate_rules.find_scale(rule, prof.layers, a.quality_budget, calib_quality, top_k=shape.top_k,
                                          stats=stats)
                eng.use_gate(gate_rules.gate(rule, s.scale, prof.layers, shape.top_k, stats))
                r = evaluate(eng, held, window)
                searches[rule] = {"scale": s.scale, "calibration_increase": s.increase,
                                  "calibration_increase_bound": s.bound,
                                  "heldout_perplexity": r.perplexity, "heldout_increase": r.perplexity / base_ppl - 1,
                                  "experts_per_token": r.stats.experts_per_token,
                                  "experts_saved": 1 - r.stats.experts_per_token / shape.top_k,
                                  "thresholds": gate_rules.thresholds(rule, s.scale, prof.layers, shape.top_k,
                                                                      stats)}
                print(f"search {rule}: c={s.scale:.4g} held-out {searches[rule]['heldout_increase']:+.2%} "
                      f"experts/token {r.stats.experts_per_token:.3f}", flush=True)
        eng.use_gate(GatePolicy.off())
        result["quality_budget"] = {"budget": a.quality_budget, "rules": searches}
        decode_ids = held[: a.decode_tokens]
    if a.skip_plan:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        draw(result, a.out.with_suffix(".png"), shape.top_k, stats)
        print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.png')}")
        return

    # 3. plan vs even split at half the experts, with the best rule's gate
    best = min(searches, key=lambda r: (searches[r]["heldout_increase"] > a.quality_budget,
                                        searches[r]["experts_per_token"]))
    half = budgets.resolve(budgets.BudgetRequest(fraction=0.5), store.cache_shape)
    plan_out = a.out.with_name(a.out.name + "-plan.json")
    _, data = make_plan(store, settings, PlanRequest(budget_slots=half.total, gate_mode="scale", rule=best,
                                                     scale=searches[best]["scale"], out=plan_out))
    plan = Plan(plan_out, data)
    rows = {}
    for name, budget in (("plan", budgets.planned(store.cache_shape, plan.quotas, "plan")), ("even", half)):
        quotas = budget.quotas
        with Engine(store, settings, budget, gate=plan.gate) as eng:
            st = decode_stalls(eng, decode_ids, window)
        expected = sum(x["cost_curve"][quotas[x["layer"]] - 1] for x in data["layers"])
        rows[name] = {"slots": [quotas[layer] for layer in shape.moe_layers], "expected_stalls_per_token": expected,
                      "counted_stalls_per_token": st.misses / len(decode_ids), "hit_rate": st.hit_rate,
                      "experts_per_token": st.experts_per_token}
        print(f"{name}: expected {expected:.3f} stalls/token, counted {st.misses / len(decode_ids):.3f}", flush=True)
    result["plan_vs_even"] = {"budget_slots": half.total, "rule": best, "decode_tokens": len(decode_ids), **rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    draw(result, a.out.with_suffix(".png"), shape.top_k, stats)
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.png')}")


def draw(result: dict, path: Path, top_k: int, stats: ExpertStats | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = result["sweep"]
    base = sw["base"]["perplexity"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule in rules_for(top_k, stats) + ("static",):
        xs = [sw["base"]["experts_per_token"]] + [r["experts_per_token"] for r in sw[rule]]
        ys = [0.0] + [100 * (r["perplexity"] / base - 1) for r in sw[rule]]
        line, = ax.plot(xs, ys, marker="o", ls=":" if rule == "static" else "-",
                        label=f"static top-k' (k' < {top_k})" if rule == "static" else rule)
        q = result["quality_budget"]["rules"].get(rule)
        if q is not None:
            ax.scatter([q["experts_per_token"]], [100 * q["heldout_increase"]], marker="*", s=160, zorder=5,
                       color=line.get_color())
    ax.axhline(100 * result["quality_budget"]["budget"], color="grey", ls="--", lw=1, label="quality budget")
    ax.set_xlabel(f"activated experts per token (top-{top_k} = {top_k})")
    ax.set_ylabel("held-out perplexity increase (%)")
    ax.set_title("adaptive gate: rules compared (stars: 1% search on the calibration split)", fontsize=10)
    ax.set_ylim(-0.5, 7)  # the region a quality budget lands in (top-1 costs +60 % on the fine-grained model)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
