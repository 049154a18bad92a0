"""What computing a settled layer's experts inside the compiled graph saves (moe_block.OffloadedExperts
._from_slots), against the same compiled step calling the manager for them: in one process, with every expert
read before the first token, alternate round by round between the two (each a compiled graph of its own;
switching makes the next step check every guard and pick the other one); paired per round. Also the
counts: the graph's layer calls per round. Run on a quiet machine.
Usage: python scripts/measure_in_graph.py [MODEL] [--tokens 32] [--rounds 20] [--gate]"""

from __future__ import annotations

import argparse
import statistics

import torch
from profile_decode import decode

from adapmoe_cli.budget import BudgetRequest
from adapmoe_cli.model_arg import open_model
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.generate import compile_decode
from adapmoe_cli.settings import load_settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--gate", action="store_true", help="the shipped gate (default: off, as `resident` runs)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = load_settings(overrides={"cache.budget": BudgetRequest.parse("100%", "--budget"), "compile": True})
    ms: dict[str, list[float]] = {"in the graph": [], "through the manager": []}
    with open_engine(open_model(args.model), settings) as engine:
        if not args.gate:
            engine.use_gate(GatePolicy.off())
        held = {b.layer: b.stacked for b in engine._blocks}  # (the engine read every expert: a full budget)
        assert all(s is not None for s in held.values()), "no layer can compute in the graph"
        graph_calls = []
        count = engine.decode.after

        def counted() -> None:
            graph_calls[-1] += int(engine._graph_counts[0])
            count()

        engine.decode.after = counted

        def use(in_graph: bool) -> None:
            for b in engine._blocks:
                b.compute_in_graph(held[b.layer], engine._graph_counts) if in_graph else b.compute_in_graph(None)
            engine.decode.state_changed()

        for in_graph in (True, False):  # compile both graphs, untimed
            use(in_graph)
            graph_calls.append(0)
            compile_decode(engine)
            decode(engine, args.tokens)
        for r in range(args.rounds):
            for name in (("in the graph", "through the manager") if r % 2 == 0 else
                         ("through the manager", "in the graph")):
                use(name == "in the graph")
                graph_calls.append(0)
                ms[name].append(decode(engine, args.tokens) / args.tokens * 1e3)
                if name == "through the manager":
                    assert graph_calls[-1] == 0
    for name, v in ms.items():
        print(f"{name}: {statistics.median(v):.3f} ms a token ({min(v):.3f}–{max(v):.3f})")
    d = [a - b for a, b in zip(ms["through the manager"], ms["in the graph"], strict=True)]
    print(f"paired saving: {statistics.median(d):.3f} ms a token ({min(d):.3f}–{max(d):.3f}), {len(d)} pairs; "
          f"layer calls in the graph per round: {max(graph_calls)}")


if __name__ == "__main__":
    main()
