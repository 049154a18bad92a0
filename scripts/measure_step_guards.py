"""What skipping the compiler's guards between decode steps saves (runtime/compiled.py): in one process, with
every expert resident and the gate off, alternate between the compiled step as shipped (steady steps check
only tensor and size guards) and the same step made to check every guard on each call; paired per round.
Run on a quiet machine. Usage: python scripts/measure_step_guards.py [MODEL] [--tokens 32] [--rounds 30]"""

from __future__ import annotations

import argparse
import statistics

import torch
from profile_decode import decode

from adapmoe_cli.budget import BudgetRequest
from adapmoe_cli.model_arg import open_model
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.runtime import compiled
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.generate import compile_decode
from adapmoe_cli.settings import load_settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)
    every = {"on": False}
    call = compiled.DecodeStep.__call__

    def guarded(self, *a, **k):  # forget the steadiness before each call: every guard checked
        if every["on"]:
            self._steady = None
        return call(self, *a, **k)

    compiled.DecodeStep.__call__ = guarded
    settings = load_settings(overrides={"cache.budget": BudgetRequest.parse("100%", "--budget"), "compile": True})
    ms: dict[str, list[float]] = {"every guard": [], "shipped": []}
    with open_engine(open_model(args.model), settings) as engine:
        engine.use_gate(GatePolicy.off())
        compile_decode(engine)
        decode(engine, args.tokens)
        for r in range(args.rounds):
            for name in (("every guard", "shipped") if r % 2 == 0 else ("shipped", "every guard")):
                every["on"] = name == "every guard"
                ms[name].append(decode(engine, args.tokens) / args.tokens * 1e3)
    for name, v in ms.items():
        print(f"{name}: {statistics.median(v):.3f} ms a token ({min(v):.3f}–{max(v):.3f})")
    d = [a - b for a, b in zip(ms["every guard"], ms["shipped"], strict=True)]
    print(f"paired saving: {statistics.median(d):.3f} ms a token ({min(d):.3f}–{max(d):.3f}), {len(d)} pairs")


if __name__ == "__main__":
    main()
