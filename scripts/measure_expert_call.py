"""What one call of the compiled step's expert kernel costs (runtime/expert_kernel.py): the call the cache
manager makes for every expert of a layer it still loads into, in a compiled decode step, and the
graph's alternative when a layer's experts are computed in it. docs/performance.md, "The expert kernel's
call".

    python scripts/measure_expert_call.py [--rounds 10] [--experts 128]

One expert the size of the embedded model's (w13 [512, 192], w2 [192, 256], SiLU: 576 KB), one token,
called three ways on the same weights:
- `wrapped`: the graph compiled by `torch._inductor.compile` and called through the function it answers
  (AOT autograd's runtime wrappers, dynamo's disable context), as the kernel was called until 2026-12-01;
- `kernel`: `ExpertKernel` as the runtime calls it (the compiled module's own entry, its parts known by
  the slot's views);
- `module`: that compiled module's entry alone, the parts handed in.
Each over one expert again and again (hot: its weights in the CPU's cache) and over `--experts` different
ones in turn (cold: read from memory, as a decode step reads them). Rounds are interleaved; medians and
ranges in µs a call. Run on a quiet machine."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from adapmoe_cli.runtime.expert_kernel import ExpertKernel, weighted_output

HIDDEN, INTER = 192, 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--calls", type=int, default=2000, help="calls a round, per way and temperature")
    args = ap.parse_args()
    torch.set_num_threads(2)
    glu = lambda gate, up: torch.nn.functional.silu(gate) * up  # noqa: E731
    g = torch.Generator().manual_seed(0)
    experts = [{"w13": {"": torch.randn(2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5},
                "w2": {"": torch.randn(HIDDEN, INTER, generator=g) / INTER**0.5}} for _ in range(args.experts)]
    x, scale = torch.randn(1, HIDDEN, generator=g), torch.tensor(0.37)

    kernel = ExpertKernel(glu, False)
    assert kernel(x, experts[0], scale) is not None, kernel.failure
    module = kernel._run

    def one(x: torch.Tensor, scale: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return weighted_output(glu, False, x, {"w13": {"": w13}, "w2": {"": w2}}, scale)

    parts0 = [experts[0]["w13"][""], experts[0]["w2"][""]]
    wrapped = torch._inductor.compile(make_fx(one)(x, scale, *parts0), [x, scale, *parts0])
    ways: dict[str, Callable[[dict], object]] = {
        "wrapped": lambda w: wrapped(x, scale, w["w13"][""], w["w2"][""]),
        "kernel": lambda w: kernel(x, w, scale),
        "module": lambda w: module([x, scale, w["w13"][""], w["w2"][""]]),
    }
    want = one(x, scale, *parts0)
    for name, fn in ways.items():
        out = fn(experts[0])
        out = out[0] if isinstance(out, (list, tuple)) else out
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6, msg=name)

    def timed(fn: Callable[[dict], object], cold: bool) -> float:
        order = [experts[i % len(experts)] for i in range(args.calls)] if cold else [experts[0]] * args.calls
        t0 = time.perf_counter()
        for w in order:
            fn(w)
        return (time.perf_counter() - t0) / args.calls * 1e6

    got: dict[tuple[str, bool], list[float]] = {(n, c): [] for n in ways for c in (False, True)}
    for _ in range(args.rounds):
        for cold in (False, True):
            for name, fn in ways.items():
                got[name, cold].append(timed(fn, cold))
    print(f"µs a call, {args.rounds} rounds × {args.calls} calls, median (min–max); cold = {args.experts} experts "
          f"({args.experts * 576 // 1024} MiB) in turn")
    for name in ways:
        cells = []
        for cold in (False, True):
            v = got[name, cold]
            cells.append(f"{'cold' if cold else 'hot'} {statistics.median(v):5.1f} ({min(v):.1f}–{max(v):.1f})")
        print(f"  {name:8s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
