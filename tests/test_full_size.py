"""The full-size variant of a store (store/export.py): experts zero-padded in the intermediate dimension
compute what the unpadded ones do (the same greedy tokens; logits equal up to float32 rounding, as the
matrix products sum in another order), in our runtime and in transformers (which loads the exported
checkpoint), while every expert's bytes on disk are those of the size asked for."""

from __future__ import annotations

import json

import pytest
import torch

from adapmoe_cli.store import Store
from adapmoe_cli.store.export import PAD_MULTIPLE, export_checkpoint, padded_intermediate, variant_store
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import runtime_engine
from tests.test_cli_store import run_cli

PROMPT = [1, 17, 42, 99, 7, 300, 12, 5]


def _greedy_and_logits(store: Store, slots: int) -> tuple[list[int], torch.Tensor]:
    from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
    from adapmoe_cli.settings import GenerationSettings

    with runtime_engine(store, {"cache.budget": slots}) as eng, torch.no_grad():
        logits = eng.model(torch.tensor([PROMPT])).logits
        gen = GenerationSettings(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)
        tokens = [t for _, (t, _) in zip(range(16), generate_step(eng, PROMPT, new_kv_cache(eng), gen), strict=False)]
        misses = eng.stats.misses
    assert misses > 0  # experts were loaded from disk, not all resident
    return tokens, logits


@pytest.fixture(scope="module")
def small(make_store):
    return Store.open(make_store(TinySpec(), dtype=torch.float32))


def test_padded_store_computes_exactly_what_the_original_does(small, tmp_path):
    big = variant_store(small, 4 * small.expert_payload_bytes, out=tmp_path / "big")
    inter = padded_intermediate(small, 4 * small.expert_payload_bytes)
    assert big.shape.intermediate_size == inter and inter % PAD_MULTIPLE == 0
    assert big.expert_payload_bytes >= 4 * small.expert_payload_bytes - PAD_MULTIPLE * 3 * 64 * 4
    assert big.manifest["source"]["padded_from"] == small.fingerprint
    slots = len(small.shape.moe_layers) * small.shape.num_experts // 2
    tokens, logits = _greedy_and_logits(small, slots)
    big_tokens, big_logits = _greedy_and_logits(big, slots)
    assert big_tokens == tokens
    # the same sums of the same products, in another blocking order: float32 rounding only
    assert (big_logits - logits).abs().max().item() <= 1e-5
    # built once: the second call reuses it (its manifest is not rewritten)
    mtime = (big.path / "manifest.json").stat().st_mtime_ns
    assert variant_store(small, 4 * small.expert_payload_bytes, out=tmp_path / "big").path == big.path
    assert (big.path / "manifest.json").stat().st_mtime_ns == mtime


def test_the_exported_checkpoint_loads_in_transformers_with_the_same_outputs(small, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = export_checkpoint(small, tmp_path / "plain")
    padded = export_checkpoint(small, tmp_path / "padded", 2 * PAD_MULTIPLE)
    assert json.loads((padded / "config.json").read_text())["intermediate_size"] == 2 * PAD_MULTIPLE
    assert (padded / "model.safetensors.index.json").exists() and (padded / "tokenizer.json").exists()
    out = []
    for path in (plain, padded):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            out.append(model(torch.tensor([PROMPT])).logits)
    assert (out[0] - out[1]).abs().max().item() <= 1e-5


def test_shard_expert_size_from_a_checkpoint_and_bad_sizes(make_checkpoint, monkeypatch, capsys, tmp_path):
    src = make_checkpoint(TinySpec(), dtype=torch.float32)
    code, out, err = run_cli(monkeypatch, capsys, "shard", str(src), str(tmp_path / "s"), "--expert-size", "1MiB")
    assert code == 0, err
    store = Store.open(tmp_path / "s")
    assert 1 << 20 <= store.expert_payload_bytes < (1 << 20) + PAD_MULTIPLE * 3 * 64 * 4 and "wrote" in out
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(src), str(tmp_path / "t"), "--expert-size", "1KiB")
    assert code != 0 and "is not above this model's experts" in err and not (tmp_path / "t").exists()
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(src), str(tmp_path / "t"), "--expert-size", "lots")
    assert code != 0 and "cannot parse size 'lots'" in err


