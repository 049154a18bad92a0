"""`adapmoe simulate`: the simulated loader's queueing rules, exact replay of the runtime's own counted
run, LRU against a textbook LRU, Belady against an exhaustive optimum, Belady's hit rates on the real
Mixtral trace (shipped; h39s README), the ordering of limits and policies,
projection onto published models, hardware and model files, calibration, and the command end to end."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from adapmoe_cli.errors import UsageError
from adapmoe_cli.planning.replay import Routing, prepare, replay_misses
from adapmoe_cli.policies import parse_policies
from adapmoe_cli.profiling.trace import Trace
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.loader import DEMAND, PREFETCH
from adapmoe_cli.simulate import hardware
from adapmoe_cli.simulate import model_spec as models
from adapmoe_cli.simulate.hardware import Hardware
from adapmoe_cli.simulate.limits import Belady
from adapmoe_cli.simulate.shipped import shipped_trace
from adapmoe_cli.simulate.simulator import SimRequest, drive, simulate
from adapmoe_cli.simulate.timing import Clock, SimLoader
from adapmoe_cli.simulate.traces import SimTrace, from_trace, project, read_h39s
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import textbook_lru

H39S = shipped_trace("mixtral-8x7b-instruct-h39s")  # ships with the package, with its licence
# 1 GB/s, 1 ms per read of 1 MB, compute 1 GB/s: round numbers for hand-checked timings
HW = Hardware(name="test", description="", link_bandwidth=1e9, link_latency_s=0.0, memory_bandwidth=1e9)


# -- the simulated loader --------------------------------------------------------------------------
def _loader(channels: int = 1) -> tuple[SimLoader, Clock]:
    clock = Clock()
    hw = Hardware("t", "", link_bandwidth=1e9, link_latency_s=0.0, memory_bandwidth=1e9, channels=channels)
    return SimLoader(hw, 1_000_000, clock), clock  # 1 MB over 1 GB/s shared by the channels


def test_demand_goes_ahead_of_queued_prefetches_but_never_preempts():
    ld, clock = _loader()
    p1 = ld.submit(0, 1, None, PREFETCH)  # starts at once: 0–1 ms
    p2 = ld.submit(0, 2, None, PREFETCH)  # queued
    d = ld.submit(0, 3, None, DEMAND)  # jumps ahead of p2, not of p1
    assert ld.wait(d) == pytest.approx(2e-3)
    assert p1.done.is_set() and p2.started and not p2.done.is_set()  # p2 starts when d ends
    assert ld.wait(p2) == pytest.approx(1e-3)
    assert clock.now == pytest.approx(3e-3)


def test_loads_overlap_compute_and_channels_run_in_parallel():
    ld, clock = _loader()
    req = ld.submit(0, 0, None, PREFETCH)
    ld.compute(0.6e-3)
    assert ld.wait(req) == pytest.approx(0.4e-3)  # only the part not hidden behind compute
    ld2, _ = _loader(channels=2)  # same total bandwidth, two transfers at half speed each
    a, b = ld2.submit(0, 0, None, DEMAND), ld2.submit(0, 1, None, DEMAND)
    assert ld2.wait(a) == pytest.approx(2e-3) and ld2.wait(b) == pytest.approx(0.0)


def test_loads_cost_the_compute_after_the_wait_and_reads_slow_the_compute_beside_them():
    clock = Clock()
    hw = Hardware("t", "", link_bandwidth=1e9, link_latency_s=0.0, memory_bandwidth=1e9,
                  load_overhead_s=0.1e-3, interference_s=0.05e-3)
    ld = SimLoader(hw, 1_000_000, clock)
    a = ld.submit(0, 0, None, PREFETCH)  # 0–1 ms, finishing while the compute runs
    ld.compute(2e-3)
    assert clock.now == pytest.approx(2.05e-3)  # 2 ms of compute + one read beside it
    c = ld.submit(0, 2, None, PREFETCH)  # starts at 2.05 ms
    assert ld.wait(a) == 0.0 and clock.now == pytest.approx(2.15e-3)  # no stall; the first use costs 0.1 ms …
    assert ld.wait(a) == 0.0 and clock.now == pytest.approx(2.15e-3)  # … once per load
    assert ld.wait(c) == pytest.approx(1e-3)  # … and the link paused meanwhile: c ends at 3.15, not 3.05 ms
    assert clock.now == pytest.approx(3.25e-3)
    b = ld.submit(0, 1, None, DEMAND)  # 3.25–4.25 ms while the compute waits: no interference
    assert ld.wait(b) == pytest.approx(1e-3) and clock.now == pytest.approx(4.35e-3)


def test_a_transfer_after_an_idle_link_pays_the_wake_up():
    clock = Clock()
    hw = Hardware("t", "", link_bandwidth=1e9, link_latency_s=0.0, memory_bandwidth=1e9, link_wakeup_s=0.3e-3,
                  link_idle_s=1e-3)
    ld = SimLoader(hw, 1_000_000, clock)
    ld.compute(2e-3)
    assert ld.wait(ld.submit(0, 0, None, DEMAND)) == pytest.approx(1.3e-3)  # idle since 0: wakes up first
    assert ld.wait(ld.submit(0, 1, None, DEMAND)) == pytest.approx(1e-3)  # back to back
    ld.compute(0.5e-3)
    assert ld.wait(ld.submit(0, 2, None, DEMAND)) == pytest.approx(1e-3)  # idle 0.5 ms: below the threshold
    ld.compute(1e-3)
    assert ld.wait(ld.submit(0, 3, None, DEMAND)) == pytest.approx(1.3e-3)


def test_cancel_and_demote():
    ld, _ = _loader()
    ld.submit(0, 0, None, DEMAND)  # 0–1 ms
    queued = ld.submit(0, 1, None, PREFETCH)
    late = ld.submit(0, 2, None, PREFETCH)
    dropped = ld.submit(0, 3, None, PREFETCH)
    ld.demote(queued)  # behind `late` now
    assert ld.cancel(dropped) is True and dropped.cancelled  # not started: nothing is read
    assert ld.wait(late) == pytest.approx(2e-3)  # 1–2 ms
    assert ld.wait(queued) == pytest.approx(1e-3)  # 2–3 ms, then nothing (the cancelled one never runs)
    assert ld.cancel(queued) is False  # finished
    assert ld.transfers == 3


# -- exact replay of the runtime's own run ---------------------------------------------------------
def _record_run(store_path: Path, slots: int, prefetch: bool, gate: GatePolicy, tokens: int = 20, policy: str = "lru",
                precision: float = 0.0):
    from adapmoe_cli.profiling.record import RoutingRecorder
    from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
    from adapmoe_cli.settings import GenerationSettings
    from adapmoe_cli.store import Store
    from tests.helpers import runtime_engine

    store = Store.open(store_path)
    overrides = {"cache.budget": slots, "prefetch": prefetch, "cache.policy": policy, "prefetch_precision": precision}
    with runtime_engine(store, overrides, gate=gate) as eng:
        rec = RoutingRecorder(eng)
        eng.observers.callbacks.append(rec)
        gen = GenerationSettings(max_new_tokens=tokens + 1, temperature=0.0, repetition_penalty=1.0)
        for n, _ in enumerate(generate_step(eng, [1, 5, 7, 9, 11, 40], new_kv_cache(eng), gen)):
            if n == 0:
                after_prefill = eng.stats.copy()
            if n + 1 == tokens:
                break
        total, decode, quotas = eng.stats.copy(), eng.stats.delta(after_prefill), dict(eng.budget.quotas)
    tr, steps = rec.trace()
    assert steps[:6] == [0] * 6 and steps[6:] == list(range(1, tokens))  # the prompt pass, then one row per step
    st = from_trace(tr, store.shape.num_experts, "recorded", steps=steps, prompt_steps=frozenset({0}))
    return st, quotas, total, decode


@pytest.mark.parametrize("slots,prefetch,gated,precision", [(8, False, False, 0.0), (8, True, False, 0.0),
                                                            (12, True, False, 0.5), (16, True, True, 0.0),
                                                            (8, True, True, 0.5)],
                         ids=["lru", "lru+prefetch", "12-slots-admitted", "gated", "gated-8-slots-admitted"])
def test_replaying_the_runtimes_run_reproduces_its_counts(make_store, slots, prefetch, gated, precision):
    """The replay (planner, simulator) counts what the runtime counted, prefetch admission included (0.5:
    on random routing it reads some predictions and skips others)."""
    spec = TinySpec(num_local_experts=8, num_hidden_layers=4)
    gate = GatePolicy({layer: 0.3 for layer in range(4)}, rule="global", scale=0.3) if gated else GatePolicy.off()
    st, quotas, total, decode = _record_run(make_store(spec, dtype=torch.float32), slots, prefetch, gate,
                                            precision=precision)
    routing = prepare(st.trace, gate, st.steps)
    model = models.ModelSpec("tiny", 4, 8, 2, slot_bytes=1_000_000, dense_bytes_per_layer=100_000, head_bytes=0)
    for untimed, want in ((frozenset(), total), (frozenset({0}), decode)):
        run = drive(routing, quotas, HW, model, "lru", prefetch=prefetch, untimed=untimed, prefetch_precision=precision)
        got = (run.hits, run.misses, run.prefetch_hits, run.prefetches_issued, run.wasted_prefetches,
               run.expert_activations)
        assert got == (want.hits, want.misses, want.prefetch_hits, want.prefetches_issued, want.wasted_prefetches,
                       want.expert_activations)
    if prefetch:
        assert total.prefetch_hits > 0


# -- Belady on the real Mixtral trace --------------------------------------------------------------
def test_the_mixtral_trace_ships_with_the_package():
    """The trace the next test reads is part of the package (with its licence), so that test never skips."""
    assert H39S is not None and H39S.is_file() and H39S.stat().st_size > 50_000
    assert (H39S.parent / "LICENSE").is_file() and (H39S.parent / "README.md").is_file()


def test_belady_hit_rates_on_the_mixtral_trace_match_its_readme():
    st = read_h39s(H39S, prefill=False)  # the README's numbers: decode tokens from a cold cache
    assert (st.num_layers, st.decode_steps, st.num_experts) == (32, 773, 8) and not st.has_weights
    routing = prepare(st.trace, GatePolicy.off(), st.steps)
    model = models.load_model("mixtral-8x7b", bits=4)
    for slots, want in ((3, 0.573), (4, 0.720), (5, 0.822), (6, 0.897)):
        run = drive(routing, {layer: slots for layer in range(32)}, HW, model, "belady")
        assert round(run.hits / run.expert_uses, 3) == want
        lru = drive(routing, {layer: slots for layer in range(32)}, HW, model, "lru")
        assert run.misses <= lru.misses


def test_belady_evicts_the_farthest_next_use_and_never_a_kept_one():
    p = Belady([(0, 1), (2,), (1,), (0,)])
    for e in (0, 1, 2):
        p.insert(e)
    p.now = 1
    assert p.victim() == 0  # next uses: 0 → 3, 1 → 2, 2 → 1
    assert p.victim(keep={0}) == 1
    p.now = 4
    assert p.victim() == 0  # nothing ahead: the oldest goes first


def _optimal_misses(calls: list[tuple[int, ...]], slots: int) -> int:
    """The fewest demand loads any eviction choice achieves (exhaustive over cache states): each call's
    experts must be resident together; what else stays is free to choose."""
    best = {frozenset(): 0}
    for call in calls:
        need = frozenset(call)
        nxt: dict[frozenset, int] = {}
        for state, cost in best.items():
            others = sorted(state - need)
            keep = min(slots, len(state | need)) - len(need)
            for rest in itertools.combinations(others, keep):
                new = need | frozenset(rest)
                c = cost + len(need - state)
                if c < nxt.get(new, 1 << 30):
                    nxt[new] = c
        best = nxt
    return min(best.values())


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_exactly_the_optimum_and_bounds_every_policy(seed):
    """Belady's bound both ways on small random routings: no eviction choice needs fewer loads than it
    (an exhaustive search), and none of the runtime's policies needs fewer."""
    g = random.Random(seed)
    experts, slots, steps = 5, g.choice([2, 3]), 14
    calls = [tuple(sorted(g.sample(range(experts), g.choice([1, 2])))) for _ in range(steps)]
    routing = Routing([[c] for c in calls], [[len(c)] for c in calls], [[None] for _ in calls], [1] * steps, [0])
    model = models.ModelSpec("t", 1, experts, 2, slot_bytes=1_000_000, dense_bytes_per_layer=0, head_bytes=0)
    runs = {p: drive(routing, {0: slots}, HW, model, p) for p in ("belady", "lru", "lfu")}
    optimum = _optimal_misses(calls, slots)
    assert runs["belady"].misses == optimum
    assert all(r.misses >= optimum for r in runs.values())
    assert runs["belady"].hits + runs["belady"].misses == sum(len(c) for c in calls)


