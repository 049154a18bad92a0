"""What the compiled step's one-row products as multiply-and-sum loops save (docs/performance.md):

1. The expert kernel's w2 summed in pieces (runtime/expert_kernel.py `_PIECE`) against one sum over the
   whole intermediate size, in isolation: 32 experts of the full-size store's shape (hidden 192,
   intermediate 7,424, float32, 17 MB each) cycling, so every read comes from RAM; both kernels and ATen's
   plain sum over the same bytes (what this machine's memory gives two threads), interleaved round by round.
2. The same two kernels in a decode step: one engine (MODEL, every expert resident, gate off, compiled),
   alternating the kernels between runs of `--tokens` tokens; paired per round.
3. `nn.Linear`'s one-row products (attention's projections, the lm head) as multiply-and-sum loops
   (runtime/compiled.py `_row_linear_forward`) against `F.linear` (MKL): two engines on MODEL, one with the
   shipped forwards, one with transformers' own, alternating; paired per round.
4. Eagerly, one row's products by the measured choice of each shape (runtime/row_linear.py) against BLAS
   everywhere and the multiply-and-sum everywhere: one engine, rotated; paired per round.

Run on a quiet machine. Usage: python scripts/measure_row_products.py [MODEL] [--rounds 20] [--tokens 32]
[--only eager] (MODEL: a store, e.g. ~/.cache/adapmoe/stores/embedded-experts-16MiB, which `adapmoe bench
--expert-size 16MiB` builds, or `embedded`; without one, only 1 runs)"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from profile_decode import decode

from adapmoe_cli.budget import BudgetRequest
from adapmoe_cli.model_arg import open_model
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.runtime import compiled, expert_kernel, row_linear
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.generate import compile_decode
from adapmoe_cli.runtime.moe_block import gated_activation
from adapmoe_cli.settings import load_settings

HIDDEN, INTER, EXPERTS = 192, 7424, 32


def one_sum_kernel(build: Callable[[], None]) -> None:
    """Run `build` with the kernel's sums made in one piece (the kernel before `_PIECE`)."""
    piece = expert_kernel._PIECE
    expert_kernel._PIECE = 1 << 62
    try:
        build()
    finally:
        expert_kernel._PIECE = piece


def report(ms: dict[str, list[float]], unit: str, nbytes: int | None = None) -> None:
    for name, v in ms.items():
        rate = f", {nbytes / (statistics.median(v) / 1e3) / 1e9:.1f} GB/s" if nbytes else ""
        print(f"  {name:16s} median {statistics.median(v):.3f} {unit} (min {min(v):.3f}, max {max(v):.3f}){rate}")


def isolated(rounds: int) -> None:
    glu = gated_activation("act", SimpleNamespace(act_fn=torch.nn.SiLU()))
    experts = [{"w13": {"": torch.randn(2 * INTER, HIDDEN) / HIDDEN**0.5},
                "w2": {"": torch.randn(HIDDEN, INTER) / INTER**0.5}} for _ in range(EXPERTS)]
    x, scale = torch.randn(1, HIDDEN), torch.tensor(0.5)
    shipped, old = expert_kernel.ExpertKernel(glu, False), expert_kernel.ExpertKernel(glu, False)
    shipped(x, experts[0], scale)
    one_sum_kernel(lambda: old(x, experts[0], scale))
    runs = {"pieces (shipped)": lambda w: shipped(x, w, scale), "one sum": lambda w: old(x, w, scale),
            "ATen sum": lambda w: (w["w13"][""].sum(), w["w2"][""].sum())}
    ms: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in list(runs)[r % 3:] + list(runs)[:r % 3]:
            t = time.perf_counter()
            for w in experts:
                runs[name](w)
            ms[name].append((time.perf_counter() - t) / EXPERTS * 1e3)
    print(f"one expert in isolation ({EXPERTS} cycling, {rounds} rounds):")
    report(ms, "ms", 3 * HIDDEN * INTER * 4)


SETTINGS = {"cache.budget": BudgetRequest.parse("100%", "--budget"), "compile": True}


