"""How many decoded tokens need the manager in the middle of their step, at part of the experts
(docs/performance.md, "Would a graph for the whole token pay?").

    python scripts/measure_miss_tokens.py [--budget 50%] [--tokens 64]

The embedded model with adapmoe's defaults (the store's plan, the gate, markov eviction, admitted prefetch),
eagerly: these are counts, and counts do not depend on timing or on compiling. The four prompts of
docs/performance-prompts.txt with the chat template, each decoded greedily for `--tokens` tokens after its
prompt, as the bench does. A graph compiled for a whole token, its experts read from the slots they hold
when the token starts, would be right only for tokens where none of these happens during the step:
- a demand miss (an expert read while the token waits);
- a prefetch hit (an expert read during the token, after the prediction of the layer before);
- a prefetch issued (a read started from the middle of the step).
For tokens with a miss it also prints the first layer that missed: the graph would have to run again
from there."""

from __future__ import annotations

import argparse
from pathlib import Path

from adapmoe_cli.bench import read_prompts
from adapmoe_cli.budget import BudgetRequest
from adapmoe_cli.conversation import chat_ids, load_tokenizer
from adapmoe_cli.model_arg import open_model
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.runtime.measure import timed_decode
from adapmoe_cli.settings import load_settings

PROMPTS = Path(__file__).resolve().parent.parent / "docs" / "performance-prompts.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    store = open_model(None)
    settings = load_settings(overrides={"cache.budget": BudgetRequest.parse(args.budget, "--budget")})
    tokenizer = load_tokenizer(store)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in read_prompts(PROMPTS)]
    tokens: list[tuple[int, int, int, int | None]] = []  # (misses, prefetch hits, prefetches issued, first layer)
    with open_engine(store, settings) as engine:
        stats = engine.stats
        calls: list[tuple[int | None, int]] = []  # each layer call: (layer, misses counted before it)
        engine.manager.on_layer.append(lambda layer, needed: calls.append((layer, stats.misses)))
        mark = {"stats": stats.copy(), "calls": 0}  # where the step now running started

        def after(n: int) -> None:
            d = stats.delta(mark["stats"])
            mine = calls[mark["calls"]:] + [(None, stats.misses)]
            first = next((mine[i][0] for i in range(len(mine) - 1) if mine[i + 1][1] > mine[i][1]), None)
            if n > 1:  # the first step's numbers hold the prompt's reads
                tokens.append((d.misses, d.prefetch_hits, d.prefetches_issued, first))
            mark["stats"], mark["calls"] = stats.copy(), len(calls)

        for prompt in prompts:
            mark["stats"], mark["calls"] = stats.copy(), len(calls)
            timed_decode(engine, prompt, args.tokens, after_step=after)
    n = len(tokens)
    missed = [t for t in tokens if t[0]]
    print(f"{n} decoded tokens at {args.budget}: {sum(t[0] for t in tokens) / n:.3f} demand misses a token")
    print(f"tokens with a demand miss: {len(missed) / n:.1%}; with a miss or a prefetch hit: "
          f"{sum(1 for t in tokens if t[0] or t[1]) / n:.1%}; with any of those or a prefetch issued: "
          f"{sum(1 for t in tokens if t[0] or t[1] or t[2]) / n:.1%}")
    print("first layer that missed (layer: tokens):",
          {layer: sum(1 for t in missed if t[3] == layer) for layer in sorted({t[3] for t in missed})})


if __name__ == "__main__":
    main()