def test_replay_of_lru_equals_a_textbook_lru():
    """The replay (the runtime's manager, cache and LRU) counts what a textbook LRU counts on the same
    routing, layer by layer, and Belady never loads more."""
    st = _synthetic()
    routing = prepare(st.trace, GatePolicy.off(), st.steps)
    misses = replay_misses(routing, {layer: 3 for layer in routing.layers}, "lru", prefetch=False)
    model = models.ModelSpec("syn", 6, 8, 2, slot_bytes=1_000_000, dense_bytes_per_layer=0, head_bytes=0)
    belady = drive(routing, {layer: 3 for layer in routing.layers}, HW, model, "belady")
    for i, _ in enumerate(routing.layers):
        hits, want, _ = textbook_lru([step[i] for step in routing.needed], 3)
        assert misses[i] == want, i
    assert belady.misses < sum(misses)  # the limit is below LRU on a routing with reuse, not equal to it


# -- limits and policies on a trace with predictions -----------------------------------------------
def _synthetic(tokens: int = 240, layers: int = 6, experts: int = 8, seed: int = 0) -> SimTrace:
    """Routing with temporal locality and skewed popularity; predictions right 80% of the time."""
    g = torch.Generator().manual_seed(seed)
    tr = Trace(torch.zeros(tokens, layers, 2, dtype=torch.int16), torch.zeros(tokens, layers, 2),
               torch.full((tokens, layers, 2), -1, dtype=torch.int16), torch.zeros(tokens, layers, 2),
               torch.zeros(tokens, dtype=torch.int32), list(range(layers)))
    pop = torch.softmax(torch.randn(layers, experts, generator=g) * 1.5, -1)
    for t in range(tokens):
        for i in range(layers):
            if t and torch.rand(1, generator=g).item() < 0.5:
                ids = tr.ids[t - 1, i].long()
            else:
                ids = torch.multinomial(pop[i], 2, generator=g)
            w1 = 0.5 + 0.45 * torch.rand(1, generator=g).item()
            tr.ids[t, i], tr.weights[t, i] = ids.to(torch.int16), torch.tensor([w1, 1 - w1])
            if i:
                right = torch.rand(1, generator=g).item() < 0.8
                tr.pred_ids[t, i] = ids if right else torch.multinomial(pop[i], 2, generator=g)
                tr.pred_weights[t, i] = tr.weights[t, i]
    return from_trace(tr, experts, "synthetic")


def test_limits_and_plan_are_ordered():
    st = _synthetic()
    model = models.ModelSpec("syn", 6, 8, 2, slot_bytes=4_000_000, dense_bytes_per_layer=1_000_000, head_bytes=0)
    names = parse_policies("naive,lru,lru+prefetch,lru:prefetch-admitted,lfu,planned,adapmoe,resident", limits=True)
    assert names[-2:] == ["belady", "oracle"]
    gate = GatePolicy({i: 0.3 for i in range(6)}, rule="global", scale=0.3)
    r = simulate(st, HW, model, SimRequest(18, names, gate=gate, sweep=True))
    p = r["policies"]
    assert p["belady"]["misses"] <= p["lru"]["misses"]
    assert p["oracle"]["stall_s_per_token"] <= p["lru+prefetch"]["stall_s_per_token"]
    # the DP minimises these very counts (planned prefetches as lru:prefetch-admitted does)
    assert p["planned"]["misses"] <= p["lru:prefetch-admitted"]["misses"]
    assert p["adapmoe"]["experts_per_token"] < p["lru"]["experts_per_token"] == 2.0
    assert p["resident"]["misses"] == 0 and p["resident"]["stall_s_per_token"] == 0.0
    assert p["naive"]["hits"] == 0
    ungated = [x["decode_tokens_per_s"] for n, x in p.items() if n != "adapmoe"]  # the gate computes fewer experts
    assert max(ungated) == p["resident"]["decode_tokens_per_s"]
    assert 0 < r["limits"]["io_floor_s_per_token"] <= p["belady"]["decode_s_per_token"]
    for x in p.values():
        assert set(x) >= {"hits", "misses", "prefetch_hits", "stall_s_per_token", "decode_tokens_per_s"}
    assert [pt["budget_slots"] for pt in r["sweep"]] == [6, 12, 24, 36, 48]
    full = r["sweep"][-1]["stall_s_per_token"]
    assert full["lru"] == 0.0 or full["lru"] < p["lru"]["stall_s_per_token"]



