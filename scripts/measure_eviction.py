"""Hit rates of every eviction policy against LRU and Belady, and what one eviction costs (docs/cache.md).

    python scripts/measure_eviction.py [--out docs/cache] [--tokens 8192]

Traces (each a per-layer demand cache, even split, no prefetch unless said; Belady is the optimum of that):
1. the recorded Mixtral-8x7B trace (h39s, sorted ids only; decode from a cold cache, as its README counts) at
   3–6 slots per layer: whole (markov/learned fitted on the trace itself: in-sample) and held out (fitted on
   the first half of the steps, measured on the second);
2. the embedded model: fitted on its profile's trace (calibration text, as the runtime does), measured on a
   trace recorded the same way on its held-out text, at 3–6 of 8 slots per layer (37.5–75 %), without
   and with the next-layer prefetch (the runtime's lru+prefetch, where hits include prefetch hits);
3. the cost of one `victim()` call per policy, timed on those replays, and on a 128-expert top-8 trace;
4. a bound for any policy that predicts only the layer's next call: `next-call` knows it exactly (evicts an
   expert the next call does not need, the least recently used first) — what perfect next-call prediction
   would reach, against Belady's farther look ahead.
Writes OUT.json and OUT.png, prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from adapmoe_cli.model_arg import default_text, open_model
from adapmoe_cli.planning.replay import Routing, prepare, replay
from adapmoe_cli.profiling.profile_file import default_path, read_profile
from adapmoe_cli.profiling.profiler import ProfileRequest, make_profile
from adapmoe_cli.profiling.routing_model import fit
from adapmoe_cli.runtime.cache import ExpertCache
from adapmoe_cli.runtime.eviction import LRU, RoutingModel
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.loader import InstantLoader
from adapmoe_cli.runtime.manager import ExpertManager
from adapmoe_cli.settings import load_settings
from adapmoe_cli.simulate.hardware import load_hardware
from adapmoe_cli.simulate.model_spec import load_model
from adapmoe_cli.simulate.shipped import shipped_trace
from adapmoe_cli.simulate.simulator import drive
from adapmoe_cli.simulate.traces import read_h39s, uniform_trace

POLICIES = ("lru", "lfu", "lrfu", "markov", "learned")
SLOTS = (3, 4, 5, 6)
HW = load_hardware("rtx4090-pcie4")  # counts do not depend on it: no prefetch timing enters the books
SPEC = load_model("mixtral-8x7b", bits=4)


def hit_rate(routing: Routing, slots: int, eviction: str, model: RoutingModel | None, prefetch: bool = False) -> float:
    run = drive(routing, {layer: slots for layer in routing.layers}, HW, SPEC, eviction, prefetch=prefetch,
                routing_model=model)
    return (run.hits + run.prefetch_hits) / run.expert_uses


class NextCall(LRU):
    """Knows the layer's next call exactly: evicts an expert it does not need, the least recently used first
    (a limit for the script only, like Belady)."""

    def __init__(self, future: list[tuple[int, ...]]):
        super().__init__()
        self.future, self.calls = future, 0

    def observe(self, needed) -> None:
        self.calls += 1

    def victim(self, keep=()):
        nxt = set(self.future[self.calls]) if self.calls < len(self.future) else set()
        order = [e for e in self.residents() if e not in keep]
        return next((e for e in order if e not in nxt), order[0] if order else None)


def next_call_hit_rate(routing: Routing, slots: int) -> float:
    cache = ExpertCache({layer: slots for layer in routing.layers}, stride=0)
    for i, layer in enumerate(routing.layers):
        cache.policies[layer] = NextCall([step[i] for step in routing.needed])
    manager = ExpertManager(cache, InstantLoader(0))
    replay(routing, manager, prefetch=False)
    s = manager.stats
    manager.close()
    return s.hits / s.expert_uses


def table(fit_on: Routing, measure_on: Routing, experts: int, label: str, prefetch: bool = False) -> dict:
    model = fit(fit_on, experts, label)
    rows = {}
    for name in (*POLICIES, *(() if prefetch else ("belady",))):
        rows[name] = [hit_rate(measure_on, s, name, model, prefetch) for s in SLOTS]
    if not prefetch:
        rows["next-call (limit)"] = [next_call_hit_rate(measure_on, s) for s in SLOTS]
    return {"fitted_on": label, "slots_per_layer": list(SLOTS), "hit_rate": rows, "weights": list(model.weights)}


def victim_cost(routing: Routing, experts: int, slots: int, model: RoutingModel) -> dict[str, float]:
    """Mean µs per victim() call of each policy over a replay of `routing`."""
    out = {}
    for name in POLICIES:
        cache = ExpertCache({layer: slots for layer in routing.layers}, stride=0, policy=name, routing=model)
        spent, calls = [0.0], [0]
        for p in cache.policies.values():
            def timed(keep=(), _inner=p.victim, _spent=spent, _calls=calls):
                t = time.perf_counter_ns()
                v = _inner(keep)
                _spent[0] += time.perf_counter_ns() - t
                _calls[0] += 1
                return v
            p.victim = timed
        manager = ExpertManager(cache, InstantLoader(0))
        replay(routing, manager, prefetch=False)
        manager.close()
        out[name] = spent[0] / calls[0] / 1e3 if calls[0] else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/cache"))
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens of the embedded model's trace")
    args = ap.parse_args()
    result: dict = {}

    st = read_h39s(shipped_trace("mixtral-8x7b-instruct-h39s"), prefill=False)
    whole = prepare(st.trace, GatePolicy.off(), st.steps)
    half = len(whole.rows) // 2
    result["mixtral_whole"] = table(whole, whole, 8, "the whole h39s trace (in-sample)")
    result["mixtral_heldout"] = table(whole.part(0, half), whole.part(half), 8,
                                      f"h39s steps 0–{half - 1}; measured on {half}–{len(whole.rows) - 1}")

    store = open_model(None)
    prof = read_profile(default_path(store), store)
    calib = prepare(prof.trace(), GatePolicy.off())
    with tempfile.TemporaryDirectory() as tmp:
        req = ProfileRequest(text=default_text("heldout"), text_label="held-out split", tokens=args.tokens,
                             window=256, method="forward", out=Path(tmp) / "profile.json")
        held = prepare(read_profile(make_profile(store, load_settings(), req), store).trace(), GatePolicy.off())
    label = f"the embedded model's profile ({prof.trace().num_tokens} calibration tokens); measured on " \
            f"{sum(held.rows)} held-out tokens"
    result["embedded_heldout"] = table(calib, held, 8, label)
    result["embedded_heldout_prefetch"] = table(calib, held, 8, label, prefetch=True)

    model = fit(calib, 8, "embedded")
    result["victim_us"] = {"embedded, 4 of 8 slots": victim_cost(held, 8, 4, model),
                           "h39s, 4 of 8 slots": victim_cost(whole, 8, 4, fit(whole, 8, "h39s"))}
    fine = prepare(uniform_trace(8, 128, 8, tokens=512, seed=1).trace, GatePolicy.off())
    result["victim_us"]["uniform 128 experts top-8, 64 slots"] = victim_cost(fine, 128, 64, fit(fine, 128, "uniform"))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    draw(result, args.out.with_suffix(".png"))
    for key in ("mixtral_whole", "mixtral_heldout", "embedded_heldout", "embedded_heldout_prefetch"):
        r = result[key]
        b = r["hit_rate"].get("belady")
        print(f"\n{key}: fitted on {r['fitted_on']}\n")
        print("| policy | " + " | ".join(f"{s} slots" for s in SLOTS) + " |")
        print("|---|" + "---:|" * len(SLOTS))
        for name, hs in r["hit_rate"].items():
            cells = [f"{h:.1%}" + (f" ({h / bb:.0%})" if b else "") for h, bb in zip(hs, b or hs, strict=True)]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nµs per eviction:", json.dumps(result["victim_us"], indent=1))


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("mixtral_heldout", "embedded_heldout")
    fig, axes = plt.subplots(1, len(keys), figsize=(11, 4.2))
    for ax, key in zip(axes, keys, strict=True):
        r = result[key]
        for name, hs in r["hit_rate"].items():
            ax.plot(r["slots_per_layer"], [h * 100 for h in hs], marker="o", label=name,
                    linestyle="--" if name in ("belady", "next-call (limit)") else "-")
        ax.set_title({"mixtral_heldout": "Mixtral-8x7B trace, held-out half",
                      "embedded_heldout": "embedded model, held-out text"}[key])
        ax.set_xlabel("slots per layer (of 8 experts)")
        ax.set_xticks(r["slots_per_layer"])
        ax.set_ylabel("hit rate %")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
