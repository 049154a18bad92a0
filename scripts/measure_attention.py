"""A decoded token's attention: transformers' `sdpa` (grouped-query heads through `enable_gqa`) against the
runtime's packed heads (runtime/attention.py). docs/performance.md, "Attention of a decoded token".

    python scripts/measure_attention.py [--compile] [--contexts 64,512,2048,8192] [--rounds 4] [--tokens 32]

The embedded model (6 query heads on 2 key/value heads) with every expert resident, eagerly (or the
compiled step, `--compile`; the first steps, compiling, are not timed), 2 threads: a random prompt of
each context length (past the model's 512 positions for the longer ones: only the speed is read), then
`--tokens` greedy steps timed, each attention in turn on the same engine, rounds alternated; both must
give the same tokens. Median and range in ms a token. Then, without a model, one decoded token's attention
in all 32 layers of Mixtral-8x7B's shape (32 query heads on 8 key/value heads of 128) at
`--mixtral-contexts`, bfloat16 and float32, each way. Run on a quiet machine."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_kv_cache import alternated_decode, arguments  # noqa: E402

from adapmoe_cli.budget import BudgetRequest  # noqa: E402
from adapmoe_cli.model_arg import open_model  # noqa: E402
from adapmoe_cli.planning.resolve import open_engine  # noqa: E402
from adapmoe_cli.runtime.attention import NAME  # noqa: E402
from adapmoe_cli.runtime.generate import new_kv_cache  # noqa: E402
from adapmoe_cli.settings import load_settings  # noqa: E402

WAYS = {"transformers' sdpa": "sdpa", "packed": NAME}


def model_steps(args: argparse.Namespace) -> None:
    settings = load_settings(overrides={"cache.budget": BudgetRequest.parse("100%", "--budget"),
                                        "compile": args.compile})
    with open_engine(open_model(None), settings) as engine, torch.inference_mode():
        config = engine.model.config
        assert config._attn_implementation == NAME

        def way(implementation: str) -> Callable[[], Any]:
            def make() -> Any:
                config._attn_implementation = implementation  # (a compiled step checks every guard at a
                return new_kv_cache(engine)  # generation's first step: each way gets its own graph)
            return make

        make = {name: way(implementation) for name, implementation in WAYS.items()}
        for context in (int(c) for c in args.contexts.split(",")):
            times, same = alternated_decode(engine, context, make, args.rounds, args.tokens)
            config._attn_implementation = NAME
            print(f"context {context}{' (compiled)' if args.compile else ''}: " + "; ".join(
                f"{name} {statistics.median(v):.2f} ms a token ({min(v):.2f}–{max(v):.2f})"
                for name, v in times.items()) + ("" if same else "  [TOKENS DIFFER]"))


def mixtral_attention(args: argparse.Namespace) -> None:
    heads, kv_heads, dim, layers = 32, 8, 128, 32
    for dtype in (torch.bfloat16, torch.float32):
        for context in (int(c) for c in args.mixtral_contexts.split(",")):
            q = torch.randn(1, heads, 1, dim, dtype=dtype)
            kvs = [(torch.randn(1, kv_heads, context, dim, dtype=dtype),
                    torch.randn(1, kv_heads, context, dim, dtype=dtype)) for _ in range(layers)]
            ways = {
                "transformers' sdpa": lambda k, v, q=q: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                "packed": lambda k, v, q=q: F.scaled_dot_product_attention(
                    q.reshape(1, kv_heads, heads // kv_heads, dim), k, v).reshape(1, heads, 1, dim),
            }
            times: dict[str, list[float]] = {name: [] for name in ways}
            for r in range(args.rounds):
                for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                    t0 = time.perf_counter()
                    for _ in range(args.tokens):
                        for k, v in kvs:
                            ways[name](k, v)
                    times[name].append((time.perf_counter() - t0) / args.tokens * 1e3)
            print(f"Mixtral-8x7B's attention, one token, 32 layers, {context} positions, {str(dtype)[6:]}: " +
                  "; ".join(f"{name} {statistics.median(v):.1f} ms ({min(v):.1f}–{max(v):.1f})"
                            for name, v in times.items()))
            del kvs


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "64,512,2048,8192")
    model_steps(args)
    mixtral_attention(args)


if __name__ == "__main__":
    main()
