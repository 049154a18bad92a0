"""Does adapmoe at half the experts rise by resident's factor? (the decode-ceiling issue's third target;
docs/performance.md, "Paired in one process")

    python scripts/measure_half_factor.py [--baseline 24cd4ab] [--processes 4] [--rounds 8]

This VM's speed drifts by a third or more over seconds, and a bench repeat of one policy is seconds away
from the other's (each opens and compiles its own engine), so the bench's medians of three give the
ratio adapmoe ÷ resident anywhere in 0.5–0.85 from one run to the next. Here both policies' engines are
open at once in one process, set up exactly as `adapmoe bench --policies resident,adapmoe` sets them up
(the bench's own `setups`, captured by running the bench command with its `measure` replaced), and their
decodes alternate prompt by prompt (64 tokens each, the prompts of docs/performance-prompts.txt, the order
of the two swapped every round): each pair of decodes is a fraction of a second apart, so the drift cancels
in their ratio. The same is done for the baseline commit (the issue's "today", eager, checked out into a
temporary worktree) and for this checkout (`--compile`), in alternating processes.

adapmoe rises by resident's factor exactly when its ratio to resident now is at least the baseline's:
(A_now ÷ A_base ≥ R_now ÷ R_base) ⇔ (A_now ÷ R_now ≥ A_base ÷ R_base). The script prints each process's
median paired ratio, then each build's median and quartiles over every pair, and the factors from the
pooled tok/s (across processes: drift included). Both engines warm up on the prompts first: the ratios are
of warm caches (the bench's repeats start cold), the same protocol for both builds. Run on a quiet machine;
it takes about 2 minutes a process pair."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "docs" / "performance-prompts.txt"


def child(rounds: int, tokens: int, compile_: bool) -> None:
    """Run as the bench (this build's, by PYTHONPATH), its `measure` replaced by the paired alternation."""
    import torch

    from adapmoe_cli import bench
    from adapmoe_cli.runtime.engine import Engine
    from adapmoe_cli.runtime.measure import timed_decode

    def paired(store, plan, skipped, total, prompts, *args, **kwargs):
        engines = {}
        for name in ("resident", "adapmoe"):
            s = plan[name]
            eng = Engine(store, s.settings, s.budget, gate=s.gate, verify=False, fallback=s.fallback)
            if s.preload:
                for layer in store.shape.moe_layers:
                    eng.manager.preload(layer, range(store.shape.num_experts))
            engines[name] = eng
        try:
            for eng in engines.values():  # warm: compiled (`--compile`), caches filled by the prompts
                for prompt in prompts:
                    timed_decode(eng, prompt, 8)
            pairs = []
            for r in range(rounds):
                order = ("resident", "adapmoe") if r % 2 == 0 else ("adapmoe", "resident")
                for prompt in prompts:
                    got = {n: timed_decode(engines[n], prompt, tokens) for n in order}
                    pairs.append({n: t.decode_tps for n, t in got.items()})
            eager = {n: (not e.decode.active) if hasattr(e, "decode") else True for n, e in engines.items()}
            print("PAIRS " + json.dumps({"pairs": pairs, "eager": eager, "threads": torch.get_num_threads()}),
                  flush=True)
        finally:
            for eng in engines.values():
                eng.close()
        raise SystemExit(0)

    bench.measure = paired
    sys.argv = ["adapmoe", "bench", "--policies", "resident,adapmoe", "--tokens", str(tokens), "--repeat", "1",
                "--prompts", str(PROMPTS), *(["--compile"] if compile_ else [])]
    from adapmoe_cli.cli.app import main

    main()


def run_build(src: Path, home: Path, rounds: int, tokens: int, compile_: bool) -> list[dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=str(src), ADAPMOE_HOME=str(home))
    out = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(rounds), "--tokens", str(tokens),
                          *(["--compile"] if compile_ else [])], env=env, capture_output=True, text=True, cwd=ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("PAIRS "):
            data = json.loads(line[6:])
            if compile_ == any(data["eager"].values()):
                sys.exit(f"{src}: the engines ran {'eagerly' if compile_ else 'compiled'}: {data['eager']}")
            return data["pairs"]
    sys.exit(f"{src}: no result (exit {out.returncode}): {out.stderr.strip()[-800:]}")


def quartiles(v: list[float]) -> str:
    q = statistics.quantiles(v, n=4)
    return f"{statistics.median(v):.3f} (quartiles {q[0]:.3f}–{q[2]:.3f}, {len(v)} pairs)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="24cd4ab", help="the commit the factors are measured from")
    ap.add_argument("--processes", type=int, default=4, help="processes per build, alternating")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of the prompts a process")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.rounds, args.tokens, args.compile)
        return
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(wt), args.baseline],
                       check=True, capture_output=True)
        try:
            # each build its own store of the embedded model (made on first use, beside the usual one)
            home = Path(os.environ.get("ADAPMOE_HOME") or Path.home() / ".cache" / "adapmoe")
            builds = {"baseline": (wt / "src", home.with_name(home.name + "-baseline"), False),
                      "now": (ROOT / "src", home, True)}
            got: dict[str, list[dict[str, float]]] = {b: [] for b in builds}
            for p in range(args.processes):
                for b in builds if p % 2 == 0 else list(builds)[::-1]:
                    src, where, compile_ = builds[b]
                    pairs = run_build(src, where, args.rounds, args.tokens, compile_)
                    got[b] += pairs
                    ratios = [x["adapmoe"] / x["resident"] for x in pairs]
                    print(f"process {p + 1} {b:8}: resident {statistics.median(x['resident'] for x in pairs):6.1f}"
                          f" tok/s, adapmoe {statistics.median(x['adapmoe'] for x in pairs):6.1f}, paired ratio "
                          f"{statistics.median(ratios):.3f}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], capture_output=True)
    ratio = {b: [x["adapmoe"] / x["resident"] for x in v] for b, v in got.items()}
    tps = {b: {n: statistics.median(x[n] for x in v) for n in ("resident", "adapmoe")} for b, v in got.items()}
    for b in got:
        print(f"{b:8} adapmoe ÷ resident, paired: {quartiles(ratio[b])}; pooled tok/s resident "
              f"{tps[b]['resident']:.1f}, adapmoe {tps[b]['adapmoe']:.1f}")
    fr = tps["now"]["resident"] / tps["baseline"]["resident"]
    fa = tps["now"]["adapmoe"] / tps["baseline"]["adapmoe"]
    met = statistics.median(ratio["now"]) >= statistics.median(ratio["baseline"])
    print(f"factors (pooled medians, drift across processes included): resident {fr:.2f} ×, adapmoe {fa:.2f} ×; "
          f"paired ratio now {'≥' if met else '<'} baseline: {'met' if met else 'missed'}")


if __name__ == "__main__":
    main()
