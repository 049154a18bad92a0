"""Quantized experts (experts_format.py): each format's compute equals its own dequantized weights and
HQQ's reference for the same quantization; a quantized store reads back what was written, buys more slots
per byte, and the runtime's tokens and logits equal transformers' model whose experts hold the dequantized
weights (float32, exact activations; bfloat16 activations within their rounding); bad input is one line
and a failed quantized shard leaves nothing behind."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adapmoe_cli import experts_format as ef
from adapmoe_cli.errors import StoreError, UsageError
from adapmoe_cli.store import Store
from adapmoe_cli.store.export import export_checkpoint, variant_store
from adapmoe_cli.store.manifest import manifest_digest
from adapmoe_cli.store.reader import ExpertReader, aligned_buffer, expert_views
from adapmoe_cli.store.writer import shard
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import runtime_engine
from tests.test_cli_store import run_cli

SPEC = TinySpec(hidden_size=64, intermediate_size=96)  # group 32 divides both; 64 does not divide 96
PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 12]
FORMATS = {"int8": ef.parse_format("int8"), "int4": ef.parse_format("int4", 32), "int2": ef.parse_format("int2")}


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_compute_equals_the_dequantized_weights_and_the_quantizers_reference(name):
    fmt = FORMATS[name]
    w = _weights(96, 64)
    t = fmt.encode(w, torch.float32)
    deq = fmt.decode(t)
    if name == "int8":
        ref = t[".q"].float() * t[".s"].float()[:, None]
        assert t[".q"].dtype == torch.int8 and t[".q"].abs().max() <= 127
    else:  # HQQ's own quantization and dequantization of the same weights; ours differs by bfloat16 scales only
        from hqq.core.quantize import Quantizer

        q, meta = Quantizer.quantize(w, nbits=fmt.bits, group_size=fmt.group_size, optimize=True, axis=1,
                                     bitpack=False, compute_dtype=torch.float32, device="cpu")
        ref = Quantizer.dequantize(q, meta).reshape(w.shape)
        # bfloat16 keeps 8 bits of the scales and zeros the kernel takes: ours is HQQ's up to that rounding,
        # far below the quantization error itself
        assert (deq - ref).norm() <= 0.1 * (ref - w).norm()
        assert (deq - w).norm() <= 1.01 * (ref - w).norm()
    if name == "int8":
        assert torch.equal(deq, ref)
    # the error of the format itself, against the original weights: the more bits, the smaller
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < {"int8": 0.01, "int4": 0.12, "int2": 0.5}[name]
    x = torch.randn(5, 64)
    exact = fmt.linear(x, t, "model")
    assert (exact - x @ deq.T).abs().max().item() <= 1e-5
    fast = fmt.linear(x, t, "bfloat16")
    assert fast.dtype == torch.float32
    assert (fast - exact).abs().max().item() <= 0.02 * exact.abs().max().item()


@pytest.mark.parametrize("name", ["int4", "int2"])
def test_decode_in_blocks_is_the_kernel_on_the_whole_identity(name):
    """`decode` cuts K into blocks repacked from the part's integers (a padded w2's K is 52k: the whole K × K
    identity took minutes per expert): the same floats as the kernel applied to the whole identity."""
    fmt = FORMATS[name]
    k = 2 * ef.DECODE_BLOCK + 128  # two whole blocks and a part of one
    t = fmt.encode(_weights(32, k, seed=1), torch.float32)
    whole = torch._weight_int4pack_mm_for_cpu(torch.eye(k), fmt.packed4(t), fmt.group_size, t[".s"].float()).T
    assert torch.equal(fmt.decode(t), whole)


def test_int2_is_the_int4_layout_four_to_a_byte():
    w = _weights(64, 96, seed=3)
    int2, int4 = FORMATS["int2"], ef.Int4(32)
    t = int2.encode(w, torch.float32)
    assert t[".q"].shape == (64, 96 // 4)
    q, _, _ = ef._hqq(w, 2, 32)
    assert torch.equal(int2.packed4(t), torch._convert_weight_to_int4pack_for_cpu(q + 6, 1))
    assert torch.equal(int2.decode(t), int4.decode({".q": int2.packed4(t), ".s": t[".s"]}))


@pytest.fixture(scope="module")
def native(make_store):
    return Store.open(make_store(SPEC, dtype=torch.float32))


@pytest.fixture(scope="module")
def quantized(native, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {name: variant_store(native, fmt=fmt, out=root / name) for name, fmt in FORMATS.items()}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_quantized_store_reads_back_what_was_written_in_fewer_bytes(native, quantized, name):
    store, fmt = quantized[name], FORMATS[name]
    assert store.manifest["format_version"] == 3 and store.manifest["experts_format"]["name"] == name
    assert store.experts_format.label() == fmt.label()
    info = store.info()
    assert info["experts_format"] == fmt.label()
    bits = info["expert_bits_per_weight"]
    assert fmt.bits <= bits <= fmt.bits + 1  # scales add a fraction of a bit
    assert store.slot_bytes < native.slot_bytes
    # one expert is still one aligned range: one read loads it all, and it decodes to the encoder's output
    buf = aligned_buffer(store.slot_bytes)
    ref_buf = aligned_buffer(native.slot_bytes)
    with ExpertReader(store) as reader, ExpertReader(native) as ref_reader:
        entry = reader.read_into(1, 2, buf)
        ref_reader.read_into(1, 2, ref_buf)
        assert reader.reads == 1 and entry.length == store.slot_bytes
    views = ef.by_part(expert_views(buf, entry))
    originals = ef.by_part(expert_views(ref_buf, native.experts[(1, 2)]))
    for part in store.family.expert_parts:
        want = fmt.encode(originals[part][""], torch.float32)
        assert set(views[part]) == set(want)
        for suffix, tensor in want.items():
            assert torch.equal(views[part][suffix], tensor)
    # a budget in bytes buys more slots of the quantized store
    assert store.cache_shape.slot_bytes == store.slot_bytes
    assert 8 * 2 ** 20 // store.slot_bytes > 8 * 2 ** 20 // native.slot_bytes


def _greedy(eng, n):
    from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
    from adapmoe_cli.settings import GenerationSettings

    gen = GenerationSettings(max_new_tokens=n, temperature=0.0, repetition_penalty=1.0)
    return [t for _, (t, _) in zip(range(n), generate_step(eng, PROMPT, new_kv_cache(eng), gen), strict=False)]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_runtime_equals_transformers_with_the_dequantized_experts(quantized, tmp_path, name):
    from transformers import AutoModelForCausalLM

    store = quantized[name]
    ckpt = export_checkpoint(store, tmp_path / "deq")  # the experts' dequantized weights, float32
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, experts_implementation="eager").eval()
    ref.generation_config.eos_token_id = None
    want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(PROMPT):]
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT])).logits
    slots = len(store.shape.moe_layers) * store.shape.num_experts // 2
    with runtime_engine(store, {"cache.budget": slots, "quantized_activations": "model"}) as eng:
        assert _greedy(eng, 16) == want.tolist()
        with torch.no_grad():
            logits = eng.model(torch.tensor([PROMPT])).logits
        assert (logits - ref_logits).abs().max().item() <= 1e-4
        assert eng.stats.misses > 0 and eng.stats.bytes_read == eng.stats.loads * store.slot_bytes
    # the fast path (bfloat16 activations): the same tokens here, logits within bfloat16's rounding
    with runtime_engine(store, {"cache.budget": slots}) as eng:
        assert eng.settings.quantized_activations == "bfloat16"
        with torch.no_grad():
            fast = eng.model(torch.tensor([PROMPT])).logits
        assert (fast - ref_logits).abs().max().item() <= 0.05 * ref_logits.abs().max().item()
        assert _greedy(eng, 8) == want[:8].tolist()


def test_padded_int4_store_computes_what_the_unpadded_int4_store_does(native, quantized, tmp_path):
    big = variant_store(native, 4 * native.expert_payload_bytes, FORMATS["int4"], out=tmp_path / "big")
    assert big.experts_format.label() == "int4-g32" and big.shape.intermediate_size > SPEC.intermediate_size
    slots = len(big.shape.moe_layers) * big.shape.num_experts
    with runtime_engine(quantized["int4"], {"cache.budget": slots, "quantized_activations": "model"}) as a, \
            runtime_engine(big, {"cache.budget": slots, "quantized_activations": "model"}) as b, torch.no_grad():
        la, lb = a.model(torch.tensor([PROMPT])).logits, b.model(torch.tensor([PROMPT])).logits
    assert (la - lb).abs().max().item() <= 1e-5


def test_bad_formats_are_one_line_each(native, make_checkpoint, tmp_path, monkeypatch, capsys):
    ckpt = make_checkpoint(SPEC, dtype=torch.float32)
    cases = [
        (["--experts-format", "int3"], "unknown --experts-format 'int3'"),
        (["--experts-format", "int4", "--group-size", "48"], "--group-size 48 is not one the int4 kernel takes"),
        (["--experts-format", "int4", "--group-size", "64"], "does not divide expert part w2's input dimension 96"),
        (["--experts-format", "int8", "--group-size", "64"], "--group-size applies to int4 and int2"),
    ]
    for extra, message in cases:
        code, out, err = run_cli(monkeypatch, capsys, "shard", str(ckpt), str(tmp_path / "out"), *extra)
        assert code != 0 and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


def _rewrite_manifest(store: Store, dst, change) -> Store:
    import shutil

    shutil.copytree(store.path, dst)
    m = json.loads((dst / "manifest.json").read_text())
    change(m)
    m["manifest_sha256"] = manifest_digest(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_a_store_in_a_format_this_version_cannot_read_is_refused_by_name(quantized, tmp_path):
    def unknown(m):
        m["experts_format"]["name"] = "fp3"

    def relabelled(m):
        m["format_version"] = 2

    def other_layout(m):
        m["experts_format"]["layout"] = "some-gpu-tiles"

    with pytest.raises(StoreError, match="format 'fp3', which this adapmoe cannot read"):
        Store.open(_rewrite_manifest(quantized["int4"], tmp_path / "a", unknown))
    with pytest.raises(StoreError, match="experts_format is not part of format version 2"):
        Store.open(_rewrite_manifest(quantized["int4"], tmp_path / "b", relabelled))
    with pytest.raises(StoreError, match="layout 'some-gpu-tiles'"):
        Store.open(_rewrite_manifest(quantized["int4"], tmp_path / "c", other_layout))
    with pytest.raises(StoreError, match="int2 experts are packed as 'interleaved'"):
        Store.open(_rewrite_manifest(quantized["int2"], tmp_path / "e",
                                     lambda m: m["experts_format"].update(packing="interleaved")))
    # a store packed by a PyTorch whose int4 layout differs opens (info, verify work) but does not run
    probe = _rewrite_manifest(quantized["int4"], tmp_path / "d",
                              lambda m: m["experts_format"].update(layout_probe="0" * 64))
    store = Store.open(probe)
    with pytest.raises(StoreError, match="packed in a layout this PyTorch"):
        runtime_engine(store, {"cache.budget": 4})


def test_a_failed_quantized_shard_leaves_nothing_and_a_reshard_in_another_format_needs_force(
        make_checkpoint, tmp_path, monkeypatch):
    ckpt = make_checkpoint(SPEC, dtype=torch.float32)
    out = tmp_path / "store"
    calls = {"n": 0}
    real = ef.Int4.encode

    def failing(self, w, dtype):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C half way through the experts
        return real(self, w, dtype)

    monkeypatch.setattr(ef.Int4, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        shard(ckpt, out, experts_format=ef.Int4(32))
    assert not out.exists() and not list(tmp_path.glob(".store*"))
    monkeypatch.setattr(ef.Int4, "encode", real)
    made = shard(ckpt, out, experts_format=ef.Int4(32))
    assert not made.reused and Store.open(out).experts_format.label() == "int4-g32"
    assert shard(ckpt, out, experts_format=ef.Int4(32)).reused
    with pytest.raises(Exception, match="already holds a different store; pass --force"):
        shard(ckpt, out, experts_format=ef.parse_format("int8"))
    assert Store.open(out).experts_format.label() == "int4-g32"  # untouched
    assert shard(ckpt, out, experts_format=ef.parse_format("int8"), force=True).reused is False
    assert Store.open(out).experts_format.label() == "int8"


def test_weight_bits_count_the_scales():
    shapes = {"w1": (96, 64), "w3": (96, 64), "w2": (64, 96)}
    assert ef.parse_format("int8").weight_bits(shapes, 4) == pytest.approx(8 + 16 * (96 + 96 + 64) / (3 * 96 * 64))
    assert ef.Int4(32).weight_bits(shapes, 4) == pytest.approx(4 + 32 / 32)
    assert ef.ExpertsFormat().weight_bits(shapes, 2) == 16
    assert math.isclose(ef.parse_format("int2").weight_bits(shapes, 4), 2 + 1)
    with pytest.raises(UsageError):
        ef.parse_format("int4", 16)


# -- the miss fallback (a resident low-bit copy computes a missed expert while the full one loads) -----------

def _run_with(store, fallback, slots, prefetch=True):
    from adapmoe_cli import budget as budgets
    from adapmoe_cli.runtime.engine import Engine
    from adapmoe_cli.settings import load_settings

    settings = load_settings(overrides={"prefetch": prefetch, "prefetch_precision": 0.0,
                                        "quantized_activations": "model"})
    budget = budgets.even(store.cache_shape, slots)
    with Engine(store, settings, budget, fallback=fallback) as eng, torch.no_grad():
        tokens = _greedy(eng, 12)
        eng.manager.drain()
        return tokens, eng.stats.copy(), eng.fallback_bytes


def test_fallback_computes_every_demand_miss_from_the_copy_and_keeps_the_books(native, quantized, tmp_path):
    # a copy with the very same weights (native, another folder): the same tokens, and every miss was
    # computed from it, none waited for
    same = variant_store(native, out=tmp_path / "copy")
    slots = len(native.shape.moe_layers) * 2
    for prefetch in (False, True):
        want, base, _ = _run_with(native, None, slots, prefetch)
        got, stats, held = _run_with(native, same, slots, prefetch)
        assert got == want
        assert held == len(same.experts) * same.slot_bytes
        assert stats.fallbacks == stats.misses > 0 and base.fallbacks == 0
        # the cache's books do not depend on the fallback: the same hits, misses and reads asked for — but a
        # read nobody waits for may be cancelled (its expert evicted before the read started): not read
        for key in ("hits", "prefetch_hits", "misses", "expert_uses"):
            assert getattr(stats, key) == getattr(base, key), key
        assert stats.loads + stats.prefetches_dropped == base.loads + base.prefetches_dropped
        assert stats.bytes_read == stats.loads * native.slot_bytes
    # an int4 copy: the misses compute with int4 weights, the rest as before
    got, stats, _ = _run_with(native, quantized["int4"], slots)
    assert stats.fallbacks == stats.misses > 0


def test_a_fallback_of_another_model_is_refused(native, make_store, tmp_path):
    from adapmoe_cli import budget as budgets
    from adapmoe_cli.runtime.engine import Engine
    from adapmoe_cli.settings import load_settings

    other = Store.open(make_store(TinySpec(num_hidden_layers=3), dtype=torch.float32))
    with pytest.raises(UsageError, match="holds another model"):
        Engine(native, load_settings(), budgets.even(native.cache_shape, 8), fallback=other)


def test_fallback_policies_pay_for_their_copy_and_the_simulator_refuses_them(native, quantized):
    from adapmoe_cli.bench import setups
    from adapmoe_cli.policies import parse_policies
    from adapmoe_cli.runtime.gating import GatePolicy
    from adapmoe_cli.settings import load_settings

    copy = quantized["int4"]
    total = len(native.experts)
    plan = lambda slots, gated, eviction: (budgets_even(native, slots), GatePolicy.off())  # noqa: E731
    out, skipped = setups(native, load_settings(), ["lru+prefetch", "lru+prefetch+fallback"], total, plan,
                          fallback=copy)
    held = -(-len(copy.experts) * copy.slot_bytes // native.slot_bytes)
    assert out["lru+prefetch"].budget.total == total and out["lru+prefetch"].fallback is None
    assert out["lru+prefetch+fallback"].budget.total == total - held and out["lru+prefetch+fallback"].fallback is copy
    out, skipped = setups(native, load_settings(), ["lru+prefetch+fallback"], held + 1, plan, fallback=copy)
    assert not out and "leaves fewer than one slot a layer" in skipped["lru+prefetch+fallback"]
    with pytest.raises(UsageError, match="unknown policy adapmoe\\+fallback"):
        parse_policies("adapmoe+fallback", limits=True)
    assert parse_policies("adapmoe+fallback", peers=True) == ["adapmoe+fallback"]


def budgets_even(store, slots):
    from adapmoe_cli import budget as budgets

    return dict(budgets.even(store.cache_shape, slots).quotas)


def test_commands_that_shard_on_first_use_take_the_format(make_checkpoint, quantized, tmp_path, monkeypatch, capsys):
    from adapmoe_cli.model_arg import open_model

    ckpt = make_checkpoint(SPEC, dtype=torch.float32)
    made = open_model(str(ckpt), experts_format=ef.Int4(32))
    assert made.path.name.endswith("-int4-g32") and made.experts_format.label() == "int4-g32"
    assert not made.path.with_name(made.path.name.removesuffix("-int4-g32")).exists()  # sharded straight into it
    assert open_model(str(ckpt), experts_format=ef.Int4(32)).path == made.path
    int8 = quantized["int8"].path
    assert open_model(str(int8), experts_format=ef.parse_format("int8")).path == int8
    with pytest.raises(UsageError, match="holds int8 experts, not int4-g32"):
        open_model(str(int8), experts_format=ef.Int4(32))
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(ckpt), "--experts-format", "int2", "--tokens", "64",
                             "--text", str(_text(tmp_path)), "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] > 0
    assert list((tmp_path / "adapmoe-home" / "stores").glob("*-int2-g32"))


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("json encodes and decodes JSON; os talks to the operating system. " * 30)
    return path