def test_a_sweep_runs_each_budget_once_and_fit_runs_lru_at_half_once(monkeypatch):
    """The sweep's point at the request's budget is the run of that budget (runs are deterministic), not a
    second run; `fit` runs resident and Belady at half the experts and LRU only in the sweep. Counted."""
    from adapmoe_cli import fit as fitting
    from adapmoe_cli.simulate import simulator

    runs: list[tuple[str, int]] = []
    real = simulator._run_policy
    monkeypatch.setattr(simulator, "_run_policy", lambda name, planner, total, hw, model: (
        runs.append((name, total)), real(name, planner, total, hw, model))[1])
    st = _synthetic()
    model = models.ModelSpec("syn", 6, 8, 2, slot_bytes=4_000_000, dense_bytes_per_layer=1_000_000, head_bytes=0)
    r = simulate(st, HW, model, SimRequest(24, ["lru", "resident"], sweep=True))
    assert runs == [("lru", 24), ("resident", 24), ("lru", 6), ("lru", 12), ("lru", 36), ("lru", 48)]
    assert r["sweep"][2]["policies"]["lru"] == r["policies"]["lru"]["decode_tokens_per_s"]
    fresh = simulate(st, HW, model, SimRequest(12, ["lru"]))["policies"]["lru"]  # the same as the sweep's point
    assert r["sweep"][1]["policies"]["lru"] == fresh["decode_tokens_per_s"]

    runs.clear()
    seen: list[str] = []
    spec = models.ModelSpec("uniform", 4, 16, 4, slot_bytes=4_000_000, dense_bytes_per_layer=1_000_000, head_bytes=0)
    out = fitting.fit(spec, HW, available=1 << 50, progress=seen.append)  # everything fits: `auto` is 100 %
    totals = [6, 16, 32, 48, 64]  # 10 %, 25 %, 50 %, 75 % and 100 % of 64 experts
    assert runs == [("resident", 32), ("belady", 32), ("lru", 32)] + [("lru", t) for t in totals if t != 32]
    assert [row["budget_slots"] for row in out["budgets"]] == totals and seen[:2] == ["resident", "belady"]

