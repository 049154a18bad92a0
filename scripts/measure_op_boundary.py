"""What one call out of a compiled graph costs, before the manager does anything: the floor under each layer
call a compiled decode step makes into the cache manager (`adapmoe::offloaded_experts`,
`adapmoe::resolve_experts`, runtime/moe_block.py). docs/performance.md, "Prefetching further ahead".

    python scripts/measure_op_boundary.py [--rounds 30]

A compiled function of 8 "layers" the size of the embedded model's (a 192 × 192 product, its activation, a
router's top-2), compiled with inductor's C++ wrapper as the runtime's step is, each layer either passing
the top-2 ids on inside the graph or through an op whose Python body does nothing but answer two ids —
defined with `torch.library.custom_op`, or on a `torch.library.Library` directly as the runtime's are
(runtime/moe_block.py). The difference per layer is what leaving the graph costs; each op called eagerly
and `torch.tensor` alone are timed too. Run on a quiet machine."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

LAYERS, HIDDEN = 8, 192


def _two(ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0, 1], dtype=torch.long)


def _fake_two(ids: torch.Tensor) -> torch.Tensor:
    return ids.new_empty(2)


_custom = torch.library.custom_op("adapmoe_measure::answer_two", _two, mutates_args=())
_custom.register_fake(_fake_two)
_LIB = torch.library.Library("adapmoe_measure", "FRAGMENT")
_LIB.define("answer_two_plain(Tensor ids) -> Tensor")
_LIB.impl("answer_two_plain", _two, "CompositeExplicitAutograd")
torch.library.register_fake("adapmoe_measure::answer_two_plain")(_fake_two)
OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "custom_op": _custom, "Library": torch.ops.adapmoe_measure.answer_two_plain.default}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5 for _ in range(LAYERS)]
    routers = [torch.randn(8, HIDDEN, generator=g) for _ in range(LAYERS)]

    def step(x: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        for w, r in zip(weights, routers, strict=True):
            x = torch.nn.functional.silu(x @ w)
            ids = torch.topk(x @ r.T, 2).indices[0]
            shift = op(ids)[0] if op is not None else ids[0] * 0  # 0 either way, used either way
            x = torch.index_select(x, 1, torch.arange(HIDDEN) + shift)
        return x

    x = torch.randn(1, HIDDEN, generator=g)
    options = {"cpp_wrapper": True}  # as the runtime compiles (runtime/compiled.py)
    ways = {"in the graph": torch.compile(lambda x: step(x, None), options=options)}
    for name, op in OPS.items():
        ways[f"through a {name} op"] = torch.compile(lambda x, op=op: step(x, op), options=options)
    us: dict[str, list[float]] = {way: [] for way in ways}
    with torch.no_grad():  # as a decode step runs
        for fn in ways.values():
            for _ in range(20):
                fn(x)
        for _ in range(args.rounds):
            for way, fn in ways.items():
                t = time.perf_counter()
                for _ in range(200):
                    fn(x)
                us[way].append((time.perf_counter() - t) / 200 * 1e6)
    base = statistics.median(us["in the graph"])
    for way, v in us.items():
        m = statistics.median(v)
        print(f"{way}: {m:.1f} µs a call of {LAYERS} layers ({min(v):.1f}–{max(v):.1f}); "
              f"{(m - base) / LAYERS:.1f} µs a layer more than in the graph")
    ids = torch.tensor([3, 5])
    timed = [(f"the {name} op called eagerly", lambda op=op: op(ids)) for name, op in OPS.items()]
    timed.append(("torch.tensor of two ids alone", lambda: torch.tensor([0, 1], dtype=torch.long)))
    for what, fn in timed:
        for _ in range(1000):
            fn()
        t = time.perf_counter()
        for _ in range(20000):
            fn()
        print(f"{what}: {(time.perf_counter() - t) / 20000 * 1e6:.2f} µs")


if __name__ == "__main__":
    main()
