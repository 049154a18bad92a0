"""The compiled decode step (`--compile`) on a tiny random checkpoint of each supported family: greedy tokens
equal transformers' own model (eager experts) and the eager runtime's, over two generations long enough to
cross GPT-OSS's sliding window (8 positions), at half the experts with prefetch on (each decode step's
experts computed in the graph from the slots the manager names, moe_block.resolve_experts) — or, with
`--resident`, every expert read before the first token, so every decode step computes its experts inside the
graph with no call to the manager (Engine._in_graph). Prints per family whether they are equal, whether
compiling failed, how many steps ran with only tensor and size guards (compiled.py) and how many layer calls
the graph computed (and of those, how many from the manager's slots); exits non-zero if any family
differs. The suite runs the tiny Mixtral and a toy whose graph branches on the KV length
(tests/test_compiled.py); this covers the rest (~3 min with a warm inductor cache, several more on a new
machine).
Usage: python scripts/check_compiled_families.py OUT_DIR [--resident] [FAMILY ...]"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers: the suite's greedy and reference

from adapmoe_cli.runtime.moe_block import OffloadedExperts  # noqa: E402
from adapmoe_cli.store import Store  # noqa: E402
from adapmoe_cli.store.writer import shard  # noqa: E402
from adapmoe_cli.synthetic import TINY_FAMILIES, write_family_checkpoint  # noqa: E402
from tests.helpers import greedy, ref_greedy, runtime_engine  # noqa: E402

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 12]
TOKENS = 24


def run(store: Store, compile: bool, resident: bool) -> tuple[list[int], object, list[str], list[int]]:
    """Two generations (a second KV cache), at half the experts with prefetch on, or every expert read first;
    also the layer calls the graph computed: [by itself, from the slots the manager named]."""
    every = store.shape.num_experts * len(store.shape.moe_layers)
    notes: list[str] = []
    in_graph = [0, 0]
    resolve = OffloadedExperts._resolve

    def resolved(block, ids, predicted):
        in_graph[1] += 1
        return resolve(block, ids, predicted)

    OffloadedExperts._resolve = resolved
    with runtime_engine(store, {"cache.budget": every if resident else every // 2, "prefetch": True,
                                "prefetch_precision": 0.0, "compile": compile}) as engine:
        engine.decode.note = notes.append
        if resident:
            for layer in store.shape.moe_layers:
                engine.manager.preload(layer, range(store.shape.num_experts))
        count = engine.decode.after

        def after() -> None:
            in_graph[0] += int(engine._graph_counts[0])
            count()

        engine.decode.after = after
        try:
            tokens = greedy(engine, PROMPT, TOKENS) + greedy(engine, PROMPT[:3], TOKENS - 4)
        finally:
            OffloadedExperts._resolve = resolve
        return tokens, engine.decode, notes, in_graph


def main() -> int:
    out = Path(sys.argv[1])
    resident = "--resident" in sys.argv[2:]
    names = [a for a in sys.argv[2:] if a != "--resident"] or sorted(TINY_FAMILIES)
    bad = 0
    for name in names:
        root = out / name
        if not (root / "store" / "manifest.json").exists():
            shard(write_family_checkpoint(root / "ckpt", name), root / "store")
        ref = AutoModelForCausalLM.from_pretrained(root / "ckpt", dtype=torch.float32, experts_implementation="eager")
        want = ref_greedy(ref.eval(), PROMPT, TOKENS)
        store = Store.open(root / "store")
        t0 = time.perf_counter()
        compiled, step, notes, in_graph = run(store, True, resident)
        seconds = time.perf_counter() - t0
        eager, _, _, _ = run(store, False, resident)
        ok = compiled[:TOKENS] == want and compiled == eager and step.failure is None
        bad += not ok
        print(f"{name:12s} {'ok' if ok else 'DIFFERS'}: equal to transformers {compiled[:TOKENS] == want}, to eager "
              f"{compiled == eager}; compile failure {step.failure}; {step.unguarded_steps} of "
              f"{2 * TOKENS - 6} steps with tensor and size guards only; {sum(in_graph)} layer calls computed in the "
              f"graph ({in_graph[1]} from the manager's slots); "
              f"notes {notes}; {seconds:.0f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
