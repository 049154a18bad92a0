"""What prefetch costs a compiled decode step at part of the experts, one mode per process
(docs/performance.md, "A store as fast as an NVMe drive").

    python scripts/measure_prefetch_cost.py [--budget 50%] [--runs 4] [--rounds 6] [--tokens 48]
                                            [--modes on,never,graph-only,off]

The embedded model, compiled, the store's plan and adapmoe's gate, in four ways:
- `on`: adapmoe as it runs (the next layer's prediction in the graph, the admitted experts prefetched);
- `never`: the prediction and the admission's books, nothing admitted (`prefetch_precision` 1.0): no
  prefetch read;
- `graph-only`: the prediction computed in the graph and handed to the manager's call, which ignores it;
- `off`: no prediction (`prefetch: false`).
Each run is a process of its own (one compiled graph: a process that has run two graphs is slower in
both), the modes interleaved, each run `--rounds` rounds of `--tokens` tokens after a warm-up. It prints
ms a token for the step and for the calls out of its graph (the manager's), then each mode's median and
range, and in what share of the (run, run) pairs `on` was slower than `off`. Put the store on tmpfs
(`ADAPMOE_HOME=/dev/shm/…`) to take the disk's reads out. Run on a quiet machine."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

MODES = ("on", "never", "graph-only", "off")


def one(mode: str, budget: str, rounds: int, tokens: int) -> dict[str, float]:
    """One process's run of `mode`: ms a token, for the step and in the manager's calls."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from profile_decode import decode

    from adapmoe_cli.budget import BudgetRequest
    from adapmoe_cli.model_arg import open_model
    from adapmoe_cli.planning.resolve import open_engine
    from adapmoe_cli.runtime.generate import compile_decode
    from adapmoe_cli.runtime.moe_block import OffloadedExperts
    from adapmoe_cli.settings import load_settings

    spent = [0.0]
    one_token = OffloadedExperts._one_token

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return one_token(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    OffloadedExperts._one_token = timed
    if mode == "graph-only":
        OffloadedExperts._then_prefetch = lambda self, predicted: None
    overrides = {"cache.budget": BudgetRequest.parse(budget, "--budget"), "compile": True, "prefetch": mode != "off"}
    if mode == "never":
        overrides["prefetch_precision"] = 1.0  # Laplace's estimate never reaches 1: nothing admitted
    torch.set_num_threads(2)
    with open_engine(open_model(None), load_settings(overrides=overrides)) as engine:
        compile_decode(engine)
        decode(engine, 16)
        spent[0], seconds = 0.0, 0.0
        for _ in range(rounds):
            seconds += decode(engine, tokens)
    n = rounds * tokens
    return {"step_ms": seconds / n * 1e3, "calls_ms": spent[0] / n * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--runs", type=int, default=4, help="processes per mode")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child process's mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.budget, args.rounds, args.tokens)))
        return
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: from {', '.join(MODES)}")
    got: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for run in range(args.runs):
        for mode in modes if run % 2 == 0 else modes[::-1]:
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--budget", args.budget, "--rounds",
                                  str(args.rounds), "--tokens", str(args.tokens)], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{mode}: {out.stderr.strip()[-600:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            got[mode].append(r)
            print(f"run {run + 1} {mode:10} step {r['step_ms']:.2f} ms a token, calls {r['calls_ms']:.2f}", flush=True)
    for mode, rs in got.items():
        steps = [r["step_ms"] for r in rs]
        calls = [r["calls_ms"] for r in rs]
        print(f"{mode:10} step {statistics.median(steps):.2f} ({min(steps):.2f}–{max(steps):.2f}) ms a token, "
              f"calls {statistics.median(calls):.2f} ({min(calls):.2f}–{max(calls):.2f})")
    if "on" in got and "off" in got:
        pairs = list(product(got["on"], got["off"]))
        slower = sum(a["step_ms"] > b["step_ms"] for a, b in pairs) / len(pairs)
        print(f"on slower than off in {slower:.0%} of the {len(pairs)} (run, run) pairs")


if __name__ == "__main__":
    main()
