"""profile, plan-cache, eval and the gate rules on tiny synthetic models: the estimates equal an
independent computation on transformers' own model, the DP equals brute force, plans round-trip into
the runtime, and bad input is refused with a message."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MixtralForCausalLM

from adapmoe_cli.errors import ProfileError, UsageError
from adapmoe_cli.perplexity import evaluate, read_text_tokens
from adapmoe_cli.planning.allocate import allocate, total_cost
from adapmoe_cli.planning.plan_file import read_plan
from adapmoe_cli.planning.planner import PlanRequest, make_plan
from adapmoe_cli.planning.resolve import open_engine, resolve
from adapmoe_cli.profiling.profile_file import read_profile
from adapmoe_cli.profiling.profiler import ProfileRequest, make_profile
from adapmoe_cli.settings import load_settings
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec
from adapmoe_cli.units import parse_fraction
from tests.helpers import runtime_engine

SPEC = TinySpec(num_hidden_layers=3, num_local_experts=6, hidden_size=48, intermediate_size=64,
                num_attention_heads=4, num_key_value_heads=2)
TEXT = ("The json module encodes and decodes JSON. Use json.dumps to turn objects into strings and json.loads "
        "to parse them back. The os module gives access to the operating system: files, paths, processes. ") * 12


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture
def store(make_store, tmp_path) -> Store:
    """A private copy (profiles and plans are written into the store)."""
    dst = tmp_path / "store"
    shutil.copytree(make_store(SPEC, dtype=torch.float32), dst)
    return Store.open(dst)


def _profile(store: Store, text: Path, method: str = "gradient", tokens: int = 192, validate: bool = True) -> dict:
    req = ProfileRequest(text, "test text", tokens, 64, method=method, validate_text=text if validate else None,
                         validate_label="same")
    return read_profile(make_profile(store, load_settings(), req), store).data


def test_gradient_sensitivity_equals_transformers_autograd(store, text_file, make_checkpoint):
    data = _profile(store, text_file)
    assert data["method"] == "gradient" and data["format_version"] == 1
    # independent: transformers' model, hooks on each layer's MoE output, the same summed loss per window
    ref = MixtralForCausalLM.from_pretrained(make_checkpoint(SPEC, dtype=torch.float32), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(store.path)
    ids = tok(TEXT)["input_ids"][:192]
    sums = torch.zeros(SPEC.num_hidden_layers, dtype=torch.float64)
    outs = {}
    def keep(i):
        def hook(module, args, out):
            out.retain_grad()
            outs[i] = out
        return hook

    for i, layer in enumerate(ref.model.layers):
        layer.mlp.register_forward_hook(keep(i))
    ref.model.embed_tokens.register_forward_hook(lambda m, a, o: o.requires_grad_(True))
    for start in range(0, len(ids), 64):
        chunk = torch.tensor([ids[start:start + 64]])
        logits = ref(chunk).logits[0]
        torch.nn.functional.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum").backward()
        for i in range(SPEC.num_hidden_layers):
            sums[i] += (outs[i].grad.double() ** 2).sum()
    expected = (sums / len(ids)).tolist()
    got = [x["sensitivity"] for x in data["layers"]]
    assert got == pytest.approx(expected, rel=1e-4)
    # the trace: every token and layer routed, predictions for layers ≥ 1
    trace = read_profile(store.path / "profile.json").trace()
    assert trace.ids.shape == (192, 3, 2) and int(trace.ids.min()) >= 0
    assert int(trace.pred_ids[:, 0].max()) == -1 and int(trace.pred_ids[:, 1:].min()) >= 0
    assert torch.allclose(trace.weights.sum(-1), torch.ones(192, 3))
    layer = data["layers"][1]
    assert 0 <= layer["prediction_accuracy"] <= 1
    assert sum(layer["activation_frequency"]) == pytest.approx(1.0)
    assert layer["single_expert_ratio"]["0.5"] == pytest.approx(1.0)
    assert set(data["validation"]["spearman"]) == {"predicted", "second_order", "first_order"}
    # beside it, each expert's mean output and spread (on windows spread over the text), read back checked
    stats = read_profile(store.path / "profile.json", store).expert_stats()
    assert set(stats.mean) == set(range(SPEC.num_hidden_layers))
    assert stats.mean[0].shape == (SPEC.num_local_experts, SPEC.hidden_size) and stats.mean[0].abs().sum() > 0
    assert stats.spread[1].mean().item() == pytest.approx(1.0)


def test_forward_method_reproduces_measured_drop(store, text_file):
    data = _profile(store, text_file, method="forward")
    assert data["method"] == "forward"
    measured = data["validation"]["measured_drop_loss"]  # same text, same windows
    predicted = [x["predicted_drop_loss"] for x in data["layers"]]
    assert predicted == pytest.approx(measured, abs=1e-9)


def test_profile_bad_input(store, text_file, tmp_path):
    good = _profile(store, text_file, tokens=128, validate=False)
    before = (store.path / "profile.json").read_text()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UsageError, match="is empty"):
        make_profile(store, load_settings(), ProfileRequest(empty, "empty", 100, 64))
    with pytest.raises(UsageError, match="only .* tokens"):
        make_profile(store, load_settings(), ProfileRequest(text_file, "short", 10**6, 64))
    assert (store.path / "profile.json").read_text() == before  # nothing overwritten
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(ProfileError, match="upgrade"):
        read_profile(newer)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**good, "model": {**good["model"], "fingerprint": "x"}}))
    with pytest.raises(ProfileError, match="another model"):
        read_profile(other, store)


@pytest.mark.parametrize("seed", range(25))
def test_dp_allocation_equals_brute_force(seed):
    rng = random.Random(seed)
    L, E = rng.randint(1, 4), rng.randint(1, 5)
    curves = [sorted((rng.random() for _ in range(E)), reverse=rng.random() < 0.7) for _ in range(L)]
    budget = rng.randint(L, L * E)
    best = min(
        (total_cost(curves, s), s) for s in itertools.product(range(1, E + 1), repeat=L) if sum(s) == budget
    )
    got = allocate(curves, budget)
    assert sum(got) == budget and all(1 <= s <= E for s in got)
    assert total_cost(curves, got) == pytest.approx(best[0])


def test_plan_cache_and_runtime_use_it(store, text_file):
    _profile(store, text_file, validate=False)
    settings = load_settings()
    slots = 9
    req = PlanRequest(budget_slots=slots, gate_mode="scale", rule="paper", scale=0.05)
    path, data = make_plan(store, settings, req)
    plan = read_plan(path, store)
    assert sum(plan.quotas.values()) == 9 and all(1 <= q <= 6 for q in plan.quotas.values())
    assert data["total_expected_cost"] <= data["even_split_expected_cost"] + 1e-12
    for x in data["layers"]:
        assert len(x["cost_curve"]) == 6 and x["expected_cost"] == x["cost_curve"][x["slots"] - 1]
        assert x["threshold"] == pytest.approx(min((0.05 / next(
            p["sensitivity"] for p in read_profile(store.path / "profile.json").layers if p["layer"] == x["layer"]
        )) ** 0.5, 0.5 + 1e-6))
    assert set(plan.public()) == {"budget_slots", "gate_scale", "layers", "total_expected_cost"}
    nine = load_settings(overrides={"cache.budget": 9})
    choice = resolve(store, nine)  # the store's plan is used by default, for the budget it was made for ...
    assert choice.budget.quotas == plan.quotas and choice.gate.thresholds == plan.gate.thresholds
    choice = resolve(store, load_settings(overrides={"cache.budget": 9, "gate.adaptive": False}))
    assert choice.gate.thresholds == {}
    other = resolve(store, load_settings(overrides={"cache.budget": 6}))  # ... and re-solved for another
    curves = [x["cost_curve"] for x in data["layers"]]
    assert other.plan is not None and other.budget.total == 6 and not other.notes
    assert list(other.budget.quotas.values()) == allocate(curves, 6) and other.gate == plan.gate
    assert "re-solved for 6 slots" in other.budget.source
    full = resolve(store, load_settings())  # auto: every expert of this tiny model fits in memory
    assert full.budget.total == 18 and set(full.budget.quotas.values()) == {6}
    with pytest.raises(UsageError, match="below one per MoE layer"):
        resolve(store, load_settings(overrides={"cache.budget": 2}))
    capped = resolve(store, load_settings(overrides={"cache.budget": "1GiB"}))  # more than the model: capped
    assert capped.budget.total == 18 and "capped at the model's 18 experts" in capped.budget.source
    for bad in ("0%", "-1%", "80%"):
        with pytest.raises(UsageError, match=rf"quality budget '{bad}' must be above 0% and at most 50%"):
            parse_fraction(bad)
    with pytest.raises(UsageError, match="cannot read quality budget 'lots': use a percentage like 1%"):
        parse_fraction("lots")


def test_plan_at_every_budget_spends_it_and_beats_the_even_split(store, text_file):
    """From one slot per layer to every expert: the plan's slots sum to the budget, each layer gets 1 … E,
    the full budget gives every layer all its experts, and the DP's expected cost is never above the even
    split's on the same cost curves."""
    _profile(store, text_file, method="forward", tokens=128, validate=False)
    settings = load_settings()
    layers, experts = SPEC.num_hidden_layers, SPEC.num_local_experts
    for slots in range(layers, layers * experts + 1):
        _, data = make_plan(store, settings, PlanRequest(budget_slots=slots, gate_mode="off",
                                                         out=store.path / f"plan-{slots}.json"))
        got = [x["slots"] for x in data["layers"]]
        assert sum(got) == slots and all(1 <= s <= experts for s in got), (slots, got)
        assert data["total_expected_cost"] <= data["even_split_expected_cost"] + 1e-12
    assert got == [experts] * layers


@pytest.mark.parametrize("case", ["slots-above-its-own-budget", "slots-above-a-share-budget",
                                  "plan-for-a-larger-budget"])
def test_a_plan_is_never_obeyed_beyond_the_budget(store, text_file, case):
    """Whatever the store's plan.json says, the runtime never holds more expert slots than the budget in
    use: a hand-made plan whose layers' slots sum to more than its `budget_slots`, with that budget given
    or as a share (50 %: 9 of 18 experts), and an honest plan for 12 slots with that share."""
    _profile(store, text_file, method="forward", tokens=128, validate=False)
    budget = 9
    path, _ = make_plan(store, load_settings(), PlanRequest(budget_slots=12 if case == "plan-for-a-larger-budget"
                                                            else budget, gate_mode="off"))
    if case != "plan-for-a-larger-budget":
        doc = json.loads(path.read_text())
        for x, slots in zip(doc["layers"], (6, 3, 3), strict=True):
            x["slots"] = slots  # 12 slots under a plan that says 9
        path.write_text(json.dumps(doc))
    settings = load_settings(overrides={"cache.budget": budget if case == "slots-above-its-own-budget" else "50%"})
    resolved = resolve(store, settings).budget.total
    with open_engine(store, settings) as eng:
        held, held_bytes = eng.cache.num_slots, eng.cache.capacity_bytes
    assert (resolved, held, held_bytes) <= (budget, budget, budget * store.slot_bytes) and max(resolved, held) <= budget


