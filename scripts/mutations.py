"""Apply each of issue #22's mutations to the source, run the tests that should catch it, and restore the
file (always, also on Ctrl-C). Not part of the suite: a check that the suite can fail.

  python scripts/mutations.py                 # every mutation
  python scripts/mutations.py renorm lru-touch  # some
  python scripts/mutations.py --list

A mutation is caught when at least one of its tests fails; the report lists which. Run it on a clean
work tree: the file under mutation is rewritten in place and put back byte for byte afterwards."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "adapmoe_cli"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str  # under src/adapmoe_cli
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files


MUTATIONS = [
    Mutation("renorm", "renormalise the kept weights by the unpruned sum", "runtime/gating.py",
             "return kept / kept.sum(dim=-1, keepdim=True)", "return kept / weights.sum(dim=-1, keepdim=True)",
             ("tests/test_gate.py",)),
    Mutation("lru-touch", "LRU `touch` moves the expert to the wrong end", "runtime/eviction.py",
             "if expert in self._order:\n            self._order.move_to_end(expert)",
             "if expert in self._order:\n            self._order.move_to_end(expert, last=False)",
             ("tests/test_runtime.py::test_lru_order_equals_a_textbook_lru",
              "tests/test_simulate.py::test_replay_of_lru_equals_a_textbook_lru",
              "tests/test_components.py::test_lru_evicts_least_recent_and_respects_keep")),
    Mutation("keep-ge", "`>=` → `<` in the gate's keep test", "runtime/gating.py",
             "keep[:, 1:] = weights[:, 1:] >= threshold", "keep[:, 1:] = weights[:, 1:] < threshold",
             ("tests/test_gate.py",)),
    Mutation("prefetch-gate", "prefetch ignores the next layer's gate", "runtime/moe_block.py",
             "apply_gate(weights, ids, self.gate_policy().threshold(self.next_layer))",
             "apply_gate(weights, ids, None)",
             ("tests/test_gate.py::test_prefetch_asks_for_exactly_the_next_layers_gated_experts",
              "tests/test_simulate.py::test_replaying_the_runtimes_run_reproduces_its_counts")),
    Mutation("dp-last", "the DP skips its last slot count", "planning/allocate.py",
             "for s in range(1, max_per[l_idx] + 1):", "for s in range(1, max_per[l_idx]):",
             ("tests/test_profile_plan.py::test_dp_allocation_equals_brute_force",
              "tests/test_profile_plan.py::test_plan_at_every_budget_spends_it_and_beats_the_even_split")),
    Mutation("no-odirect", "the reader opens expert files without O_DIRECT", "store/reader.py",
             "fd = os.open(path, flags | os.O_DIRECT)", "fd = os.open(path, flags)",
             ("tests/test_runtime.py::test_engine_reads_experts_with_o_direct",
              "tests/test_bench.py::test_bench_runs_every_policy_and_writes_json_and_chart")),
    Mutation("engine-buffered", "the engine asks for a buffered reader", "runtime/engine.py",
             "self._reader = ExpertReader(store)", "self._reader = ExpertReader(store, direct=False)",
             ("tests/test_runtime.py::test_engine_reads_experts_with_o_direct",)),
    Mutation("plan-over-budget", "a plan whose slots exceed the budget is obeyed", "planning/resolve.py",
             "quotas = plan.quotas_for(budget.total)", "quotas = plan.quotas",
             ("tests/test_profile_plan.py::test_a_plan_is_never_obeyed_beyond_the_budget",)),
    Mutation("plan-sum-unchecked", "a plan whose slots do not add up to its budget_slots is read",
             "planning/plan_file.py", "if sum(int(x[\"slots\"]) for x in layers) != total:", "if False:",
             ("tests/test_profile_plan.py::test_a_plan_is_never_obeyed_beyond_the_budget",)),
]


def run_tests(tests: tuple[str, ...]) -> tuple[int, list[str]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", r.stdout, re.M)))
    return r.returncode, failed


def apply(m: Mutation) -> tuple[Path, bytes]:
    path = SRC / m.file
    original = path.read_bytes()
    text = original.decode()
    if text.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the text to mutate occurs {text.count(m.old)} times in {m.file}")
    path.write_text(text.replace(m.old, m.new))
    return path, original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    chosen = [m for m in MUTATIONS if not a.names or m.name in a.names]
    if a.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:18} {m.what}")
        return
    missed = []
    for m in chosen:
        path, original = apply(m)
        try:
            code, failed = run_tests(m.tests)
        finally:
            path.write_bytes(original)
        caught = code != 0 and bool(failed)
        print(f"{m.name:18} {'CAUGHT' if caught else 'MISSED'}  {m.what}", flush=True)
        for f in failed:
            print(f"    {f}")
        if not caught:
            missed.append(m.name)
    if missed:
        raise SystemExit(f"missed: {', '.join(missed)}")


if __name__ == "__main__":
    main()
