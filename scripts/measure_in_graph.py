"""What computing a layer's experts inside the compiled graph saves, against the same compiled step calling the
manager for them: in one process, alternate round by round (the order rotating) between the ways the engine
can compute them — "in the graph": a settled layer's, with no call out of the graph (moe_block
.OffloadedExperts._from_slots; only where the budget holds every expert, which the engine then reads before
the first token); "from the manager's slots": the manager's call keeps the books and loads, the graph
computes (`resolve_in_graph`, ungated calls of small experts); "through the manager": it computes them
(`offloaded_experts`). Each is a compiled graph of its own; switching makes the next step check every guard
and pick it. Prints each one's ms a token and its time paired with the manager's per round, and the graph's
settled layer calls per round. Run on a quiet machine.
Usage: python scripts/measure_in_graph.py [MODEL] [--budget 100%] [--tokens 32] [--rounds 20] [--gate]"""

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

GRAPH, SLOTS, MANAGER = "in the graph", "from the manager's slots", "through the manager"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--budget", default="100%", help="expert slots, as `adapmoe bench --budget` takes them")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--gate", action="store_true", help="the shipped gate (default: off, as `resident` runs)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = load_settings(overrides={"cache.budget": BudgetRequest.parse(args.budget, "--budget"), "compile": True})
    with open_engine(open_model(args.model), settings) as engine:
        if not args.gate:
            engine.use_gate(GatePolicy.off())
        chosen = {b.layer: (b.stacked, b.graph_counts, b.gated_in_graph) for b in engine._blocks}
        assert any(s is not None for s, _, _ in chosen.values()), "no layer can compute in the graph"
        ways = ([GRAPH] if all(c is not None for _, c, _ in chosen.values()) else []) + [SLOTS, MANAGER]
        ms: dict[str, list[float]] = {way: [] for way in ways}
        graph_calls = []
        count = engine.decode.after

        def counted() -> None:
            graph_calls[-1] += int(engine._graph_counts[0])
            count()

        engine.decode.after = counted

        def use(way: str) -> None:
            for b in engine._blocks:
                stacked, counts, gated = chosen[b.layer]
                if way == MANAGER or stacked is None:
                    b.compute_in_graph(None)
                elif way == SLOTS:
                    b.resolve_in_graph(stacked)
                else:
                    b.compute_in_graph(stacked, counts, gated)
            engine.decode.state_changed()

        for way in ways:  # compile each graph, untimed
            use(way)
            graph_calls.append(0)
            compile_decode(engine)
            decode(engine, args.tokens)
        for r in range(args.rounds):
            for way in ways[r % len(ways):] + ways[:r % len(ways)]:
                use(way)
                graph_calls.append(0)
                ms[way].append(decode(engine, args.tokens) / args.tokens * 1e3)
                if way != GRAPH:
                    assert graph_calls[-1] == 0
    for way, v in ms.items():
        line = f"{way}: {statistics.median(v):.3f} ms a token ({min(v):.3f}–{max(v):.3f})"
        if way != MANAGER:
            paired = [a / b for a, b in zip(v, ms[MANAGER], strict=True)]
            line += f"; paired with the manager's {statistics.median(paired):.2f} ({min(paired):.2f}–{max(paired):.2f})"
        print(line)
    print(f"{args.rounds} rounds; settled layer calls in the graph per round: {max(graph_calls)}")


if __name__ == "__main__":
    main()