def in_step(model: str, rounds: int, tokens: int) -> None:
    with open_engine(open_model(model), load_settings(overrides=SETTINGS)) as engine:
        engine.use_gate(GatePolicy.off())
        compile_decode(engine)
        decode(engine, tokens)
        kernel = next(m.kernel for m in engine.model.modules() if getattr(m, "kernel", None) is not None)
        fns = {"pieces (shipped)": kernel._fn}
        kernel._fn = None
        one_sum_kernel(lambda: decode(engine, 2))  # the next expert call builds the one-sum kernel
        fns["one sum"] = kernel._fn
        ms: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(rounds):
            for name in list(fns) if r % 2 else list(fns)[::-1]:
                kernel._fn = fns[name]
                ms[name].append(decode(engine, tokens) / tokens * 1e3)
    print(f"expert kernel in a decode step ({model}, every expert resident, gate off, {rounds} rounds of "
          f"{tokens} tokens):")
    paired(ms, "one sum", "pieces (shipped)")


def linear_products(model: str, rounds: int, tokens: int) -> None:
    store = open_model(model)
    with open_engine(store, load_settings(overrides=SETTINGS)) as shipped, \
            open_engine(store, load_settings(overrides=SETTINGS)) as mkl:
        engines = {"multiply-and-sum (shipped)": shipped, "F.linear": mkl}
        real = compiled._row_linear_forward
        for name, engine in engines.items():
            engine.use_gate(GatePolicy.off())
            if name == "F.linear":  # its step compiles with transformers' own product in every nn.Linear
                compiled._row_linear_forward = lambda linear, x: F.linear(x, linear.weight, linear.bias)
            try:
                compile_decode(engine)
            finally:
                compiled._row_linear_forward = real
            decode(engine, tokens)
        ms: dict[str, list[float]] = {name: [] for name in engines}
        for r in range(rounds):
            for name in list(engines) if r % 2 else list(engines)[::-1]:
                ms[name].append(decode(engines[name], tokens) / tokens * 1e3)
    print(f"nn.Linear's one-row products in a decode step ({model}, two engines, every expert resident, gate off, "
          f"{rounds} rounds of {tokens} tokens):")
    paired(ms, "F.linear", "multiply-and-sum (shipped)")


def eager(model: str, rounds: int, tokens: int) -> None:
    """4. Eagerly (runtime/row_linear.py): one engine, the shapes' measured choice against BLAS everywhere and
    the multiply-and-sum everywhere, rotated round by round."""
    ways = {"measured (shipped)": None, "BLAS": False, "multiply-and-sum": True}
    settings = load_settings(overrides={**SETTINGS, "compile": False})
    with open_engine(open_model(model), settings) as engine:
        for way in ways.values():  # (the measured way's first products make the choice)
            row_linear.force(way)
            decode(engine, tokens)
        ms: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(rounds):
            for name in list(ways)[r % 3:] + list(ways)[:r % 3]:
                row_linear.force(ways[name])
                ms[name].append(decode(engine, tokens) / tokens * 1e3)
        row_linear.force(None)
    print(f"one-row products eagerly ({model}, every expert resident, the shipped gate, {rounds} rounds of "
          f"{tokens} tokens; chosen: {row_linear.chosen()}):")
    paired(ms, "BLAS", "measured (shipped)")
    paired({k: ms[k] for k in ("BLAS", "multiply-and-sum")}, "BLAS", "multiply-and-sum")


def paired(ms: dict[str, list[float]], before: str, after: str) -> None:
    report(ms, "ms/token")
    saved = [a - b for a, b in zip(ms[before], ms[after], strict=True)]
    print(f"  paired saving: median {statistics.median(saved):.3f} ms/token "
          f"(min {min(saved):.3f}, max {max(saved):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--only", choices=["eager"], help="run part 4 only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.only == "eager":
        eager(args.model or "embedded", args.rounds, args.tokens)
        return
    isolated(2 * args.rounds)
    if args.model:
        in_step(args.model, args.rounds, args.tokens)
        linear_products(args.model, args.rounds, args.tokens)
        eager(args.model, args.rounds, args.tokens)


if __name__ == "__main__":
    main()