def test_plan_without_profile_says_which_command(store):
    with pytest.raises(ProfileError, match="adapmoe profile"):
        make_plan(store, load_settings(), PlanRequest(budget_slots=6, gate_mode="off"))


def test_eval_perplexity_equals_transformers(make_store, make_checkpoint, text_file):
    store = Store.open(make_store(SPEC, dtype=torch.float32))
    ref = MixtralForCausalLM.from_pretrained(make_checkpoint(SPEC, dtype=torch.float32), dtype=torch.float32)
    with runtime_engine(store, {"cache.budget": 5}) as eng:
        tok = AutoTokenizer.from_pretrained(store.path)
        ids = read_text_tokens(tok, text_file, max_tokens=200)
        res = evaluate(eng, ids, window=64, stride=32)
    nll, n, start, scored = 0.0, 0, 0, 1
    with torch.no_grad():
        while scored < len(ids):  # the sliding window, written out independently
            end = min(start + 64, len(ids))
            logits = ref(torch.tensor([ids[start:end]])).logits[0]
            tgt = torch.tensor(ids[scored:end])
            nll += float(torch.nn.functional.cross_entropy(logits[scored - start - 1:end - start - 1], tgt,
                                                           reduction="sum"))
            n += len(tgt)
            scored, start = end, end - 32
    assert res.tokens == n == len(ids) - 1
    assert res.loss == pytest.approx(nll / n, rel=1e-6)


def test_eval_cli_json_and_quality_budget(store, text_file):
    import os
    import subprocess
    import sys

    _profile(store, text_file, validate=False)
    args = [sys.executable, "-m", "adapmoe_cli", "eval", str(store.path), "--text", str(text_file), "--tokens", "150",
            "--window", "64", "--plan", "none", "--json"]
    plain = subprocess.run(args, capture_output=True, text=True, env=os.environ, timeout=300)
    assert plain.returncode == 0, plain.stderr
    p = json.loads(plain.stdout)
    assert {"perplexity", "experts_per_token", "tokens", "single_expert_ratio"} <= set(p)
    assert p["experts_per_token"] == 2.0 and p["tokens"] == 149
    gated = subprocess.run([*args, "--quality-budget", "5%", "--calibration", str(text_file)], capture_output=True,
                           text=True, env=os.environ, timeout=300)
    assert gated.returncode == 0, gated.stderr
    g = json.loads(gated.stdout)
    q = g["quality_search"]  # what it promises is asserted on the trained model: tests/test_quality_budget.py
    assert g["gate"]["scale"] == q["scale"] is not None and q["budget"] == 0.05
    assert q["calibration"]["increase"] <= q["calibration"]["increase_bound"] <= 0.05
    assert q["evaluated"]["ungated_perplexity"] == pytest.approx(p["perplexity"], rel=1e-9)
    bad = subprocess.run([*args, "--quality-budget", "0%"], capture_output=True, text=True, env=os.environ, timeout=300)
    assert bad.returncode != 0 and "quality budget" in bad.stderr and "Traceback" not in bad.stderr


def test_gate_rules_and_auto():
    from adapmoe_cli.planning import gate_rules

    grad = [{"layer": 0, "sensitivity": 4.0, "second_order_drop_loss": 0.02, "mean_second_weight_sq": 0.01},
            {"layer": 1, "sensitivity": 1.0, "second_order_drop_loss": 0.08, "mean_second_weight_sq": 0.02}]
    fwd = [{k: v for k, v in x.items() if k != "second_order_drop_loss"} for x in grad]
    assert gate_rules.thresholds("paper", 0.04, grad) == pytest.approx({0: 0.1, 1: 0.2})
    assert gate_rules.thresholds("weighted", 0.08, grad) == pytest.approx({0: 0.2, 1: 0.02**0.5})  # S = 2, 4
    assert gate_rules.thresholds("global", 0.3, grad) == {0: 0.3, 1: 0.3}
    assert gate_rules.gate("auto", 0.08, grad).rule == "weighted"
    assert gate_rules.gate("auto", 0.04, fwd).rule == "paper"
    with pytest.raises(ProfileError, match="gradient method"):
        gate_rules.thresholds("weighted", 0.1, fwd)
    for scale in (-1.0, float("nan"), float("inf")):  # (NaN thresholds made a plan the runtime refused)
        with pytest.raises(UsageError, match="finite number ≥ 0"):
            gate_rules.thresholds("paper", scale, grad)
    # bisection finds the largest scale whose bound stays within the budget (bound = 2 × increase here)
    def quality(g):
        inc = (g.threshold(0) or 0.0) / 20
        return gate_rules.GateQuality(10.0 * (1 + inc), 10.0, 2 * inc)

    found = gate_rules.find_scale("global", grad, 0.01, quality)
    assert 0.1 / (1 + gate_rules.SCALE_RESOLUTION) <= found.scale <= 0.1 and found.bound <= 0.01
    failed = min(s for s, q in found.evaluations if q.bound > 0.01)
    assert failed <= found.scale * (1 + gate_rules.SCALE_RESOLUTION)  # stopped at the resolution …
    assert len(found.evaluations) < gate_rules.SEARCH_ITERATIONS + 1  # … before the last step


