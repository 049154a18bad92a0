"""`adapmoe bench` end to end on a tiny store (numbers are not asserted, only what was counted and the
shape of the output), and its bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from adapmoe_cli.synthetic import TinySpec
from tests.helpers import o_direct_allowed

TEXT = ("Python modules: json encodes and decodes JSON; os talks to the operating system; re matches regular "
        "expressions; pathlib handles paths. ") * 40


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapmoe_cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture
def setup(make_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(make_store(TinySpec(num_hidden_layers=2, num_local_experts=4), dtype=torch.float32), store)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return store, text


def test_bench_runs_every_policy_and_writes_json_and_chart(setup, tmp_path):
    store, text = setup
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = _run("bench", str(store), "--text", str(text), "--calibration", str(text), "--tokens", "4", "--repeat", "2",
             "--policies", "naive,lru,lru+prefetch,lfu,planned,adapmoe,resident", "--out", str(out),
             "--plot", str(png), "--json", "--heldout-tokens", "200")
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    # perplexity on the held-out text's first 200 tokens (of ~1,000), what `eval` gives ungated
    assert data["heldout_tokens"] == 200
    ev = _run("eval", str(store), "--text", str(text), "--tokens", "200", "--plan", "none", "--json")
    assert ev.returncode == 0, ev.stderr
    assert data["policies"]["lru"]["perplexity"] == pytest.approx(json.loads(ev.stdout)["perplexity"], rel=1e-6)
    assert json.loads(r.stdout) == data  # --json: the same object on stdout, and nothing else
    assert set(data["policies"]) == {"naive", "lru", "lru+prefetch", "lfu", "planned", "adapmoe", "resident"}
    assert data["disk_read_bytes_per_s"] > 0
    # what the measured engines' descriptors had: O_DIRECT wherever the file system allows it
    assert data["o_direct"] is o_direct_allowed(store / "experts")
    assert data["page_cache"].startswith("bypassed") is data["o_direct"]
    for name, p in data["policies"].items():
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "experts_per_token", "hit_rate",
                    "stall_s_per_token", "bytes_read_per_token", "perplexity"):
            assert isinstance(p[key], float), (name, key)
        assert p["repeats"] == 2
        # each float32 weight shape a decode step multiplies one row by, and the way this machine chose
        assert set(p["row_products"]) >= {"192x64", "64x96"} and set(p["row_products"].values()) <= {
            "blas", "multiply-and-sum"}, p["row_products"]
        c = p["counts"]
        assert c["hits"] + c["prefetch_hits"] + c["misses"] == c["expert_uses"]
    pol = data["policies"]
    assert pol["naive"]["hit_rate"] == 0.0  # nothing kept across tokens
    assert pol["resident"]["counts"]["misses"] == 0 and pol["resident"]["bytes_read_per_token"] == 0
    assert pol["lru"]["counts"]["prefetches_issued"] == 0 < pol["lru+prefetch"]["counts"]["prefetches_issued"]
    assert pol["adapmoe"]["experts_per_token"] <= pol["lru"]["experts_per_token"]
    assert pol["lru"]["perplexity"] == pol["lru+prefetch"]["perplexity"] == pol["resident"]["perplexity"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (store / "profile.json").exists()  # made on first use


def test_bench_of_quantized_full_size_experts_counts_their_bytes_and_budgets_their_quality(setup, tmp_path):
    from adapmoe_cli.store import Store

    store, text = setup
    small = Store.open(store)
    size = 4 * small.expert_payload_bytes
    r = _run("bench", str(store), "--text", str(text), "--calibration", str(text), "--tokens", "3", "--repeat", "1",
             "--expert-size", str(size), "--experts-format", "int4", "--group-size", "32", "--budget", "1MiB",
             "--policies", "lru,adapmoe", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["experts_format"] == "int4-g32"
    home = tmp_path / "adapmoe-home" / "stores"
    big = Store.open(home / f"store-experts-{size}B-int4-g32")
    unpadded = Store.open(home / "store-int4-g32")
    assert big.shape.intermediate_size > small.shape.intermediate_size
    # the budget is bytes of the stored format: slots of the quantized full-size expert
    assert data["expert_slot_bytes"] == big.slot_bytes < small.slot_bytes * 4
    assert data["budget_slots"] == min(len(big.experts), (1 << 20) // big.slot_bytes)
    # perplexity on the unpadded quantized store; the format's loss is measured against the native store and
    # taken out of the gate's budget
    assert data["perplexity_from"].startswith(str(unpadded.path))
    fq = data["format_quality"]
    assert fq["native_store"] == str(store) and fq["quality_budget"] == 0.01
    assert fq["gate_quality_budget"] == pytest.approx(max(0.0, 0.01 - fq["calibration_increase"]))
    assert fq["perplexity"] == data["policies"]["lru"]["perplexity"]
    for p in data["policies"].values():
        c = p["counts"]
        assert c["hits"] + c["prefetch_hits"] + c["misses"] == c["expert_uses"]
        assert c["bytes_read"] == c["loads"] * big.slot_bytes


def test_bench_simulate_replays_its_own_run_with_equal_counts(setup, tmp_path):
    """`--simulate` records the bench's own routing and replays each policy's setup: every counted hit,
    miss and prefetch hit equals the measured run's; resident and naive are added as its calibration."""
    store, text = setup
    out = tmp_path / "b.json"
    r = _run("bench", str(store), "--text", str(text), "--calibration", str(text), "--tokens", "5", "--repeat", "2",
             "--budget", "4", "--policies", "lru,lru+prefetch,adapmoe", "--simulate", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    sim = data["simulated"]
    assert set(sim["policies"]) == set(data["policies"]) == {"naive", "lru", "lru+prefetch", "adapmoe", "resident"}
    for name, p in sim["policies"].items():
        counts = data["policies"][name]["counts"]
        assert p["counts_match"], name
        assert (p["hits"] * 2, p["misses"] * 2, p["prefetch_hits"] * 2) == (
            counts["hits"], counts["misses"], counts["prefetch_hits"]), name
        assert p["tokens"] == 5 * data["prompts"]
        assert p["decode_tokens_per_s"] > 0 and p["calibration_point"] == (name in ("resident", "naive"))
    assert sim["policies"]["naive"]["misses"] > sim["policies"]["lru"]["misses"] > 0  # the runs did load experts
    assert sim["policies"]["lru+prefetch"]["prefetch_hits"] > 0
    hw = sim["hardware"]
    fastest = {n: max(p["runs"], key=lambda r: r["decode_tokens_per_s"]) for n, p in data["policies"].items()}
    assert hw["calibrated"] and hw["measured"]["disk_bytes_per_s"] == data["disk_read_bytes_per_s"]
    assert hw["measured"]["decode_token_s_all_resident"] == pytest.approx(
        1 / fastest["resident"]["decode_tokens_per_s"])
    naive = fastest["naive"]
    assert naive["misses"] == 2 * 2 * naive["decode_tokens"]  # top-2 in both layers, every token
    assert hw["measured"]["load_s"] == pytest.approx(naive["stall_s_per_token"] * naive["decode_tokens"]
                                                     / naive["misses"])
    header = " ".join(r.stdout.split())  # the table's headers wrap over lines
    assert "decode" in header and "tok/s" in header
    assert "simulated (this run's routing" in r.stdout and "counts equal" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--policies", "lru,fastest"], "unknown policy fastest; known: naive"),
    (["--policies", "lru,belady"], "unknown policy belady"),  # a limit: only the simulator knows the future
    (["--prompts", "EMPTY"], "holds no prompts"),
    (["--budget", "1"], "below one per MoE layer"),
    (["--quality-budget", "0%"], "quality budget"),
    (["--heldout-tokens", "1"], "--heldout-tokens must be ≥ 2"),
])
def test_bench_bad_input(setup, tmp_path, args, needle):
    store, text = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    r = _run("bench", str(store), "--text", str(text), "--calibration", str(text), *args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr
