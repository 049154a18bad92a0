"""The embedded models: shipped in the package in the hub's layout, sharded into ADAPMOE_HOME on first use
(once) through the same loader a real Mixtral or Qwen3-MoE takes, generating through the runtime, their
quality recomputed (not read from the shipped report), and able to answer offline. `embedded` is the
default (Mixtral architecture, top-2 of 8); `embedded-fine` the fine-grained one (Qwen3-MoE, top-8 of 64)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from adapmoe_cli.checkpoint import open_checkpoint
from adapmoe_cli.conversation import Conversation, load_tokenizer
from adapmoe_cli.model_arg import default_model_dir, default_text, open_model
from adapmoe_cli.perplexity import evaluate, read_text_tokens
from adapmoe_cli.settings import GenerationSettings
from tests.helpers import count_shard_runs, runtime_engine


def test_shipped_checkpoint_is_a_trained_mixtral_in_hub_layout():
    src = default_model_dir()
    ckpt = open_checkpoint(src)  # validates every tensor name and shape against the config
    cfg = ckpt.config
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["num_hidden_layers"] >= 6 and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert size <= 25 * 1024 * 1024
    assert any(t.dtype == torch.bfloat16 for t in ckpt.tensors.values())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "MODEL_CARD.md",
                 "quality_report.json", "calibration.txt", "heldout.txt"):
        assert (src / name).exists(), name
    report = json.loads((src / "quality_report.json").read_text())
    # genuinely trained: far better than a unigram model and than the same words shuffled
    assert report["heldout_perplexity"] < 0.5 * report["unigram_perplexity"]
    assert report["heldout_perplexity"] < 0.5 * report["shuffled_words_perplexity"]
    # specialised routers: entropy below uniform in every layer
    for layer in report["routing"]:
        assert layer["router_entropy"] < 0.95 * math.log(8)


def test_default_model_loads_through_the_store_and_generates(tmp_path, monkeypatch):
    runs = count_shard_runs(monkeypatch)
    store = open_model(None)
    assert runs == [store.path] and store.path.parent.parent == tmp_path / "adapmoe-home"
    assert store.dtype_name == "float32" and len(store.experts) == 8 * store.config["num_hidden_layers"]
    assert open_model(None).path == store.path and runs == [store.path]  # second use: no second shard run
    assert default_text("calibration").stat().st_size > 10_000 and default_text("heldout").stat().st_size > 10_000
    # it answers: a greedy reply through the offloading runtime at half the experts
    gen = GenerationSettings(max_new_tokens=24, temperature=0.0, repetition_penalty=1.1)
    with runtime_engine(store, {"cache.budget": "50%"}) as eng:
        reply = list(Conversation(eng, load_tokenizer(store), gen).send("What does the json module do?"))
        assert eng.cache.num_slots == len(store.experts) // 2 and eng.stats.misses > 0
    assert 1 <= len(reply[-1].token_ids) <= 24 and "".join(r.text for r in reply).strip()


def test_fine_model_is_a_trained_qwen3_moe_in_hub_layout():
    src = default_model_dir("embedded-fine")
    ckpt = open_checkpoint(src)  # every tensor name and shape against the config
    cfg = ckpt.config
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts_per_tok"] == 8 and cfg["norm_topk_prob"]
    assert cfg.get("num_experts", cfg.get("num_local_experts")) == 64 and cfg["moe_intermediate_size"] <= 64
    assert (src / "model.safetensors").stat().st_size <= 25 * 1024 * 1024  # the weights (the trace ships beside)
    assert (src / "tokenizer.json").read_bytes() == (default_model_dir() / "tokenizer.json").read_bytes()
    report = json.loads((src / "quality_report.json").read_text())
    assert report["meta"]["balance"] == "per-layer"
    assert report["heldout_perplexity"] < 0.5 * report["unigram_perplexity"]
    assert report["heldout_perplexity"] < 0.5 * report["shuffled_words_perplexity"]
    for layer in report["routing"]:  # balanced per layer: no expert takes more than 4 × its even share
        assert layer["usage_max_over_uniform"] < 4, layer["layer"]


@pytest.mark.parametrize("name", ["embedded", "embedded-fine"])
def test_quality_recomputed_through_the_runtime(name):
    """The quality report's claims, recomputed here rather than read from the shipped JSON: held-out
    perplexity through the offloading runtime far below an add-one unigram model fitted on the
    calibration split and below the same text with its words shuffled; routers specialised in every
    layer (router entropy below 95 % of uniform on held-out tokens)."""
    store = open_model(name)
    tok = load_tokenizer(store)
    held = read_text_tokens(tok, default_text("heldout"), max_tokens=2048)
    words = default_text("heldout").read_text().split()[:1500]
    random.Random(0).shuffle(words)
    shuffled = list(tok(" ".join(words))["input_ids"])[:2048]
    calib = torch.tensor(read_text_tokens(tok, default_text("calibration")))
    counts = torch.bincount(calib, minlength=len(tok)).double() + 1  # add-one
    unigram = math.exp(-torch.log(counts / counts.sum())[torch.tensor(held[1:])].mean().item())
    entropy: dict[int, list[float]] = {}
    with runtime_engine(store) as eng:
        def router_entropy(module, args, out):
            p = torch.softmax(out[0].float(), -1)  # [T, E] from the router's logits
            entropy.setdefault(module.layer_index, []).append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()))

        hooks = []
        for i in range(store.config["num_hidden_layers"]):
            router = store.family.router(eng.model, i)
            router.layer_index = i
            hooks.append(router.register_forward_hook(router_entropy))
        ppl = evaluate(eng, held, 256).perplexity
        for hook in hooks:
            hook.remove()
        shuffled_ppl = evaluate(eng, shuffled, 256).perplexity
    assert ppl < 0.5 * unigram and ppl < 0.5 * shuffled_ppl, (ppl, unigram, shuffled_ppl)
    assert len(entropy) == store.config["num_hidden_layers"]
    for layer, values in entropy.items():
        assert sum(values) / len(values) < 0.95 * math.log(store.shape.num_experts), layer


def test_chat_with_no_model_answers_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ADAPMOE_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "adapmoe_cli", "chat", "--prompt", "What does the json module do?",
                        "--json", "-n", "24"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) >= 1 and out["text"].strip()
    assert 1.0 <= out["stats"]["experts_per_token"] < 2.0  # AdapMoE's gate is on from the first token


def test_chat_with_the_fine_model_answers_offline_with_its_gate(tmp_path):
    """`embedded-fine` names the fine-grained model in every command; its shipped profile and plan put the
    gate for top-k > 2 (`auto` → gate_rules.AUTO_FINE) on from the first token."""
    from adapmoe_cli.planning import gate_rules

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ADAPMOE_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "adapmoe_cli", "chat", "embedded-fine", "--prompt",
                        "What does the json module do?", "--json", "-n", "16"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) >= 1 and out["text"].strip()
    assert 1.0 <= out["stats"]["experts_per_token"] < 8.0
    store = tmp_path / "home" / "stores" / "embedded-fine"
    plan = json.loads((store / "plan.json").read_text())
    assert plan["gate_rule"] == gate_rules.AUTO_FINE and (store / "profile.json").exists()
    listed = subprocess.run([sys.executable, "-m", "adapmoe_cli", "list", "--json"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [s["source"] for s in json.loads(listed.stdout)] == ["embedded-fine"]


@pytest.mark.parametrize("name", ["embedded", "embedded-fine"])
def test_the_shipped_profile_and_plan_are_installed_and_accepted(name):
    """scripts/ship_default_profile.py made them; re-run it when the model or a format changes."""
    from adapmoe_cli.planning.resolve import resolve
    from adapmoe_cli.settings import load_settings

    store = open_model(name)
    assert (store.path / "profile.json").exists() and (store.path / "plan.json").exists()
    choice = resolve(store, load_settings(overrides={"cache.budget": 16}))
    assert not choice.notes and choice.plan is not None  # the right model's plan (fingerprint), well formed
    assert choice.gate.thresholds and choice.budget.total == 16  # re-solved for 16 slots from its curves
    assert sorted(choice.budget.quotas) == list(store.shape.moe_layers)


@pytest.mark.parametrize("name", ["embedded", "embedded-fine"])
def test_the_shipped_versions_list_names_the_files_shipped_now(name):
    """shipped.json (scripts/ship_default_profile.py) lists each shipped file's sha256, the current first:
    without it, the next adapmoe could not tell the copy this one installs from one the user made."""
    import hashlib

    from adapmoe_cli.model_arg import SHIPPED_METHOD, SHIPPED_VERSIONS

    src = default_model_dir(name)
    versions = json.loads((src / SHIPPED_VERSIONS).read_text())
    for file in SHIPPED_METHOD:
        assert versions[file][0] == hashlib.sha256((src / file).read_bytes()).hexdigest()


def test_an_upgrade_replaces_the_shipped_method_it_installed_but_never_what_the_user_made(tmp_path):
    """install_shipped_method: absent files are installed; a store's copy that an earlier adapmoe shipped
    (its sha256 in shipped.json) is replaced by this one's; a file the user made stays, and a profile the
    user made keeps its own trace."""
    import hashlib
    import shutil

    from adapmoe_cli.model_arg import SHIPPED_METHOD, SHIPPED_VERSIONS, install_shipped_method

    def sha(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()

    pkg, store = tmp_path / "pkg", tmp_path / "store"
    pkg.mkdir()
    store.mkdir()
    for file in SHIPPED_METHOD:
        shutil.copyfile(default_model_dir() / file, pkg / file)
    now = {f: (pkg / f).read_bytes() for f in SHIPPED_METHOD}
    old = {f: b + b" " if f.endswith(".json") else b[:-1] + bytes([b[-1] ^ 1]) for f, b in now.items()}
    (pkg / SHIPPED_VERSIONS).write_text(json.dumps({f: [sha(now[f]), sha(old[f])] for f in SHIPPED_METHOD}))

    install_shipped_method(pkg, store)  # a new store: everything
    assert {f: (store / f).read_bytes() for f in SHIPPED_METHOD} == now
    for f in SHIPPED_METHOD:  # an earlier adapmoe's copies: replaced
        (store / f).write_bytes(old[f])
    install_shipped_method(pkg, store)
    assert {f: (store / f).read_bytes() for f in SHIPPED_METHOD} == now
    mine = {"profile.json": now["profile.json"] + b"\n", "plan.json": now["plan.json"] + b"\n"}
    for f, b in mine.items():  # the user's profile and plan, beside an earlier shipped trace: all stay
        (store / f).write_bytes(b)
    (store / "profile.trace.safetensors").write_bytes(old["profile.trace.safetensors"])
    install_shipped_method(pkg, store)
    assert {f: (store / f).read_bytes() for f in mine} == mine
    assert (store / "profile.trace.safetensors").read_bytes() == old["profile.trace.safetensors"]
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]  # no temporary left behind