# -- projection, hardware and model files ----------------------------------------------------------
def test_projection_tiles_layers_and_refuses_more_experts():
    st = _synthetic(tokens=10, layers=4)
    big = models.load_model("mixtral-8x22b", bits=4)
    pr = project(st, big.num_layers, big.num_experts, big.name)
    assert pr.num_layers == 56 and torch.equal(pr.trace.ids[:, 4], st.trace.ids[:, 0])
    assert any("tiled" in n for n in pr.notes)
    qwen = models.load_model("qwen3-30b-a3b")
    with pytest.raises(UsageError, match="cannot be projected honestly"):
        project(st, qwen.num_layers, qwen.num_experts, qwen.name)


def test_shipped_files_load_with_sources():
    assert set(hardware.known()) >= {"this-machine", "laptop-nvme", "rtx4090-pcie4", "a6000-pcie4", "apple-m2-max"}
    for name in hardware.known():
        hw = hardware.load_hardware(name)
        assert hw.sources and hw.link_bandwidth > 0
    assert hardware.load_hardware("this-machine").calibrated is False  # the template, until calibrated
    with pytest.raises(UsageError, match="rtx4090-pcie4"):
        hardware.load_hardware("cray-1")
    m16, m4 = models.load_model("mixtral-8x7b"), models.load_model("mixtral-8x7b", bits=4)
    assert m16.slot_bytes == 3 * 4096 * 14336 * 2
    assert m4.slot_bytes == 3 * 4096 * 14336 // 2 + 3 * 4096 * 14336 // 64 * 4  # plus fp16 scale+zero per 64
    q = models.load_model("qwen3-30b-a3b")
    assert (q.num_layers, q.num_experts, q.top_k, q.slot_bytes) == (48, 128, 8, 3 * 2048 * 768 * 2)
    with pytest.raises(UsageError, match="mixtral-8x7b"):
        models.load_model("gpt-5")


DEEPSEEK_V3_CONFIG = {  # the published config.json's sizes (deepseek-ai/DeepSeek-V3)
    "num_hidden_layers": 61, "first_k_dense_replace": 3, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280,
}


