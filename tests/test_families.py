"""Every supported family through one checker. Each tiny checkpoint is made by transformers itself (its
config class, its model, `save_pretrained`: the hub's names, sharded with the index; odd shapes — experts
not a power of two, one KV head, dense first layers or dense layers between sparse ones, k > 2, grouped
routers), sharded by adapmoe, and run through the offloading runtime against transformers' own model from
the same checkpoint: greedy tokens equal and logits within 1e-4 (float32) at one slot per MoE layer, half
and all, with and without prefetch; the adaptive gate at fixed thresholds equals the same gate applied
inside transformers' model (written here, independently of runtime/gating.py); profile and plan-cache
run; the family's row agrees with transformers' config class; a download from a local hub fetches only
what a store needs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from adapmoe_cli.families import FAMILIES, get_family
from adapmoe_cli.runtime.gating import ExpertStats, GatePolicy
from adapmoe_cli.store import Store
from adapmoe_cli.store.writer import shard
from adapmoe_cli.synthetic import TINY_FAMILIES, write_family_checkpoint
from tests.helpers import greedy, ref_greedy, runtime_engine
from tests.test_cli_store import run_cli

NAMES = sorted(TINY_FAMILIES)
PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 12]
STEPS = 12
TEXT = ("The quick brown fox jumps over the lazy dog. Mixture of experts models route every token to a few "
        "experts; the others stay on disk. A cache keeps the experts that are used often in memory. ") * 12


def test_every_supported_family_has_a_tiny_checkpoint():
    assert set(TINY_FAMILIES) == set(FAMILIES)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path, object]]:
    """model_type → (checkpoint, float32 store, transformers' model with eager experts), made once."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, tuple[Path, Path, object]] = {}

    def get(name: str) -> tuple[Path, Path, object]:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            ckpt = write_family_checkpoint(root / "ckpt", name)
            shard(ckpt, root / "store")
            # eager experts: the CPU default leaves the rows of a skipped expert (what the gate sets) unset
            ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, experts_implementation="eager")
            cache[name] = (ckpt, root / "store", ref.eval())
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_family_row_agrees_with_transformers(name):
    """The defaults the row assumes are the config class's, its aliases are the class's attribute map,
    and the sparse layers it computes are those transformers builds (for the tiny config and a variant)."""
    from transformers import CONFIG_MAPPING

    from adapmoe_cli.skeleton import empty_model

    fam = get_family(name)
    cls = CONFIG_MAPPING[name]
    default = cls()
    for key, value in fam.defaults.items():
        assert getattr(default, key) == value, key
    amap = getattr(cls, "attribute_map", {})
    for alias, key in fam.aliases.items():
        assert amap.get(alias) == key or amap.get(key) == alias, (alias, key)
    variants = [{}, {"first_k_dense_replace": 2} if "first_k_dense_replace" in fam.defaults else
                {"decoder_sparse_step": 2, "mlp_only_layers": []} if "decoder_sparse_step" in fam.defaults else {}]
    for extra in variants:
        config = {"model_type": name, **_tiny_config(name), **extra}
        model = empty_model(fam, config)
        built = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
        assert fam.moe_shape(config).moe_layers == built, extra