def test_the_quality_bound_takes_each_window_as_one_sample_and_covers_another_text():
    """The search's bound (planning/quality.py): each scored window is one sample (documents differ more
    than tokens), and it bounds the increase another text of as many windows would show (twice one mean's
    variance). Here tokens within a window are equal, so a per-token bound would be far narrower."""
    from adapmoe_cli.planning.quality import CONFIDENCE_Z, WINDOW, increase_bound

    d = torch.tensor([0.0] * 3 + [0.02] * 3 + [0.0] * 3 + [0.02] * 3, dtype=torch.float64)
    sd = (4 * 0.01**2 / 3) ** 0.5  # of the four window means 0, .02, 0, .02
    expected = math.exp(0.01 + CONFIDENCE_Z * sd * (2 / 4) ** 0.5) - 1
    assert increase_bound(d, (3, 3, 3, 3)) == pytest.approx(expected, rel=1e-12)
    per_token = math.exp(0.01 + CONFIDENCE_Z * float(d.std()) / 12**0.5) - 1
    assert per_token < 0.016 < 0.023 < expected
    # one piece (a text shorter than the tokens asked for) is cut into WINDOW-token samples …
    long = torch.cat([torch.full((WINDOW,), v, dtype=torch.float64) for v in (0.0, 0.02, 0.0, 0.02)])
    assert increase_bound(long, (long.numel(),)) == pytest.approx(expected, rel=1e-12)
    # … and one too short for two samples is bounded with each token one
    short = d[:6]
    expected_short = math.exp(float(short.mean()) + CONFIDENCE_Z * float(short.std()) * (2 / 6) ** 0.5) - 1
    assert increase_bound(short, (6,)) == pytest.approx(expected_short, rel=1e-12)


