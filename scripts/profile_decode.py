"""Where one decode step's time goes on the runtime (the decode-ceiling issue's first measurement):

  python scripts/profile_decode.py [--tokens 48] [--out docs/performance.json]

The embedded model, greedy, 2 threads, on the main thread, two setups: every expert resident, and half the
experts cached with the store's plan (adapmoe's eviction and gate, prefetch on). Each setup decodes
`--tokens` tokens untimed (warm), then as many timed without a profiler (the tok/s), then as many under
torch's profiler, with each module's forward and the expert manager's layer call marked as a range. The
breakdown is per token: inclusive time of each kind of range (they do not nest across kinds, except the
manager inside the experts module, which is split out), the aten time spent inside the experts module
(the expert matmuls and their gather/scatter), and the rest of the step (the decoder layers' own Python,
the KV cache, sampling). The profiler's own cost inflates every range; shares are what to read.

Then the same two setups with the compiled decode step (`--compile`, runtime/compiled.py), compiled first
(timed), whose breakdown comes from the compiler's own ranges: the guards it checks before each call, the
bytecode around the graph, the experts call (the expert matmuls inside it, and the rest of it: the
manager's and the module's Python), the compiled kernels (the graph less the experts calls: attention,
norms, routers, gate, prediction, lm head) and what lies outside the compiled region (the module call, the
compiler's frame entry, sampling, the generation loop)."""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from adapmoe_cli.model_arg import open_model
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
from adapmoe_cli.runtime.manager import ExpertManager
from adapmoe_cli.settings import GenerationSettings, load_settings

KINDS = {  # module class name → the part of the step it is
    "MixtralAttention": "attention", "MixtralRMSNorm": "norms", "MixtralTopKRouter": "router",
    "OffloadedExperts": "experts (module)", "MixtralRotaryEmbedding": "rotary", "Embedding": "embedding",
    "Linear": "lm head",
}
PROMPT = list(range(3, 35))


