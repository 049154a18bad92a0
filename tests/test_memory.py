"""Peak memory of the runtime, in a process of its own: a store whose experts are four times the budget
is decoded at that budget (evenly split, and split by a cache plan), and the peak RSS stays within
dense weights + cache + a stated slack. The slack has two parts, both asserted: what the process holds
before the engine exists (Python, torch, transformers' Mixtral and adapmoe imported: ≈ 340 MiB here,
more than the README's 300 MiB on its own), held to `LIBRARIES`; and what running adds beyond dense +
cache (the KV cache, activations, allocator slack: 2–14 MiB measured), held to `RUN_SLACK`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapmoe_cli.planning.planner import PlanRequest, make_plan
from adapmoe_cli.profiling.profiler import ProfileRequest, make_profile
from adapmoe_cli.settings import load_settings
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec

MiB = 1 << 20
# 4 layers × 8 experts of 6 MiB (float32): 192 MiB of experts against a budget of 8 slots (48 MiB)
SPEC = TinySpec(num_hidden_layers=4, num_local_experts=8, hidden_size=256, intermediate_size=2048,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512)
BUDGET = 8
RUN_SLACK = 32 * MiB
LIBRARIES = 400 * MiB
TEXT = ("Mixture of experts models route every token to a few experts; the others stay on disk. A cache keeps "
        "the experts that are used often in memory. def main(): return 0\n") * 20

# The child: imports first (its baseline), then the runtime as chat and eval open it (`open_engine`).
CHILD = """
import json, sys
from pathlib import Path

def peak():
    # VmHWM: this address space's high-water mark (ru_maxrss would carry the forking parent's over exec)
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

import torch
import transformers.models.mixtral.modeling_mixtral  # noqa: F401  (imported by the engine anyway)
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
from adapmoe_cli.settings import GenerationSettings, load_settings
from adapmoe_cli.store import Store

torch.ones(64, 64) @ torch.ones(64, 64)  # the thread pool exists before the baseline
baseline = peak()
store_path, budget, plan, tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
settings = load_settings(overrides={"cache.budget": budget, "plan": plan})
gen = GenerationSettings(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)
with open_engine(Store.open(Path(store_path)), settings) as eng:
    n = 0
    for _ in generate_step(eng, list(range(3, 35)), new_kv_cache(eng), gen):
        n += 1
        if n == tokens:
            break
    eng.manager.drain()
    print(json.dumps({"baseline": baseline, "peak": peak(), "dense": eng.store.dense_bytes,
                      "cache": eng.cache.capacity_bytes, "slots": eng.cache.num_slots,
                      "quotas": {str(k): v for k, v in eng.budget.quotas.items()}, "tokens": n,
                      "bytes_read": eng.stats.bytes_read}))
"""


def _child(store: Path, plan: str, tokens: int = 16) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(store), str(BUDGET), plan, str(tokens)],
                       capture_output=True, text=True, timeout=300, env=os.environ)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def store(make_store) -> Path:
    return make_store(SPEC, dtype=torch.float32)


@pytest.mark.parametrize("split", ["even", "plan"])
def test_peak_rss_is_dense_plus_cache_plus_slack(store, tmp_path, split):
    st = Store.open(store)
    experts = len(st.experts) * st.slot_bytes
    assert experts >= 4 * BUDGET * st.slot_bytes  # all experts would not fit in the budget and the slack
    plan = "none"
    quotas = None
    if split == "plan":  # profile and plan outside the store (it is shared, read-only)
        text = tmp_path / "text.txt"
        text.write_text(TEXT)
        settings = load_settings(overrides={"cache.budget": BUDGET})
        profile = make_profile(st, settings, ProfileRequest(text, "test", 64, 32, method="gradient",
                                                            out=tmp_path / "profile.json"))
        path, data = make_plan(st, settings, PlanRequest(budget_slots=BUDGET, gate_mode="off", profile=profile,
                                                         out=tmp_path / "plan.json"))
        plan, quotas = str(path), {str(x["layer"]): x["slots"] for x in data["layers"]}
    out = _child(store, plan)
    assert out["tokens"] == 16 and out["slots"] == BUDGET and out["cache"] == BUDGET * st.slot_bytes
    if quotas is not None:
        assert out["quotas"] == quotas  # the plan's split was used
    assert out["bytes_read"] >= 2 * out["cache"]  # the run streamed more experts than the cache holds
    dense_cache = out["dense"] + out["cache"]
    grown = out["peak"] - out["baseline"]
    assert grown <= dense_cache + RUN_SLACK, (
        f"running added {grown / MiB:.1f} MiB; dense + cache = {dense_cache / MiB:.1f} MiB")
    assert out["peak"] <= dense_cache + LIBRARIES + RUN_SLACK, (
        f"peak {out['peak'] / MiB:.1f} MiB, libraries {out['baseline'] / MiB:.1f} MiB")
