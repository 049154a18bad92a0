"""The compiled decode step (`--compile`) on a tiny random checkpoint of each supported family: greedy tokens
equal transformers' own model (eager experts) and the eager runtime's, over two generations long enough to
cross GPT-OSS's sliding window (8 positions), at half the experts with prefetch on. Prints per family
whether they are equal, whether compiling failed, and how many steps ran with only tensor and size guards
(compiled.py); exits non-zero if any family differs. The suite runs the tiny Mixtral and a toy whose graph
branches on the KV length (tests/test_compiled.py); this covers the rest (~3 min with a warm inductor
cache, several more on a new machine). Usage: python scripts/check_compiled_families.py OUT_DIR [FAMILY ...]"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from adapmoe_cli.budget import BudgetRequest
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
from adapmoe_cli.settings import GenerationSettings, load_settings
from adapmoe_cli.store import Store
from adapmoe_cli.store.writer import shard
from adapmoe_cli.synthetic import TINY_FAMILIES, write_family_checkpoint

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 12]
TOKENS = 24


def greedy(engine, prompt: list[int], n: int) -> list[int]:
    gen = GenerationSettings(max_new_tokens=n, temperature=0.0, repetition_penalty=1.0)
    out = []
    for token, _ in generate_step(engine, prompt, new_kv_cache(engine), gen):
        out.append(token)
        if len(out) == n:
            return out
    raise AssertionError("generation ended early")


def run(store: Store, compile: bool) -> tuple[list[int], object]:
    settings = load_settings(overrides={"cache.budget": BudgetRequest.parse("50%", "--budget"), "prefetch": True,
                                        "prefetch_precision": 0.0, "compile": compile})
    notes: list[str] = []
    with open_engine(store, settings) as engine:
        engine.decode.note = notes.append
        tokens = greedy(engine, PROMPT, TOKENS) + greedy(engine, PROMPT[:3], TOKENS - 4)  # a second KV cache
        return tokens, (engine.decode, notes)


def main() -> int:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or sorted(TINY_FAMILIES)
    bad = 0
    for name in names:
        root = out / name
        if not (root / "store" / "manifest.json").exists():
            shard(write_family_checkpoint(root / "ckpt", name), root / "store")
        ref = AutoModelForCausalLM.from_pretrained(root / "ckpt", dtype=torch.float32, experts_implementation="eager")
        ref.generation_config.eos_token_id = None
        want = ref.eval().generate(torch.tensor([PROMPT]), max_new_tokens=TOKENS, do_sample=False,
                                   pad_token_id=0)[0, len(PROMPT):].tolist()
        store = Store.open(root / "store")
        t0 = time.perf_counter()
        compiled, (step, notes) = run(store, compile=True)
        seconds = time.perf_counter() - t0
        eager, _ = run(store, compile=False)
        ok = compiled[:TOKENS] == want and compiled == eager and step.failure is None
        bad += not ok
        print(f"{name:12s} {'ok' if ok else 'DIFFERS'}: equal to transformers {compiled[:TOKENS] == want}, to eager "
              f"{compiled == eager}; compile failure {step.failure}; {step.unguarded_steps} of "
              f"{2 * TOKENS - 6} steps with tensor and size guards only; notes {notes}; {seconds:.0f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