def test_bench_expert_size_builds_once_and_measures_quality_on_the_source(make_store, tmp_path, monkeypatch):
    """`bench --expert-size` benchmarks the full-size variant (built in ADAPMOE_HOME, reused on the second
    run) and computes perplexity on its unpadded source; a peer that is not built is a skipped row saying
    how to build it, and the rest of the bench runs."""
    import shutil

    from tests.test_bench import TEXT, _run

    src = tmp_path / "src"
    shutil.copytree(make_store(TinySpec(), dtype=torch.float32), src)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    monkeypatch.setenv("ADAPMOE_LLAMA_CPP", str(tmp_path / "no-llama"))
    out = tmp_path / "b.json"
    args = ("bench", str(src), "--expert-size", "1MiB", "--text", str(text), "--calibration", str(text),
            "--tokens", "3", "--repeat", "1", "--policies", "lru,adapmoe,llama.cpp", "--out", str(out))
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"lru", "adapmoe"} and "scripts/build_llamacpp.py" in data["skipped"]["llama.cpp"]
    assert data["perplexity_from"].startswith(str(src))
    big = next(p for p in (tmp_path / "adapmoe-home" / "stores").iterdir() if p.name.endswith("-experts-1MiB"))
    assert Store.open(big).expert_payload_bytes >= 1 << 20 and (big / "profile.json").exists()
    mtime = (big / "manifest.json").stat().st_mtime_ns
    assert _run(*args).returncode == 0 and (big / "manifest.json").stat().st_mtime_ns == mtime  # reused


def test_the_full_size_store_follows_its_sources_method_and_keeps_its_own(tmp_path):
    """The padded store carries its source's profile and plan (store/export.py `carry_method`); when the
    source's plan is re-made (or an upgrade ships another), the reused padded store carries the new one;
    a plan made for the padded store itself is never replaced."""
    import shutil

    from adapmoe_cli.model_arg import open_model
    from adapmoe_cli.planning.plan_file import read_plan

    src_dir = tmp_path / "src"
    shutil.copytree(open_model("embedded").path, src_dir)
    src = Store.open(src_dir)
    big = variant_store(src, 1 << 20, out=tmp_path / "big")
    assert read_plan(big.path / "plan.json", big).data["gate_scale"] == read_plan(src_dir / "plan.json", src).data[
        "gate_scale"]
    carried = read_plan(big.path / "plan.json", big).gate  # its compensating gate finds the statistics carried
    assert carried.stats is not None and carried.rule == "weighted+mean"
    assert torch.equal(carried.stats.mean[0], read_plan(src_dir / "plan.json", src).gate.stats.mean[0])
    doc = json.loads((src_dir / "plan.json").read_text())
    doc["gate_scale"] *= 0.5  # the source's plan re-made
    (src_dir / "plan.json").write_text(json.dumps(doc))
    manifest = (big.path / "manifest.json").read_bytes()
    big = variant_store(src, 1 << 20, out=tmp_path / "big")
    assert (big.path / "manifest.json").read_bytes() == manifest  # reused, not rebuilt …
    assert read_plan(big.path / "plan.json", big).data["gate_scale"] == doc["gate_scale"]  # … with the new plan
    own = json.loads((big.path / "plan.json").read_text())
    del own["carried_from"]
    own["gate_scale"] = 0.001  # made for the padded store itself
    (big.path / "plan.json").write_text(json.dumps(own))
    big = variant_store(src, 1 << 20, out=tmp_path / "big")
    assert read_plan(big.path / "plan.json", big).data["gate_scale"] == 0.001