def _tiny_config(name: str) -> dict:
    from transformers import CONFIG_MAPPING

    from adapmoe_cli.synthetic import _TINY_COMMON

    cfg = CONFIG_MAPPING[name](**{**_TINY_COMMON, **TINY_FAMILIES[name]}).to_dict()
    cfg.pop("model_type", None)
    return cfg


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prefetch", [False, True], ids=["no-prefetch", "prefetch"])
@pytest.mark.parametrize("slots", ["one", "half", "all"])
def test_tokens_and_logits_equal_transformers(family, name, slots, prefetch):
    _, store_path, ref = family(name)
    store = Store.open(store_path)
    n, layers = store.shape.num_experts, len(store.shape.moe_layers)
    per_layer = {"one": 1, "half": n // 2, "all": n}[slots]
    with runtime_engine(store, {"cache.budget": per_layer * layers, "prefetch": prefetch, "prefetch_precision": 0.0}
                        ) as eng:
        assert greedy(eng, PROMPT, STEPS) == ref_greedy(ref, PROMPT, STEPS)
        with torch.no_grad():
            ours = eng.model(torch.tensor([PROMPT])).logits
            theirs = ref(torch.tensor([PROMPT])).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        s = eng.stats
        assert eng.cache.num_slots == per_layer * layers
        assert s.expert_uses == s.hits + s.prefetch_hits + s.misses > 0
        assert s.experts_per_token == store.shape.top_k  # no gate: plain top-k
        if prefetch and slots == "half":  # (one slot is never free for it; with all, nothing is missing)
            assert s.prefetches_issued > 0
        elif not prefetch:
            assert s.prefetches_issued == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("loop", [True, False], ids=["multiply-and-sum", "blas"])
def test_either_way_of_one_rows_product_equals_transformers(family, name, loop, monkeypatch):
    """One row's products eagerly (runtime/row_linear.py) by the multiply-and-sum everywhere, or by BLAS
    everywhere, whichever this machine would choose: transformers' tokens and logits. With the loop forced,
    no one-row product reaches BLAS through it (experts, attention's projections, the lm head)."""
    from adapmoe_cli.runtime import row_linear

    _, store_path, ref = family(name)
    store = Store.open(store_path)
    n, layers = store.shape.num_experts, len(store.shape.moe_layers)
    monkeypatch.setattr(row_linear, "_forced", loop)
    blas_rows: list[int] = []
    real = torch.nn.functional.linear

    def counted(x, w, bias=None):
        blas_rows.append(x.numel() // x.shape[-1])
        return real(x, w, bias)

    monkeypatch.setattr(row_linear, "F", type("F", (), {"linear": staticmethod(counted)}))
    with runtime_engine(store, {"cache.budget": n // 2 * layers, "prefetch_precision": 0.0}) as eng:
        assert greedy(eng, PROMPT, STEPS) == ref_greedy(ref, PROMPT, STEPS)
        with torch.no_grad():
            ours = eng.model(torch.tensor([PROMPT])).logits
            theirs = ref(torch.tensor([PROMPT])).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
    one_row = blas_rows.count(1)
    assert (one_row == 0) if loop else (one_row >= STEPS * layers)
    assert any(rows == len(PROMPT) for rows in blas_rows)  # prompts: F.linear, either way


#: what the family's router does with the weights it keeps, written here from transformers' modelling code
#: (not from families/): a renormalising router gives the kept experts its whole total, in proportion
RENORMALISES = {
    "mixtral": lambda c: True, "phimoe": lambda c: False, "deepseek_v2": lambda c: False,
    "qwen2_moe": lambda c: c.norm_topk_prob, "qwen3_moe": lambda c: c.norm_topk_prob,
    "olmoe": lambda c: c.norm_topk_prob, "deepseek_v3": lambda c: c.norm_topk_prob,
    "glm4_moe": lambda c: c.norm_topk_prob, "gpt_oss": lambda c: True,
}


def reference_gate(weights: torch.Tensor, threshold: float | None, renormalises: bool, mode: str = "share",
                   ids: torch.Tensor | None = None, spread: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate on a router's weights [T, k] in the router's own order: an expert other than the
    highest-weighted is dropped when its share of the k weights is below `threshold` (`share`), or when it
    and every lower-weighted one together carry less than `threshold` (`tail`; with `spread` [E], each
    share counted times its expert's spread, `ids` [T, k] naming the experts) — its weight set to 0
    (GPT-OSS's experts module has no skip index); (new weights, dropped mask)."""
    drop = torch.zeros_like(weights, dtype=torch.bool)
    if threshold is None:
        return weights, drop
    share = weights / weights.sum(-1, keepdim=True)
    if mode == "share":
        drop = share < threshold
    else:
        for t in range(share.shape[0]):
            tail = 0.0
            for j in sorted(range(share.shape[1]), key=lambda j: -float(share[t, j]))[::-1]:
                tail += float(share[t, j]) * (1.0 if spread is None else float(spread[ids[t, j]]))
                drop[t, j] = tail < threshold
    drop.scatter_(-1, share.argmax(-1, keepdim=True), False)
    kept = weights.masked_fill(drop, 0.0)
    if renormalises:
        kept = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
    return kept, drop


@contextmanager
def gated_experts(model, thresholds: dict[int, float], renormalises: bool, mode: str = "share",
                  stats: ExpertStats | None = None, spreads: bool = False) -> Iterator[list[int]]:
    """Apply `reference_gate` to what each MoE layer's experts module of transformers' model receives;
    with `stats`, compensated: the kept experts keep the router's weights and each dropped expert adds its
    weight times its mean output (and, with `spreads`, shares are weighed by the experts' spreads); yields
    [choices seen, dropped]."""
    counts = [0, 0]
    saved = []
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        orig = experts.forward

        def forward(x, idx, w, orig=orig, i=i):
            spread = stats.spread[i] if stats is not None and spreads and i in thresholds else None
            kept, drop = reference_gate(w, thresholds.get(i), renormalises and stats is None, mode, idx, spread)
            counts[0] += idx.numel()
            counts[1] += int(drop.sum())
            out = orig(x, idx, kept)
            if stats is not None and i in thresholds:
                for t in range(idx.shape[0]):
                    for j in range(idx.shape[1]):
                        if drop[t, j]:
                            out[t] = out[t] + w[t, j] * stats.mean[i][idx[t, j]].to(out.dtype)
            return out

        saved.append((experts, orig))
        experts.forward = forward
    try:
        yield counts
    finally:
        for experts, orig in saved:
            experts.forward = orig


def _thresholds(model, store: Store, mode: str = "share", spread: dict[int, torch.Tensor] | None = None
                ) -> dict[int, float]:
    """Per MoE layer, a threshold between two non-top shares (`tail`: sums of the shares from the j-th on,
    each times its expert's `spread` where given) seen on the prompt (never on one), so some but not all
    are dropped; the first MoE layer is left ungated."""
    shares: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for layer in store.shape.moe_layers:
        def seen(module, args, layer=layer):
            w, order = torch.sort(args[2] / args[2].sum(-1, keepdim=True), -1, descending=True)
            if spread is not None:
                w = w * spread[layer][args[1].gather(-1, order)]
            w = w[:, 1:]
            if mode == "tail":
                w = w.flip(-1).cumsum(-1)
            shares.setdefault(layer, []).append(w.flatten())
        hooks.append(model.model.layers[layer].mlp.experts.register_forward_pre_hook(seen))
    try:
        with torch.no_grad():
            model(torch.tensor([PROMPT]))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for layer in store.shape.moe_layers[1:]:
        v = torch.sort(torch.cat(shares[layer])).values
        at = len(v) // 2
        while at + 2 < len(v) and v[at + 1] - v[at] < 1e-4:
            at += 1
        out[layer] = float((v[at] + v[at + 1]) / 2)
    return out


@pytest.mark.parametrize(("name", "mode"), [(n, "share") for n in NAMES] + [("qwen3_moe", "tail"), ("olmoe", "tail")])
def test_gate_equals_the_gate_inside_transformers(family, name, mode):
    """Both gate modes at k > 2 (the tail mode on a renormalising and a non-renormalising router)."""
    _, store_path, ref = family(name)
    store = Store.open(store_path)
    th = _thresholds(ref, store, mode)
    renorm = RENORMALISES[name](ref.config)
    with gated_experts(ref, th, renorm, mode) as counts:
        want = ref_greedy(ref, PROMPT, STEPS)
        with torch.no_grad():
            theirs = ref(torch.tensor([PROMPT])).logits
    assert 0 < counts[1] < counts[0]  # some, not all, dropped
    _runtime_gives(store, GatePolicy(th, rule="test", mode=mode), want, theirs)


def _runtime_gives(store: Store, gate: GatePolicy, want: list[int], theirs: torch.Tensor) -> None:
    """The runtime with `gate` (two slots per layer, prefetch on): the greedy tokens `want`, the logits
    `theirs` within 1e-4, and fewer experts than top-k computed."""
    budget = len(store.shape.moe_layers) * 2
    with runtime_engine(store, {"cache.budget": budget, "prefetch": True, "prefetch_precision": 0.0}, gate=gate) as eng:
        assert greedy(eng, PROMPT, STEPS) == want
        with torch.no_grad():
            ours = eng.model(torch.tensor([PROMPT])).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert eng.stats.experts_per_token < store.shape.top_k


def _stats(store: Store, seed: int = 0) -> ExpertStats:
    """Expert statistics made up for a test: mean outputs of the size a real expert's are, spreads 0.3–1.7."""
    g = torch.Generator().manual_seed(seed)
    n, h = store.shape.num_experts, int(store.config["hidden_size"])
    layers = store.shape.moe_layers
    return ExpertStats({layer: 0.05 * torch.randn(n, h, generator=g) for layer in layers},
                       {layer: 0.3 + 1.4 * torch.rand(n, generator=g) for layer in layers})


@pytest.mark.parametrize(("name", "spreads"), [("mixtral", False), ("qwen3_moe", True), ("olmoe", True),
                                               ("deepseek_v3", False)])
def test_compensating_gate_equals_the_same_gate_inside_transformers(family, name, spreads):
    """A compensating gate (a dropped expert replaced by its mean output, the kept ones keeping the router's
    weights; with `spreads`, the tail of shares weighed by the experts' spreads) against the same written
    here around transformers' experts modules: greedy tokens, logits, and fewer experts computed."""
    _, store_path, ref = family(name)
    store = Store.open(store_path)
    stats = _stats(store)
    mode = "tail" if spreads else "share"
    th = _thresholds(ref, store, mode, stats.spread if spreads else None)
    renorm = RENORMALISES[name](ref.config)
    with gated_experts(ref, th, renorm, mode, stats, spreads) as counts:
        want = ref_greedy(ref, PROMPT, STEPS)
        with torch.no_grad():
            theirs = ref(torch.tensor([PROMPT])).logits
    assert 0 < counts[1] < counts[0]
    _runtime_gives(store, GatePolicy(th, rule="test", mode=mode, stats=stats, spreads=spreads), want, theirs)
    # the same drops without the means (zero ones) answer otherwise: the comparison above can fail
    zero = ExpertStats({k: torch.zeros_like(v) for k, v in stats.mean.items()}, stats.spread)
    with gated_experts(ref, th, renorm, mode, zero, spreads), torch.no_grad():
        plain = ref(torch.tensor([PROMPT])).logits
    assert (plain - theirs).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_profile_plan_and_info_run(family, name, tmp_path, monkeypatch, capsys):
    _, store_path, _ = family(name)
    store = tmp_path / "store"
    shutil.copytree(store_path, store)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, _, err = run_cli(monkeypatch, capsys, "profile", str(store), "--text", str(text), "--tokens", "256",
                           "--window", "64", "--method", "gradient")
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "plan-cache", str(store), "--budget", "50%", "--text", str(text),
                             "--tokens", "256")
    assert code == 0, err
    plan = json.loads((store / "plan.json").read_text())
    shape = Store.open(store).shape
    assert [x["layer"] for x in plan["layers"]] == list(shape.moe_layers)
    assert sum(x["slots"] for x in plan["layers"]) == len(shape.moe_layers) * shape.num_experts // 2
    code, out, err = run_cli(monkeypatch, capsys, "info", str(store), "--json")
    assert code == 0, err
    assert json.loads(out)["model_type"] == name


def test_unsupported_model_type_names_the_supported_and_the_nearest(family, tmp_path, monkeypatch, capsys):
    ckpt, _, _ = family("qwen3_moe")
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "qwen3moe"
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(bad), str(tmp_path / "out"))
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "unsupported model family 'qwen3moe'" in err and "the nearest is qwen3_moe" in err
    for known in FAMILIES:
        assert known in err
    assert not (tmp_path / "out").exists()


def test_config_and_tensors_that_disagree_name_the_first_mismatch(family, tmp_path, monkeypatch, capsys):
    ckpt, _, _ = family("deepseek_v3")
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["moe_intermediate_size"] = 40
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(bad), str(tmp_path / "out"))
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "model.layers.1.mlp." in err and "config.json implies" in err


DOWNLOAD = """
import json, os, sys
from adapmoe_cli.hub import download_checkpoint
from adapmoe_cli.store import Store
from adapmoe_cli.store.writer import shard
out = {}
for name in sys.argv[1:]:
    path = download_checkpoint("tiny/" + name)
    shard(path, os.path.join(os.environ["ADAPMOE_HOME"], name))
    out[name] = Store.open(os.path.join(os.environ["ADAPMOE_HOME"], name)).family.model_type
print(json.dumps(out))
"""


def test_download_fetches_what_each_family_needs(family, tmp_path):
    """Every family from a local hub holding decoys beside the checkpoint (pickles, `original/`,
    `consolidated.*`): only the checkpoint's files are fetched, and each shards into a store."""
    from tests.hub_server import HubServer

    decoys = ["pytorch_model.bin", "consolidated.00.pth", "original/model.safetensors", "metal/model.bin"]
    with HubServer() as hub:
        for name in NAMES:
            folder = tmp_path / "hub" / name
            shutil.copytree(family(name)[0], folder)
            for d in decoys:
                (folder / d).parent.mkdir(exist_ok=True)
                (folder / d).write_bytes(b"decoy" * 100)
            hub.add(f"tiny/{name}", folder)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") or k == "HF_HOME"}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
        r = subprocess.run([sys.executable, "-c", DOWNLOAD, *NAMES], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1]) == {n: n for n in NAMES}
        for name in NAMES:
            prefix = f"/tiny/{name}/resolve/"
            got = {p.split("/", 5)[-1] for p in hub.state.files(f"tiny/{name}") if p.startswith(prefix)}
            assert not got & set(decoys)
            assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= got


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])
def test_full_size_variant_computes_what_the_original_does(family, name, tmp_path):
    """qwen2_moe (a sigmoid-gated shared expert, a dense layer between sparse ones) and gpt_oss (stacked
    experts with biases, exported back to the hub's stacked layout and re-sharded): the padded variant
    computes what the original does; DeepSeek, whose shared experts are sized from the experts', refuses."""
    from adapmoe_cli.errors import UsageError
    from adapmoe_cli.store.export import variant_store

    small = Store.open(family(name)[1])
    big = variant_store(small, 4 * small.expert_payload_bytes, out=tmp_path / "big")
    assert big.shape.intermediate_size > small.shape.intermediate_size
    budget = {"cache.budget": len(small.shape.moe_layers) * 3}
    results = []
    for store in (small, big):
        with runtime_engine(store, budget) as eng, torch.no_grad():
            results.append((greedy(eng, PROMPT, STEPS), eng.model(torch.tensor([PROMPT])).logits))
    assert results[0][0] == results[1][0]
    assert (results[0][1] - results[1][1]).abs().max().item() <= 1e-5
    with pytest.raises(UsageError, match="deepseek_v3 experts cannot be padded"):
        variant_store(Store.open(family("deepseek_v3")[1]), 1 << 20, out=tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_quantized_experts_of_a_family_with_biases(family, tmp_path):
    """gpt_oss in int8: the weights are quantized, the biases are kept in the store's dtype, and the
    runtime computes within int8's error of the native store."""
    from adapmoe_cli.experts_format import parse_format
    from adapmoe_cli.store.export import variant_store

    native = Store.open(family("gpt_oss")[1])
    q = variant_store(native, fmt=parse_format("int8"), out=tmp_path / "int8")
    layout = {t.name: t for t in q.experts[(0, 0)].tensors}
    assert {"w1.q", "w1.s", "w3.q", "w3.s", "w2.q", "w2.s", "b1", "b3", "b2"} == set(layout)
    assert layout["w1.q"].dtype == "int8" and layout["b1"].dtype == native.dtype_name
    budget = {"cache.budget": len(native.shape.moe_layers) * native.shape.num_experts}
    logits = []
    for store in (native, q):
        with runtime_engine(store, budget) as eng, torch.no_grad():
            logits.append(eng.model(torch.tensor([PROMPT])).logits)
    err = (logits[0] - logits[1]).abs().max().item()
    assert 0 < err <= 0.05 * logits[0].abs().max().item()


def test_gpt_oss_mxfp4_checkpoint_as_published(tmp_path, monkeypatch, capsys):
    """GPT-OSS as the hub publishes it: experts in MXFP4 (`_blocks`, `_scales`, a quantization_config).
    Sharded, the experts are dequantized exactly, and the runtime equals transformers' own model loaded
    from the same checkpoint (Mxfp4Config(dequantize=True)); the store is a plain model (no
    quantization_config) that records where it came from. A checkpoint quantized some other way is refused
    in one line."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    ckpt = write_family_checkpoint(tmp_path / "ckpt", "gpt_oss", dtype=torch.bfloat16, mxfp4=True,
                                   intermediate_size=64)
    names = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    shard(ckpt, tmp_path / "store", dtype="float32")
    store = Store.open(tmp_path / "store")
    assert "quantization_config" not in store.config
    assert store.manifest["source"]["quantization"]["quant_method"] == "mxfp4"
    ref = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=Mxfp4Config(dequantize=True),
                                               dtype=torch.float32).eval()
    with runtime_engine(store, {"cache.budget": 2 * len(store.shape.moe_layers)}) as eng:
        assert greedy(eng, PROMPT, STEPS) == ref_greedy(ref, PROMPT, STEPS)
        with torch.no_grad():
            ours = eng.model(torch.tensor([PROMPT])).logits
            theirs = ref(torch.tensor([PROMPT])).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(ckpt), str(tmp_path / "int4"), "--experts-format", "int4")
    assert code == 0, err
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(ckpt), str(tmp_path / "fp8"))
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "quantized (fp8)" in err and not (tmp_path / "fp8").exists()


def test_mxfp4_experts_kept_at_four_bits(tmp_path, monkeypatch, capsys):
    """`--experts-format mxfp4` on a GPT-OSS MXFP4 checkpoint keeps the published codes and scales byte for
    byte (4.25 bits a weight) and computes what transformers' dequantized model does."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from adapmoe_cli.experts_format import dequantize_mxfp4, quantize_mxfp4
    from adapmoe_cli.store.reader import ExpertReader, aligned_buffer, expert_views

    w = torch.randn(8, 64) * torch.logspace(-3, 2, 8)[:, None]  # rows of very different scales
    again = dequantize_mxfp4(*quantize_mxfp4(w))
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(again)), again)  # MXFP4 values stay what they are
    step = torch.exp2(torch.ceil(torch.log2(w.abs().reshape(8, 2, 32).amax(-1) / 6)))  # the scale per 32
    assert ((again - w).abs().reshape(8, 2, 32) <= step[..., None] + 1e-12).all()  # the grid's widest gap: 2

    ckpt = write_family_checkpoint(tmp_path / "ckpt", "gpt_oss", dtype=torch.bfloat16, mxfp4=True,
                                   intermediate_size=64)
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(ckpt), str(tmp_path / "store"), "--experts-format",
                           "mxfp4", "--dtype", "float32")
    assert code == 0, err
    store = Store.open(tmp_path / "store")
    assert store.experts_format.name == "mxfp4" and store.info()["expert_bits_per_weight"] == 4.25
    name = "model.layers.1.mlp.experts.gate_up_proj"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(ckpt / index[name + "_blocks"], "pt") as f, safe_open(ckpt / index[name + "_scales"], "pt") as g:
        blocks, hub_scales = f.get_tensor(name + "_blocks")[2], g.get_tensor(name + "_scales")[2]  # expert 2
    buf = aligned_buffer(store.slot_bytes)
    with ExpertReader(store) as reader:
        views = expert_views(buf, reader.read_into(1, 2, buf))
    # the gate rows are the even rows of the hub's [2I, H] (gate and up interleaved): same bytes
    assert torch.equal(views["w1.q"], blocks[0::2].reshape(64, 32)) and torch.equal(views["w1.s"], hub_scales[0::2])
    ref = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=Mxfp4Config(dequantize=True),
                                               dtype=torch.float32).eval()
    settings = {"cache.budget": 2 * len(store.shape.moe_layers), "quantized_activations": "model"}
    with runtime_engine(store, settings) as eng:
        assert greedy(eng, PROMPT, STEPS) == ref_greedy(ref, PROMPT, STEPS)
        with torch.no_grad():
            ours = eng.model(torch.tensor([PROMPT])).logits
            theirs = ref(torch.tensor([PROMPT])).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