def test_gate_modes_and_the_rules_beyond_top2():
    """The three ways thresholds apply (runtime/gating.py), against a per-token loop written here: `share`
    drops a non-top-1 expert whose share is below T, `tail` drops the experts from the j-th on while they
    together carry less than T (post-hoc top-p, p = 1 − T), `count` keeps the first k'. At top-2, share
    and tail are one rule. The top-k > 2 rules and `auto`'s choice by k."""
    from adapmoe_cli.planning import gate_rules
    from adapmoe_cli.runtime.gating import ExpertStats, GatePolicy, adaptive_keep, costs

    g = torch.Generator().manual_seed(0)
    shares = torch.sort(torch.softmax(3 * torch.randn(200, 8, generator=g), -1), -1, descending=True).values
    shares = shares / shares.sum(-1, keepdim=True)
    for t in (0.0, 0.05, 0.2, 0.6, 1.0):
        tail = adaptive_keep(shares, t, "tail")
        for row, keep in zip(shares.tolist(), tail.tolist(), strict=True):
            kept = 1  # top-p: the smallest prefix whose total reaches 1 − T
            while kept < 8 and sum(row[:kept]) < 1 - t:
                kept += 1
            assert keep == [True] * kept + [False] * (8 - kept) or abs(sum(row[:kept]) - (1 - t)) < 1e-6
        share = adaptive_keep(shares, t, "share")
        assert share.tolist() == [[j == 0 or s >= t for j, s in enumerate(row)] for row in shares.tolist()]
    two = torch.sort(torch.softmax(torch.randn(300, 2, generator=g), -1), -1, descending=True).values
    for t in (0.1, 0.3, 0.45):
        assert torch.equal(adaptive_keep(two, t, "tail"), adaptive_keep(two, t, "share"))
    assert adaptive_keep(shares, 3, "count").sum(-1).tolist() == [3] * 200
    assert GatePolicy.static(3, [0, 1]).mode == "count" and GatePolicy.static(3, [0, 1]).rule == "top-3"

    grad = [{"layer": 0, "sensitivity": 4.0, "second_order_drop_loss": 0.02, "mean_second_weight_sq": 0.01},
            {"layer": 1, "sensitivity": 1.0, "second_order_drop_loss": 0.08, "mean_second_weight_sq": 0.02}]
    fwd = [{k: v for k, v in x.items() if k != "second_order_drop_loss"} for x in grad]
    assert gate_rules.thresholds("weighted-tail", 0.08, grad, 8) == gate_rules.thresholds("weighted", 0.08, grad, 8)
    top_p = gate_rules.gate("top-p", 0.15, grad, 8)
    assert top_p.thresholds == {0: 0.15, 1: 0.15} and top_p.mode == "tail"
    assert gate_rules.gate("weighted", 0.08, grad, 8).mode == "share"
    assert gate_rules.gate("auto", 0.08, grad, 8).rule == "weighted-tail"  # (no expert statistics)
    assert gate_rules.gate("auto", 0.08, fwd, 8).rule == "top-p"
    assert gate_rules.gate("auto", 0.08, grad, 2).rule == "weighted"
    # with expert statistics `auto` compensates; a compensating rule without them is refused
    stats = ExpertStats({i: torch.zeros(8, 4) for i in (0, 1)},
                        {i: torch.linspace(0.2, 2.5, 8) for i in (0, 1)})
    assert gate_rules.gate("auto", 0.08, grad, 8, stats).rule == gate_rules.AUTO_FINE == "spread-tail"
    assert gate_rules.gate("auto", 0.08, grad, 2, stats).rule == "weighted+mean"
    assert gate_rules.gate("auto", 0.08, fwd, 8, stats).rule == "top-p"
    assert gate_rules.gate("spread-tail", 0.08, grad, 8, stats).stats is stats
    assert gate_rules.gate("weighted-tail", 0.08, grad, 8, stats).stats is None
    with pytest.raises(ProfileError, match="expert statistics"):
        gate_rules.gate("weighted+mean", 0.08, grad, 8)
    # the largest scale keeps only the top-1 in every layer, whatever the mode (with spreads: up to 2.5)
    ids = torch.stack([torch.randperm(8, generator=g) for _ in range(200)])
    for rule in ("top-p", "weighted-tail", "weighted", "spread-tail"):
        policy = gate_rules.gate(rule, gate_rules.max_scale(rule, grad, 8, stats), grad, 8, stats)
        c = costs(shares, ids, policy.spread(0))
        assert adaptive_keep(c, policy.threshold(0), policy.mode).sum().item() == 200
    assert [gate_rules.mode_of(r) for r in ("weighted", "top-p", "top-4", "off")] == ["share", "tail", "count", "share"]
    with pytest.raises(UsageError, match="unknown gate rule"):
        gate_rules.thresholds("top-q", 0.1, grad)


