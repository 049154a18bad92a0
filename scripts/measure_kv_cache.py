"""A decode step at a long context: transformers' `DynamicCache` (concatenating the whole cache every token)
against the runtime's `GrowingCache` (runtime/kv_cache.py). docs/performance.md, "The KV cache".

    python scripts/measure_kv_cache.py [--compile] [--contexts 64,2048,8192] [--rounds 4] [--tokens 32]

The embedded model with every expert resident, eagerly (or the compiled step, `--compile`; the first steps,
compiling, are not timed), 2 threads: a random prompt of each context length
(past the model's 512 positions for the longer ones: only the speed is read), then `--tokens` greedy steps
timed, each cache in turn, rounds alternated; both must give the same tokens. Median and range in ms a
token. Then, without a model, what the cache's own updates cost a token at Mixtral-8x7B's shape (32 layers,
keys and values of 8 heads × 128, bfloat16) at `--mixtral-contexts`: transformers' `DynamicLayer` against
`GrowingLayer`, each filled to the context and then updated `--tokens` times. Run on a quiet machine."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adapmoe_cli.budget import BudgetRequest
from adapmoe_cli.model_arg import open_model
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.runtime.kv_cache import GrowingCache, GrowingLayer
from adapmoe_cli.settings import load_settings

WARM = 3  # untimed steps before the timed ones


def alternated_decode(engine: Any, context: int, make: dict[str, Callable[[], Any]], rounds: int,
                      tokens: int) -> tuple[dict[str, list[float]], bool]:
    """A random prompt of `context` tokens, then `tokens` greedy steps timed after WARM untimed ones, for each
    way in `make` (which sets it up and returns its KV cache), rounds alternated: ms a token per round, and
    whether every way gave the same tokens (each way must give the same ones every round)."""
    prompt = torch.randint(3, 1000, (1, context), generator=torch.Generator().manual_seed(context))
    times: dict[str, list[float]] = {name: [] for name in make}
    outs: dict[str, list[int]] = {}
    for r in range(rounds):
        for name in (list(make) if r % 2 == 0 else list(make)[::-1]):
            kv = make[name]()
            token = engine.decode(prompt, kv).logits[:, -1:].argmax(-1)
            out = []
            for _ in range(WARM):  # (a compiled step's first steps compile and check every guard)
                token = engine.decode(token, kv).logits[:, -1:].argmax(-1)
                out.append(int(token))
            t0 = time.perf_counter()
            for _ in range(tokens):
                token = engine.decode(token, kv).logits[:, -1:].argmax(-1)
                out.append(int(token))
            times[name].append((time.perf_counter() - t0) / tokens * 1e3)
            assert outs.setdefault(name, out) == out
    return times, len({tuple(t) for t in outs.values()}) == 1


def arguments(description: str, contexts: str) -> argparse.Namespace:
    """This script's flags (and measure_attention.py's), on 2 threads."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--contexts", default=contexts)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--mixtral-contexts", default="4096,16384")
    ap.add_argument("--compile", action="store_true")
    torch.set_num_threads(2)
    return ap.parse_args()


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "64,2048,8192")
    settings = load_settings(overrides={"cache.budget": BudgetRequest.parse("100%", "--budget"),
                                        "compile": args.compile})
    with open_engine(open_model(None), settings) as engine, torch.inference_mode():
        config = engine.model.config
        make = {"transformers' DynamicCache": lambda: DynamicCache(config=config),
                "GrowingCache": lambda: GrowingCache(config)}
        for context in (int(c) for c in args.contexts.split(",")):
            times, same = alternated_decode(engine, context, make, args.rounds, args.tokens)
            assert same, "the two caches gave different tokens"
            print(f"context {context}{' (compiled)' if args.compile else ''}: " + "; ".join(
                f"{name} {statistics.median(v):.2f} ms a token ({min(v):.2f}–{max(v):.2f})"
                for name, v in times.items()))
    for context in (int(c) for c in args.mixtral_contexts.split(",")):
        for name, layer_type in (("DynamicLayer", DynamicLayer), ("GrowingLayer", GrowingLayer)):
            layers = [layer_type() for _ in range(32)]
            for layer in layers:
                full = torch.zeros(1, 8, context, 128, dtype=torch.bfloat16)
                layer.update(full, full)
            one = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                for layer in layers:
                    layer.update(one, one)
            print(f"Mixtral-8x7B's cache at {context} positions, {name}: "
                  f"{(time.perf_counter() - t0) / args.tokens * 1e3:.1f} ms a token in its updates")
            del layers


if __name__ == "__main__":
    main()
