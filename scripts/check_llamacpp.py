"""End-to-end check of llama.cpp as a peer (needs the build: scripts/build_llamacpp.py). Not part of the
test suite: it converts real models and runs llama.cpp.

  python scripts/check_llamacpp.py [--tokens 32] [--full-size 16MiB] [--widths f32,bf16,q8_0,q4_0]

For the embedded model, at each width: the GGUF is made (`gguf_for`), `llama-completion` runs with the
bench's argv (`completion_argv`) on the bench's default prompts (chat template applied), and the script
checks

1. the prompt tokens llama.cpp lists (`--verbose-prompt`) are exactly `chat_ids(...)`, the runtime's;
2. llama.cpp's greedy tokens against our runtime's (gating off, every expert resident, up to the
   runtime's first stop token, as llama.cpp runs with `--ignore-eos`): at f32, the runtime's weights,
   they must be equal up to the first near tie (a logit margin under 1e-3, where float rounding in
   another summation order may pick the runner-up); other widths only report how far they agree;
3. the timings parse, with the decode count llama.cpp reports.

With --full-size, the same for the full-size variant (`variant_store`) at --full-size-width (bf16:
checks 1 and 3; f32: all three, the runtime holding every padded expert in memory). Prints the
counts and speeds it saw; they are not a benchmark (nothing here controls the machine). Exit status 1
when a check fails."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from adapmoe_cli import budget as budgets
from adapmoe_cli.bench import default_prompts
from adapmoe_cli.conversation import chat_ids, load_tokenizer
from adapmoe_cli.errors import AdapmoeError
from adapmoe_cli.model_arg import open_model
from adapmoe_cli.peers import llamacpp
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.generate import eos_ids, generate_step, new_kv_cache
from adapmoe_cli.settings import GenerationSettings, load_settings
from adapmoe_cli.store import Store
from adapmoe_cli.units import parse_size

PROMPTS = [*default_prompts(), "Tell me a short story about a robot who learns to paint."]
#: the widths whose weights are the runtime's (f32): their greedy tokens must be the runtime's up to a near tie
EXACT_WIDTHS = {"f32"}
#: a logit margin this small is float rounding: llama.cpp's sums in another order may pick the runner-up
TIE = 1e-3


def runtime_greedy(store: Store, tokenizer: Any, prompts: list[list[int]],
                   tokens: int) -> list[tuple[list[int], list[float]]]:
    """Our runtime's greedy tokens per prompt (gating off, every expert resident, stopped before a stop
    token), each with its logit margin over the runner-up: where that is within float rounding, another
    engine's sum order may pick the runner-up."""
    every = store.shape.num_experts * len(store.shape.moe_layers)
    settings = load_settings(overrides={"cache.budget": every})
    budget = budgets.resolve(settings.cache.budget, store.cache_shape)
    gen = GenerationSettings(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)
    outs: list[tuple[list[int], list[float]]] = []
    with Engine(store, settings, budget) as engine:
        stop = eos_ids(engine, tokenizer)
        for ids in prompts:
            out: list[int] = []
            margins: list[float] = []
            for token, logits in generate_step(engine, ids, new_kv_cache(engine), gen):
                if token in stop or len(out) == tokens:
                    break
                top = logits[0].topk(2).values
                out.append(token)
                margins.append(float(top[0] - top[1]))
            outs.append((out, margins))
    return outs


def agreeing(tokenizer: Any, tokens: list[int], text: str) -> int:
    """How many of `tokens` llama.cpp's text starts with."""
    n = 0
    while n < len(tokens) and text.startswith(tokenizer.decode(tokens[: n + 1], skip_special_tokens=False)):
        n += 1
    return n


def run_llama(gguf: Path, ids: list[int], tokenizer: Any, tokens: int) -> dict[str, Any]:
    argv = llamacpp.completion_argv(gguf, llamacpp.prompt_text(tokenizer, ids), tokens,
                                    context=len(ids) + tokens + 8, verbose_prompt=True)
    for attempt in range(1, 4):
        done = subprocess.run([*argv, "-sp"], capture_output=True, text=True, errors="replace")
        try:
            timings = llamacpp.parse_timings(done.stdout, done.stderr)
            break
        except llamacpp.TimingsLost as e:
            print(f"    attempt {attempt}: {e}")
    else:
        raise AdapmoeError("llama.cpp lost its timings three times in a row")
    return {"stdout": done.stdout, "stderr": done.stderr, "timings": timings,
            "prompt_ids": llamacpp.parse_prompt_ids(done.stderr)}


def check(store: Store, widths: list[str], tokens: int, exact: bool) -> bool:
    tokenizer = load_tokenizer(store)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": text}]) for text in PROMPTS]
    expected = runtime_greedy(store, tokenizer, prompts, tokens) if exact else None
    ok = True
    for width in widths:
        try:
            gguf = llamacpp.gguf_for(store, width, note=lambda m: print(f"  {m}", flush=True))
        except AdapmoeError as e:
            print(f"{store.path.name} at {width}: FAIL: {e}")
            ok = False
            continue
        print(f"{store.path.name} at {width} ({gguf.stat().st_size / 2**20:.1f} MiB):", flush=True)
        for n, ids in enumerate(prompts):
            try:
                got = run_llama(gguf, ids, tokenizer, tokens)
            except AdapmoeError as e:
                print(f"  prompt {n}: FAIL: {e}")
                ok = False
                continue
            t = got["timings"]
            same_prompt = got["prompt_ids"] == ids and t["prompt_tokens"] == len(ids)
            line = (f"  prompt {n}: {t['prompt_tokens']} tokens (ours {len(ids)}, ids "
                    f"{'equal' if same_prompt else 'DIFFER'}); decode {t['decode_tokens']} runs in "
                    f"{t['decode_s']:.3f} s = {t['decode_tokens'] / t['decode_s']:.0f} tok/s; prefill "
                    f"{t['prompt_tokens'] / t['prefill_s']:.0f} tok/s")
            ok &= same_prompt
            text = got["stdout"].rstrip("\n")
            if expected is not None:
                want, margins = expected[n]
                k = agreeing(tokenizer, want, got["stdout"])
                line += f"; greedy tokens: {k} of {len(want)} equal the runtime's"
                if k < len(want):
                    tie = margins[k] < TIE
                    line += f" (then a {'near tie' if tie else 'DIFFERENT token'}: margin {margins[k]:.2g})"
                    ok &= tie or width not in EXACT_WIDTHS
            else:
                line += f"; text {text[:40]!r}"
            print(line, flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--widths", default="f32,bf16,q8_0,q4_0")
    parser.add_argument("--full-size", help="also check the full-size variant with experts of this size")
    parser.add_argument("--full-size-width", default="bf16", help="its GGUF width (f32: tokens compared too)")
    args = parser.parse_args()
    reason = llamacpp.why_unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    print("argv:", " ".join(llamacpp.completion_argv(Path("MODEL.gguf"), "PROMPT", args.tokens)))
    print("speeds below are not a benchmark (nothing here controls the machine)")
    store = open_model(None)
    ok = check(store, args.widths.split(","), args.tokens, exact=True)
    if args.full_size:
        from adapmoe_cli.store.export import variant_store

        big = variant_store(store, parse_size(args.full_size), note=print)
        ok &= check(big, [args.full_size_width], args.tokens, exact=args.full_size_width == "f32")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
