"""The compiled decode step (`--compile`, runtime/compiled.py) against the eager one on the same store and
budget: the same greedy tokens and the same counters (hits, prefetch hits, misses, loads, wasted prefetches)
with the adaptive gate on, prefetch on and half the experts cached; against transformers' own model
without the gate; a second engine in the same process computes with its own experts; and where compiling
is impossible (no C++ compiler) the CLI says so in one line and answers eagerly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from dataclasses import asdict

import torch

from adapmoe_cli.runtime import moe_block
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import greedy, ref_greedy, reference_models, runtime_engine

SPEC = TinySpec(num_hidden_layers=3, num_local_experts=6, hidden_size=48, intermediate_size=80,
                num_attention_heads=4, num_key_value_heads=1)
PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 12]


def _counts(stats) -> dict:
    return {k: v for k, v in asdict(stats).items() if k != "stall_s"}


def _run(store: Store, compile: bool, gate: GatePolicy | None, notes: list[str]) -> tuple[list[int], dict, object]:
    overrides = {"cache.budget": SPEC.num_hidden_layers * SPEC.num_local_experts // 2, "prefetch": True,
                 "compile": compile}
    with runtime_engine(store, overrides, gate=gate) as eng:
        eng.decode.note = notes.append
        tokens = greedy(eng, PROMPT, 20) + greedy(eng, PROMPT[:4], 12)  # a second sequence: a new KV cache
        eng.manager.drain()
        return tokens, _counts(eng.stats), eng.decode


def test_compiled_decode_gives_the_eager_tokens_and_counts(make_store, make_checkpoint, monkeypatch):
    store = Store.open(make_store(SPEC, dtype=torch.float32))
    gate = GatePolicy({layer: 0.35 for layer in store.shape.moe_layers}, rule="test")
    notes: list[str] = []
    eager_tokens, eager_counts, _ = _run(store, False, gate, notes)
    tokens, counts, step = _run(store, True, gate, notes)
    assert notes == [] and step.failure is None and step.compile_s is not None  # it did compile
    assert tokens == eager_tokens
    assert counts == eager_counts
    assert counts["misses"] > 0 and counts["prefetch_hits"] > 0  # half the experts: loads happened
    assert counts["expert_activations"] < counts["layer_tokens"] * SPEC.num_experts_per_tok  # the gate dropped some

    # a second engine in the same process (another gate: other guards) compiles its own step — even where the
    # compiler keeps a single entry per code (the first engine's went with it) — and with no gate it decodes
    # what transformers' model decodes
    ref = reference_models(make_checkpoint, {"tiny": SPEC})("tiny")
    calls = _CountingModules(moe_block._MODULES)
    monkeypatch.setattr(moe_block, "_MODULES", calls)
    with torch._dynamo.config.patch(recompile_limit=1):
        tokens, _, step = _run(store, True, None, notes)
    assert notes == [] and step.compile_s is not None
    assert calls.lookups == (20 - 1 + 12 - 1) * SPEC.num_hidden_layers  # every decode step ran compiled
    assert tokens[:20] == ref_greedy(ref, PROMPT, 20)
    assert tokens[20:] == ref_greedy(ref, PROMPT[:4], 12)


class _CountingModules(weakref.WeakValueDictionary):
    """The registry the compiled graph's expert calls look their module up in, counting the lookups."""

    def __init__(self, other: weakref.WeakValueDictionary) -> None:
        super().__init__(other)
        self.lookups = 0

    def __getitem__(self, key: int):
        self.lookups += 1
        return super().__getitem__(key)


def test_without_a_compiler_it_says_so_and_answers_eagerly(make_store, tmp_path):
    store = make_store(SPEC, dtype=torch.float32)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    cmd = [sys.executable, "-m", "adapmoe_cli", "chat", str(store), "--prompt", "hi", "--json", "--max-new-tokens",
           "6", "--raw"]
    compiled = subprocess.run([*cmd, "--compile"], env=env, capture_output=True, text=True, timeout=300)
    eager = subprocess.run([*cmd, "--no-compile"], env=env, capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stderr
    lines = [line for line in (compiled.stdout + compiled.stderr).splitlines() if "--compile" in line]
    assert len(lines) == 1 and "running eagerly" in lines[0] and "Traceback" not in compiled.stderr
    assert json.loads(compiled.stdout)["token_ids"] == json.loads(eager.stdout)["token_ids"]
