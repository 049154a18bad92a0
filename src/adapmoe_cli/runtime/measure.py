"""Timed runs of the engine — the one place decode speed is measured. `timed_decode`: one prompt's
prefill and greedy decode, with the statistics of the timed decode steps; `run_setup`: a cold cache (a
new engine) for one policy's setup, over several prompts. The bench, the simulator's calibration and
the measurement scripts use them. Knows nothing of text or terminals."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapmoe_cli.budget import Budget
from adapmoe_cli.runtime import compiled, row_linear
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.settings import GenerationSettings, Settings
from adapmoe_cli.store import Store


@dataclass(frozen=True)
class Setup:
    """What one timed run runs with: slots per layer, the adaptive gate, runtime settings (eviction
    policy, prefetch) and whether every expert is loaded before the first token (`policies.py` names
    the setups the bench compares)."""

    budget: Budget
    gate: GatePolicy
    settings: Settings
    preload: bool = False
    fallback: Store | None = None  # a low-bit store of the same model computing missed experts (HOBBIT)


@dataclass
class DecodeTiming:
    prompt_tokens: int = 0
    prefill_s: float = 0.0  # until the first token
    decode_tokens: int = 0
    decode_s: float = 0.0
    stats: Stats = field(default_factory=Stats)  # counted over the timed decode steps
    direct_io: bool | None = None  # the engine's reads bypassed the page cache (run_setup; None: not asked)
    compile_s: float | None = None  # compiling the decode step took this long (`--compile`; not in decode_s)
    #: graphs the compiler built in the run, its cache on disk missing them (`--compile`; compiled.graphs_built)
    compiled_afresh: int | None = None
    #: how one row's products were computed eagerly, weight shape → way (row_linear.py; run_setup)
    row_products: dict[str, str] | None = None

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    def add(self, other: DecodeTiming) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.prefill_s += other.prefill_s
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s
        self.stats.add(other.stats)
        if other.direct_io is not None:
            self.direct_io = other.direct_io if self.direct_io is None else self.direct_io and other.direct_io


def timed_decode(engine: Engine, prompt: list[int], tokens: int, warmup: int = 0,
                 after_step: Callable[[int], None] | None = None) -> DecodeTiming:
    """Prefill `prompt` on a fresh KV cache, decode `warmup` untimed tokens, then time `tokens` decode
    steps (greedy). `after_step(n)` runs after the n-th decode step (n ≥ 1), inside the timing. Reads
    still in flight are waited for and counted before the statistics are taken."""
    if engine.decode.pending:
        warmup += 1  # the first decode step compiles the step (`--compile`): not a decode speed
    gen = GenerationSettings(max_new_tokens=tokens + warmup + 1, temperature=0.0, repetition_penalty=1.0)
    kv = new_kv_cache(engine)
    t0 = time.perf_counter()
    first = start = t0
    before = engine.stats.copy()
    for n, _ in enumerate(generate_step(engine, prompt, kv, gen)):
        if n == 0:
            first = time.perf_counter()
        if n >= 1 and after_step is not None:
            after_step(n)
        if n == warmup:
            start, before = time.perf_counter(), engine.stats.copy()
        if n == warmup + tokens:
            break
    end = time.perf_counter()
    engine.manager.drain()
    return DecodeTiming(len(prompt), first - t0, tokens, end - start, engine.stats.delta(before))


def run_setup(store: Store, setup: Setup, prompts: list[list[int]], tokens: int,
              observe: Callable[[Engine], Callable[[Any], None]] | None = None) -> DecodeTiming:
    """One cold-cache run of a setup over the prompts (summed), with whether its engine's reads bypassed
    the page cache. `observe(engine)` gives a `LayerRecord` callback that then sees every MoE layer call
    (recording the routing)."""
    total = DecodeTiming()
    built = compiled.graphs_built()
    with Engine(store, setup.settings, setup.budget, gate=setup.gate, verify=False, fallback=setup.fallback) as eng:
        if observe is not None:
            eng.observers.callbacks.append(observe(eng))
        if setup.preload:
            for layer in store.shape.moe_layers:
                eng.manager.preload(layer, range(store.shape.num_experts))
        for prompt in prompts:
            total.add(timed_decode(eng, prompt, tokens))
        total.direct_io = eng.direct_io()
        total.compile_s = eng.decode.compile_s
        if eng.decode.enabled:
            total.compiled_afresh = compiled.graphs_built() - built
        total.row_products = row_linear.chosen()
    return total