def test_every_family_flagship_ships_and_agrees_with_its_config():
    """A shipped model config per family; DeepSeek-V3's (MoE layers less the dense ones, MLA attention,
    a shared expert, dense layers) equals what `fit` derives from the published config.json."""
    names = set(models.known())
    assert names >= {"mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "qwen2-57b-a14b", "olmoe-1b-7b",
                     "deepseek-v2", "deepseek-v3", "glm-4.5-air", "phi-3.5-moe", "gpt-oss-120b"}
    for name in names:
        m = models.load_model(name)
        assert m.sources and m.slot_bytes > 0 and m.dense_bytes_per_layer > 0
    v3 = models.load_model("deepseek-v3")
    assert (v3.num_layers, v3.num_experts, v3.top_k) == (58, 256, 8)
    assert models.mla_attention_params(DEEPSEEK_V3_CONFIG) == 187_107_328
    derived = models.from_hf_config({**DEEPSEEK_V3_CONFIG, "dtype": "bfloat16"}, "v3", bits=8)
    assert derived.num_layers == 58
    assert abs(derived.dense_bytes_per_layer / 2 - v3.dense_bytes_per_layer) <= 1  # bf16 dense vs the file's 8 bits
    params = 3 * 7168 * 2048  # gate, up and down of one routed expert
    assert v3.slot_bytes == params + params // 16384 * 4  # FP8 with one scale per 128×128 block
    assert derived.slot_bytes == params + params // 64 * 4  # 8 bits projected with the default groups of 64


def test_calibration_writes_this_machine_under_home(make_store):
    from adapmoe_cli.settings import load_settings
    from adapmoe_cli.simulate.calibrate import calibrate
    from adapmoe_cli.store import Store

    store = Store.open(make_store(TinySpec(), dtype=torch.float32))
    hw, path = calibrate(store, load_settings(), max_read_bytes=4 << 20, tokens=2)
    assert Path(path) == hardware.calibrated_path() and Path(path).exists()
    loaded = hardware.load_hardware("this-machine")
    assert loaded.calibrated is True and loaded.link_bandwidth > 0 and loaded.memory_bandwidth > 0
    assert loaded.measured["expert_compute_s"] > 0 and loaded.measured["decode_token_s_all_resident"] > 0
    # on demand, every token loads its top-k experts in every MoE layer (counted by the engine)
    assert loaded.measured["loads_per_token_on_demand"] == 2 * TinySpec().num_hidden_layers
    assert loaded.measured["load_s"] > 0 and loaded.load_overhead_s >= 0 and loaded.interference_s >= 0


# -- the command -----------------------------------------------------------------------------------
def _h39s_file(tmp_path: Path, steps: int = 12) -> Path:
    """A small file in the h39s format (32 prefill lines of all 8 experts, then `steps` decode steps)."""
    g = torch.Generator().manual_seed(1)
    lines = ["0,1,2,3,4,5,6,7"] * 32
    for _ in range(steps * 32):
        lines.append(",".join(str(e) for e in sorted(torch.randperm(8, generator=g)[:2].tolist())))
    path = tmp_path / "active_experts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulate_command_writes_json_and_chart(tmp_path, monkeypatch, capsys):
    from tests.test_cli_store import run_cli

    trace = _h39s_file(tmp_path)
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    code, stdout, err = run_cli(monkeypatch, capsys, "simulate", str(trace), "--trace-format", "h39s",
                                "--model-config", "mixtral-8x7b", "--bits", "4", "--hardware", "rtx4090-pcie4",
                                "--budget", "64", "--out", str(out), "--plot", str(png), "--sweep",
                                "--policies", "naive,lru,lru+prefetch,planned,adapmoe,resident")
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["budget_slots"] == 64 and data["hardware"]["name"] == "rtx4090-pcie4"
    assert data["model"]["num_layers"] == 32 and data["model"]["bits"] == 4
    assert {"belady", "oracle", "lru", "adapmoe"} <= set(data["policies"])
    assert isinstance(data["policies"]["lru"]["decode_tokens_per_s"], float)
    assert any("no routing weights" in n for n in data["notes"]) and any("prefetch nothing" in n for n in data["notes"])
    assert len(data["sweep"]) == 5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "adapmoe simulate" in stdout and "I/O floor" in stdout