def mark(model: torch.nn.Module) -> list:
    """Forward hooks that open and close a profiler range around each module of a kind in KINDS."""
    handles = []
    for module in model.modules():
        kind = KINDS.get(type(module).__name__)
        if kind is None or (kind == "lm head" and module is not model.lm_head):
            continue
        ranges: list = []

        def pre(_m, _args, kind=kind, ranges=ranges):
            r = torch.profiler.record_function(f"part::{kind}")
            r.__enter__()
            ranges.append(r)

        def post(_m, _args, _out, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def decode(engine, n: int) -> float:
    """Decode n tokens after the prompt; seconds of the decode steps only."""
    gen = GenerationSettings(max_new_tokens=n + 1, temperature=0.0, repetition_penalty=1.0)
    t0 = None
    for i, _ in enumerate(generate_step(engine, PROMPT, new_kv_cache(engine), gen)):
        if i == 0:
            t0 = time.perf_counter()
        if i == n:
            return time.perf_counter() - t0
    raise AssertionError


def profile(engine, n: int) -> dict[str, float]:
    run_layer = ExpertManager.run_layer

    def timed_run_layer(self, *args, **kwargs):
        with torch.profiler.record_function("part::manager"):
            return run_layer(self, *args, **kwargs)

    ExpertManager.run_layer = timed_run_layer
    handles = mark(engine.model)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.profiler.record_function("part::step"):
                decode(engine, n)
    finally:
        ExpertManager.run_layer = run_layer
        for h in handles:
            h.remove()
    events = prof.events()
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith("part::"):
            total[e.name[6:]] += e.cpu_time_total
    # the aten ops the manager's layer calls run (the expert matmuls, gather, scatter): top-level ops only
    calls = [e.time_range for e in events if e.name == "part::manager"]
    total["manager aten"] = sum(
        e.cpu_time_total for e in events
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        and any(r.start <= e.time_range.start and e.time_range.end <= r.end for r in calls))
    return {k: v / n / 1e3 for k, v in total.items()}  # ms per token


def profile_compiled(engine, n: int) -> dict[str, float]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("part::step"):
            decode(engine, n)
    events = prof.events()
    total: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.name
        key = ("step" if name == "part::step" else "region" if name.startswith("Torch-Compiled Region") else
               "guards" if name == "TorchDynamo Cache Lookup" else "graph" if name.startswith("## Call CompiledFxGraph")
               else "experts" if name == "adapmoe::offloaded_experts" else None)
        if key is not None:
            total[key] += e.cpu_time_total
        elif name.startswith("aten::") and getattr(e.cpu_parent, "name", None) == "adapmoe::offloaded_experts":
            total["experts aten"] += e.cpu_time_total
    ms = {k: v / n / 1e3 for k, v in total.items()}
    return {
        "the compiler's guards, checked before each call": ms["guards"],
        "bytecode and wrappers around the compiled graph": ms["region"] - ms["guards"] - ms["graph"],
        "compiled kernels: attention, norms, routers, gate, prediction, lm head": ms["graph"] - ms["experts"],
        "experts call: the expert matmuls (aten)": ms["experts aten"],
        "experts call: the manager's and the module's Python": ms["experts"] - ms["experts aten"],
        "outside the compiled region: the module call, the compiler's frame entry, sampling, the loop":
            ms["step"] - ms["region"],
        "step": ms["step"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("docs/performance.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    store = open_model(None)
    out = {}
    for name, budget in (("resident", "100%"), ("half the experts", "50%")):
        from adapmoe_cli.budget import BudgetRequest

        settings = load_settings(overrides={"cache.budget": BudgetRequest.parse(budget, "--budget")})
        with open_engine(store, settings) as engine:
            decode(engine, args.tokens)
            plain = min(decode(engine, args.tokens) for _ in range(3))
            parts = profile(engine, args.tokens)
        step = parts.pop("step")
        experts, manager, aten = parts.pop("experts (module)"), parts.pop("manager"), parts.pop("manager aten")
        row = {"tokens_per_s": args.tokens / plain, "ms_per_token": plain / args.tokens * 1e3,
               "profiled_ms_per_token": step,
               "parts_ms": {**dict(sorted(parts.items())),
                            "experts: their matmuls and gather/scatter (aten, in the manager's calls)": aten,
                            "experts: the manager's own Python (cache, loads, counting)": manager - aten,
                            "experts: the module outside the manager (gate, next layer's prediction)":
                                experts - manager}}
        row["parts_ms"]["the rest (decoder layers' Python, KV cache, sampling)"] = step - experts - sum(parts.values())
        out[name] = row
        print(f"\n{name}: {row['tokens_per_s']:.1f} tok/s = {row['ms_per_token']:.2f} ms/token "
              f"(profiled {step:.2f} ms)")
        for k, v in row["parts_ms"].items():
            print(f"  {v:6.3f} ms  {v / step:5.1%}  {k}")
    for name, budget in (("resident", "100%"), ("half the experts", "50%")):
        from adapmoe_cli.budget import BudgetRequest
        from adapmoe_cli.runtime.generate import compile_decode

        settings = load_settings(overrides={"cache.budget": BudgetRequest.parse(budget, "--budget"), "compile": True})
        with open_engine(store, settings) as engine:
            took = compile_decode(engine)
            decode(engine, args.tokens)
            plain = min(decode(engine, args.tokens) for _ in range(3))
            parts = profile_compiled(engine, args.tokens)
        step = parts.pop("step")
        row = {"tokens_per_s": args.tokens / plain, "ms_per_token": plain / args.tokens * 1e3, "compile_s": took,
               "profiled_ms_per_token": step, "parts_ms": parts}
        out[f"{name}, compiled"] = row
        print(f"\n{name}, compiled in {took:.1f} s: {row['tokens_per_s']:.1f} tok/s = {row['ms_per_token']:.2f} "
              f"ms/token (profiled {step:.2f} ms)")
        for k, v in parts.items():
            print(f"  {v:6.3f} ms  {v / step:5.1%}  {k}")
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
