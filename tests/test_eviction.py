"""Eviction beyond LRU (docs/cache.md): the policies' rules, the routing model they predict from, the
same counts in the runtime and in the replay, the held-out hit rates on the real Mixtral trace, and the
errors a user meets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapmoe_cli.errors import UsageError
from adapmoe_cli.planning.replay import Routing, prepare, replay_misses
from adapmoe_cli.policies import get, parse_policies
from adapmoe_cli.profiling.routing_model import eviction_for, fit, for_store
from adapmoe_cli.runtime.eviction import FEATURES, LRFU, Learned, make_policy
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.simulate import model_spec as models
from adapmoe_cli.simulate.hardware import load_hardware
from adapmoe_cli.simulate.shipped import shipped_trace
from adapmoe_cli.simulate.simulator import drive
from adapmoe_cli.simulate.traces import read_h39s
from adapmoe_cli.synthetic import TinySpec
from tests.test_trust import run_cli

HW = load_hardware("rtx4090-pcie4")
MODEL = models.load_model("mixtral-8x7b", bits=4)
PREDICTING = ("markov", "learned")
ALL = ("lru", "lfu", "lrfu", *PREDICTING)


def _routing(calls: list[tuple[int, ...]]) -> Routing:
    """One layer, one step per call."""
    return Routing(needed=[[c] for c in calls], activations=[[len(c)] for c in calls],
                   predicted=[[None] for _ in calls], rows=[1] * len(calls), layers=[0])


def _belady_misses(routing: Routing, slots: int) -> int:
    return drive(routing, {0: slots}, HW, MODEL, "belady").misses


# -- the rules -------------------------------------------------------------------------------------
def test_markov_learns_a_cycle_that_defeats_lru():
    """Experts needed in a cycle of three with two slots: LRU always evicts the one needed next; the
    transition statistics keep it, which is exactly what Belady does."""
    calls = [(e,) for e in [0, 1, 2] * 40]
    routing = _routing(calls)
    model = fit(routing, 3, "cycle")
    assert model.transition[0][0][1] > 0.9 and model.transition[0][1][2] > 0.9  # 0 → 1 → 2 → 0
    lru = replay_misses(routing, {0: 2}, "lru", prefetch=False)[0]
    assert lru == len(calls)  # every call misses
    for name in PREDICTING:
        got = replay_misses(routing, {0: 2}, name, prefetch=False, model=model)[0]
        assert got == _belady_misses(routing, 2) < lru // 2 + 3


def test_lrfu_weighs_frequency_and_recency():
    p = LRFU()
    for e in (0, 1, 2):
        p.insert(e)
    for call in [(0,)] * 5 + [(1,), (2,)]:
        p.observe(call)
    assert p.victim() == 1  # 0 was used 5 times (decayed), 2 just now: 1 is the weakest
    assert p.victim(keep={1}) == 2 and p.victim(keep={0, 1, 2}) is None
    for _ in range(30):  # 0's uses decay away while 1 and 2 keep being needed
        p.observe((1, 2))
    assert p.victim() == 0


def test_learned_score_is_its_features_times_its_weights():
    """What the fit sees (`feature_matrix`, every expert at once) is what the runtime scores, candidate by
    candidate."""
    g = torch.Generator().manual_seed(3)
    calls = [tuple(sorted(torch.randperm(8, generator=g)[:2].tolist())) for _ in range(200)]
    model = fit(_routing(calls), 8, "random")
    assert len(model.weights) == len(FEATURES) + 1
    p = Learned(model, 0)
    for call in calls[:57]:
        p.observe(call)
    m = torch.from_numpy(p.feature_matrix())
    want = m @ torch.tensor(model.weights[:-1], dtype=torch.float64) + model.weights[-1]
    got = torch.tensor([p.score(e) for e in range(8)], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    assert all(p.next_call_probability(e) == pytest.approx(m[e, 0].item()) for e in range(8))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sets(st.integers(0, 5), min_size=1, max_size=2), min_size=2, max_size=60), st.integers(2, 5))
def test_no_policy_beats_belady_or_evicts_a_needed_expert(calls, slots):
    """On any routing: never fewer misses than Belady's optimum, every call's experts resident together
    when they fit (the manager asserts it can always load), and the cache never over its slots."""
    routing = _routing([tuple(sorted(c)) for c in calls])
    model = fit(routing, 6, "random")
    best = _belady_misses(routing, slots)
    for name in ALL:
        misses = replay_misses(routing, {0: slots}, name, prefetch=False, model=model)[0]
        assert best <= misses <= sum(len(c) for c in calls)


def test_predicting_policies_need_a_routing_model():
    with pytest.raises(UsageError, match="routing profile"):
        make_policy("markov", 0, None)
    with pytest.raises(UsageError, match="choose one of auto, lru, lfu, lrfu, markov, learned"):
        make_policy("mru")


# -- the real Mixtral trace, held out ---------------------------------------------------------------
def test_held_out_hit_rates_on_the_mixtral_trace():
    """Fitted on the first half of the recorded Mixtral-8x7B decode, measured on the second, 4 slots per
    layer (docs/cache.md): the predicting policies beat LRU and LFU and stay below Belady."""
    trace = read_h39s(shipped_trace("mixtral-8x7b-instruct-h39s"), prefill=False)
    whole = prepare(trace.trace, GatePolicy.off(), trace.steps)
    half = len(whole.rows) // 2
    fitted, held = whole.part(0, half), whole.part(half)
    model = fit(fitted, 8, "first half")
    quotas = {layer: 4 for layer in held.layers}
    rate = {}
    for name in ("lru", "lfu", *PREDICTING, "belady"):
        run = drive(held, quotas, HW, MODEL, name, routing_model=model)
        rate[name] = run.hits / run.expert_uses
    assert round(rate["lru"], 3) == 0.572 and round(rate["belady"], 3) == 0.719
    assert round(rate["markov"], 3) == 0.599
    assert rate["lru"] < rate["lfu"] < rate["markov"] < rate["learned"] < rate["belady"]


# -- the runtime, the planner, the simulator --------------------------------------------------------
TEXT = ("The json module encodes and decodes JSON. Use json.dumps to turn objects into strings and json.loads "
        "to parse them back. The os module gives access to the operating system: files, paths, processes. ") * 12
SPEC = TinySpec(num_local_experts=8, num_hidden_layers=4)


@pytest.fixture
def profiled(make_store, tmp_path) -> Path:
    """A private copy of a tiny store with a forward profile (its trace is what markov/learned fit on)."""
    from adapmoe_cli.profiling.profiler import ProfileRequest, make_profile
    from adapmoe_cli.settings import load_settings
    from adapmoe_cli.store import Store

    dst = tmp_path / "store"
    shutil.copytree(make_store(SPEC, dtype=torch.float32), dst)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    make_profile(Store.open(dst), load_settings(), ProfileRequest(text, "test", 256, 64, method="forward"))
    return dst


@pytest.mark.parametrize("policy", PREDICTING)
def test_the_runtime_counts_what_the_replay_counts(profiled, policy):
    """Decode on the real engine with a predicting policy, then replay its recorded routing through the
    simulator with the routing model the engine used: the same hits, misses and prefetch hits."""
    from adapmoe_cli.runtime.gating import GatePolicy as Gate
    from adapmoe_cli.store import Store
    from tests.test_simulate import _record_run

    store = Store.open(profiled)
    assert eviction_for(store, "auto")[0] == "markov"  # a store with a profile runs markov by default
    trace, quotas, total, _ = _record_run(profiled, 8, True, Gate.off(), tokens=20, policy=policy)
    routing = prepare(trace.trace, Gate.off(), trace.steps)
    spec = models.ModelSpec("tiny", 4, 8, 2, slot_bytes=1_000_000, dense_bytes_per_layer=100_000, head_bytes=0)
    run = drive(routing, quotas, HW, spec, policy, prefetch=True, routing_model=for_store(store))
    assert (run.hits, run.misses, run.prefetch_hits) == (total.hits, total.misses, total.prefetch_hits)
    assert total.misses > 0  # the run did evict


def test_plan_cache_replays_the_chosen_policy(profiled, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "plan-cache", str(profiled), "--budget", "12", "--policy", "learned",
                           "--no-adaptive-gate")
    assert code == 0, err
    plan = json.loads((profiled / "plan.json").read_text())
    assert plan["policy"] == "learned" and sum(x["slots"] for x in plan["layers"]) == 12


def test_bad_eviction_input_is_one_line(make_store, profiled, tmp_path, monkeypatch, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(make_store(SPEC, dtype=torch.float32), bare)
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(bare), "--policy", "markov")
    assert code != 0 and "adapmoe profile" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(profiled), "--policy", "mru")
    assert code != 0 and "choose one of auto, lru" in err and "Traceback" not in err
    # a profile of another model is refused, not fitted
    other = tmp_path / "other"
    shutil.copytree(make_store(TinySpec(num_local_experts=8, num_hidden_layers=4, hidden_size=48),
                               dtype=torch.float32), other)
    for name in ("profile.json", "profile.trace.safetensors"):
        shutil.copyfile(profiled / name, other / name)
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(other), "--policy", "learned")
    assert code != 0 and "profile" in err and "Traceback" not in err
    with pytest.raises(UsageError, match="cannot run 'naive' with eviction 'markov'"):
        get("naive:markov")
    with pytest.raises(UsageError, match="lru, lfu, lrfu, markov, learned"):
        parse_policies("adapmoe:mru")
    assert get("adapmoe:lru").eviction == "lru" and get("adapmoe").eviction == "markov"
    assert parse_policies("lru+prefetch:learned") == ["lru+prefetch:learned"]


def test_simulate_holds_out_the_end_of_the_trace(monkeypatch, capsys, tmp_path):
    out = tmp_path / "sim.json"
    code, _, err = run_cli(monkeypatch, capsys, "simulate", "mixtral-8x7b-instruct-h39s", "--bits", "4",
                           "--budget", "128", "--policies", "lru,markov", "--holdout", "0.5", "--out", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["trace"]["measured_from_step"] == 387 and data["trace"]["decode_tokens"] == 387
    p = data["policies"]
    assert p["lru"]["hit_rate"] < p["markov"]["hit_rate"] < p["belady"]["hit_rate"]
    assert any("holdout" in n for n in data["notes"])
    code, _, err = run_cli(monkeypatch, capsys, "simulate", "mixtral-8x7b-instruct-h39s", "--holdout", "1")
    assert code != 0 and "--holdout" in err and "Traceback" not in err