@pytest.mark.parametrize("args,match", [
    (["--hardware", "cray-1"], "unknown hardware 'cray-1': choose one of a6000-pcie4"),
    (["--policies", "lru,magic"], "unknown policy magic; known: naive"),
    (["--model-config", "qwen3-30b-a3b"], "cannot be projected honestly"),
    (["--budget", "8"], "below one per MoE layer"),
    (["--holdout", "0.9999", "--policies", "markov"], "--holdout 0.9999 leaves 1 of the trace's"),
])
def test_simulate_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, match):
    from tests.test_cli_store import run_cli

    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(_h39s_file(tmp_path, steps=2)), "--trace-format",
                           "h39s", *args)
    assert code != 0 and match in err and len(err.strip().splitlines()) == 1, err


H39S_PREFILL = ",".join(map(str, range(8)))


@pytest.mark.parametrize("content,needle", [
    (b"\x89PNG\x00\xff", "is not an h39s trace: not UTF-8 text"),
    ("-1,3\n", "line 1: '-1,3' is not comma-separated expert ids"),
    ("3,4\n\n3,+4\n", "line 3: '3,+4' is not comma-separated expert ids"),
    ("3,40000\n", "line 1: expert 40000 is above 4095"),
    ("3,3\n", "line 1 names an expert twice"),
    ((H39S_PREFILL + "\n") * 32, "names 8 experts, more than mixtral-8x7b's top-k (2): a prefill pass alone"),
], ids=["binary", "negative", "plus-sign", "huge-id", "twice", "prefill-only"])
def test_an_h39s_trace_that_is_wrong_is_said_with_its_line(tmp_path, content, needle):
    """Each was an unexpected error (UnicodeDecodeError, an int16 overflow) or accepted: a negative id read as
    "no expert ids", `+4` and `1_0` as numbers, a prefill pass alone as one decode token of 8 experts."""
    from adapmoe_cli.simulate.inputs import resolve

    path = tmp_path / "trace.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError, match=re.escape(needle)):
        resolve(str(path), "h39s")
    with pytest.raises(UsageError, match=re.escape("for an h39s text file add --trace-format h39s")):
        resolve(str(path))  # (it was "neither an adapmoe store nor a checkpoint folder")


def test_an_h39s_trace_too_large_is_refused_unread(tmp_path):
    """A 200 MB trace was parsed for minutes (~7 GB) before anything was checked."""
    from adapmoe_cli.simulate.traces import MAX_H39S_BYTES, h39s_calls

    path = tmp_path / "big.txt"
    with path.open("wb") as f:
        f.truncate(MAX_H39S_BYTES + 1)  # sparse: nothing is written, and nothing may be read
    with pytest.raises(UsageError, match="at most 16 MiB"):
        h39s_calls(path)


def test_a_result_file_that_is_an_input_or_in_no_folder_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """`--out TRACE` replaced the trace with the results (exit 0); an --out in a missing folder was refused only
    after the whole simulation."""
    from adapmoe_cli.simulate import simulator
    from tests.test_trust import one_line, run_cli

    def never(*args, **kwargs):
        raise AssertionError("simulated although --out was refused")

    monkeypatch.setattr(simulator, "simulate", never)
    trace = _h39s_file(tmp_path, steps=2)
    before = trace.read_bytes()
    model = tmp_path / "model.yaml"
    shutil.copy(models.shipped_dir() / "mixtral-8x7b.yaml", model)
    for out, needle in [(trace, "is a file this command reads"), (model, "is a file this command reads"),
                        (tmp_path / "nowhere" / "r.json", "does not exist"), (tmp_path, "is a folder")]:
        code, _, err = run_cli(monkeypatch, capsys, "simulate", str(trace), "--trace-format", "h39s", "--model-config",
                               str(model), "--out", str(out))
        assert code != 0 and needle in one_line(err)
    code, _, err = run_cli(monkeypatch, capsys, "simulate", str(trace), "--trace-format", "h39s",
                           "--plot", str(tmp_path / "nowhere" / "c.png"))
    assert code != 0 and "does not exist" in one_line(err)
    assert trace.read_bytes() == before