def test_a_budget_no_gate_meets_and_a_router_with_one_expert(make_store, text_file, tmp_path):
    """A quality budget below what any dropping gate costs ends with a gate that drops nothing, and one line
    saying what the nearest dropping gate measured; a top-1 router leaves the gate nothing to drop: said,
    and plain top-1 runs."""
    from adapmoe_cli.planning import gate_rules

    layers = [{"layer": 0, "sensitivity": 1.0}]

    def quality(g):  # a gate below threshold 1e-3 drops nothing; above, every drop costs at least +0.3 %
        t = g.threshold(0) or 0.0
        drops = t > 1e-3
        inc = 0.003 + t / 10 if drops else 0.0
        return gate_rules.GateQuality(10.0 * (1 + inc), 10.0, 1.5 * inc, 2.0 - t if drops else 2.0, 2.0)

    found = gate_rules.find_scale("paper", layers, 0.001, quality)
    assert found.bound <= 0.001 and not found.reachable
    near = found.closest()
    assert near is not None and near[1].drops and near[1].bound == min(q.bound for _, q in found.evaluations if q.drops)
    text = found.unreachable_text(0.001)
    assert "no gate that drops an expert keeps the perplexity increase within 0.10%" in text
    assert f"(bound {near[1].bound:+.2%})" in text and "--quality-budget" in text
    assert gate_rules.find_scale("paper", layers, 0.01, quality).unreachable_text(0.01) is None

    dst = tmp_path / "top1"
    shutil.copytree(make_store(TinySpec(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=1,
                                        hidden_size=48, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2), dtype=torch.float32), dst)
    one = Store.open(dst)
    with pytest.raises(UsageError, match="one expert per token: there is nothing for the adaptive gate to drop"):
        _profile(one, text_file, validate=False)
    choice = resolve(one, load_settings(overrides={"gate.scale": 0.1}))  # asked for a gate anyway: said, top-1 runs
    assert choice.gate.thresholds == {} and gate_rules.ONE_EXPERT in choice.notes
    with runtime_engine(one, gate=choice.gate) as eng:
        eng.model(torch.tensor([[1, 5, 9, 3]]))
        assert eng.stats.experts_per_token == 1.0


def test_expert_statistics_the_compensation_and_their_file(tmp_path):
    """Each expert's mean output is the share²-weighted mean of its outputs where it ranked in the lower half
    of the router's choice, its spread the weighted RMS distance from it (shrunk toward the layer's average,
    1 on average); the compensation adds each dropped expert's weight times its mean; the file round-trips
    and a changed, truncated or mismatched one is refused."""
    from adapmoe_cli.profiling import expert_stats
    from adapmoe_cli.runtime.gating import compensation

    g = torch.Generator().manual_seed(3)
    acc = expert_stats.Accumulator([5], experts=4, top_k=4)
    shares = torch.sort(torch.softmax(torch.randn(50, 4, generator=g), -1), -1, descending=True).values
    ids = torch.stack([torch.randperm(4, generator=g) for _ in range(50)])
    out = torch.randn(50, 4, 6, generator=g)
    acc.add(5, shares[:25], ids[:25], out[:25])
    acc.add(5, shares[25:], ids[25:], out[25:])
    stats = acc.stats()
    n = [0] * 4
    for e in range(4):
        ws, ys = [], []
        for t in range(50):
            for j in (2, 3):  # the lower half of top-4
                if ids[t, j] == e:
                    ws.append(float(shares[t, j]) ** 2)
                    ys.append(out[t, j].double())
        n[e] = len(ws)
        w = torch.tensor(ws, dtype=torch.float64)
        y = torch.stack(ys)
        mean = (w[:, None] * y).sum(0) / w.sum()
        assert torch.allclose(stats.mean[5][e].double(), mean, atol=1e-6)
    assert stats.spread[5].mean().item() == pytest.approx(1.0) and min(n) > 0
    # the compensation, against a loop
    keep = torch.rand(50, 4, generator=g) > 0.5
    keep[:, 0] = True
    comp = compensation(shares, ids, keep, stats.mean[5])
    for t in (0, 7, 31):
        want = sum(float(shares[t, j]) * stats.mean[5][ids[t, j]] for j in range(4) if not keep[t, j])
        assert torch.allclose(comp[t], torch.as_tensor(want).float().expand(6), atol=1e-6)
    # the file
    path = tmp_path / "profile.experts.safetensors"
    sha = expert_stats.write(path, stats)
    back = expert_stats.read(path, sha, [5], 4, 6)
    assert torch.equal(back.mean[5], stats.mean[5]) and torch.equal(back.spread[5], stats.spread[5])
    with pytest.raises(ProfileError, match="num|shapes"):
        expert_stats.read(path, sha, [5], 5)
    with pytest.raises(ProfileError, match="lack layer 6"):
        expert_stats.read(path, sha, [6], 4)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ProfileError, match="do not match"):
        expert_stats.read(path, sha, [5], 4)
    path.unlink()
    with pytest.raises(ProfileError, match="missing"):
        expert_stats.read(path, sha, [5], 4)