@pytest.mark.parametrize("change,needle", [
    ({"hidden_size": True}, "hidden_size must be an integer from 1 to 1,048,576, got True"),
    ({"hidden_size": 4096.7}, "hidden_size must be an integer"),
    ({"hidden_size": "1e30"}, "YAML reads this as text"),
    ({"num_key_value_heads": -8}, "num_key_value_heads must be an integer from 1"),
    ({"group_size": -64, "bits": 4}, "group_size must be an integer from 1"),
    ({"dense_bits": 1e300}, "dense_bits must be a number from 1 to 32"),
    ({"name": None}, "name must be a string"),
    ({"sources": 5}, "sources must be a list"),
], ids=["bool", "fraction", "text", "negative-kv", "negative-group", "huge-bits", "no-name", "sources"])
def test_a_model_file_with_an_absurd_value_names_the_key(change, needle):
    """These ran (a hidden size of 10^29, negative heads) or were truncated (4096.7 → 4096, `true` → 1)."""
    d = yaml.safe_load((models.shipped_dir() / "mixtral-8x7b.yaml").read_text())
    with pytest.raises(UsageError, match=re.escape(needle)):
        models.from_config({**d, **change}, path="m.yaml")


@pytest.mark.parametrize("line,needle", [
    ("channels: 2.7", "channels must be an integer, got 2.7"),
    ("channels: 65", "channels must be between 1 and 64"),
    ("link_latency_us: 1.0e+15", "must be from 0 to 1,000,000 us"),
    ("link_wakeup_us: 1.0e+300", "must be from 0 to 1,000,000 us"),
    ("memory_GBps: 1.0e-300", "link_GBps and memory_GBps must be from 0.001 to 10000 GB/s"),
], ids=["fraction", "channels", "latency", "wake-up", "bandwidth"])
def test_a_hardware_file_with_an_absurd_value_names_it(tmp_path, line, needle):
    """These ran and gave ~10^-300 tok/s, or took minutes (65,536 channels), or were truncated (2.7 → 2)."""
    base = "name: x\nlink_GBps: 1\nmemory_GBps: 10\n"
    path = tmp_path / "hw.yaml"
    path.write_text(base + line + "\n")
    with pytest.raises(UsageError, match=re.escape(needle)) as e:
        hardware.load_hardware(str(path))
    assert str(e.value).startswith(str(path))


def test_yaml_aliases_are_refused_before_they_expand():
    """A kilobyte of nested aliases expanded into gigabytes: 120 s and more for a hardware file's `measured`."""
    from adapmoe_cli.settings import parse_yaml

    bomb = "a: &a [" + ",".join(["lol"] * 9) + "]\n"
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        bomb += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    with pytest.raises(UsageError, match=re.escape("x.yaml uses a YAML alias (*name)")):
        parse_yaml((bomb + "measured: {x: *h}\n").encode(), "x.yaml")
    assert parse_yaml(b"a: '*not an alias'\nb: 2 * 3\n", "x") == {"a": "*not an alias", "b": "2 * 3"}


def test_simulate_on_a_store_uses_its_profile(make_store, tmp_path, monkeypatch, capsys):
    """The trace's own model: bytes from the store, the trace from its profile (written here directly)."""
    from adapmoe_cli.profiling.profile_file import model_identity, write_profile
    from adapmoe_cli.store import Store
    from tests.test_cli_store import run_cli

    store_dir = tmp_path / "store"
    shutil.copytree(make_store(TinySpec(num_hidden_layers=6, num_local_experts=8), dtype=torch.float32), store_dir)
    store = Store.open(store_dir)
    st = _synthetic(tokens=40)
    layers = [{"layer": la, "sensitivity": 1.0, "predicted_drop_loss": 0.0, "mean_second_weight_sq": 0.0}
              for la in store.shape.moe_layers]  # a profile's reader checks its layers (issue #19)
    write_profile(store_dir / "profile.json", {"model": model_identity(store), "method": "forward",
                                               "layers": layers}, st.trace)
    code, stdout, err = run_cli(monkeypatch, capsys, "simulate", str(store_dir), "--hardware", "laptop-nvme",
                                "--budget", "18", "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["model"]["slot_bytes"] == store.slot_bytes and data["trace"]["has_predictions"]
    assert data["policies"]["lru+prefetch"]["prefetch_hits"] > 0


def test_calibrate_from_the_command_without_a_profile(make_store, monkeypatch, capsys):
    from tests.test_cli_store import run_cli

    store = make_store(TinySpec(), dtype=torch.float32)
    code, stdout, err = run_cli(monkeypatch, capsys, "simulate", str(store), "--calibrate")
    assert code == 0, err
    assert hardware.calibrated_path().exists() and "nothing to simulate" in stdout
