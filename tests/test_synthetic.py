"""The fixture checkpoints are in the hub's exact Mixtral layout: the files, names, dtypes and tokenizer
that a real download has, and transformers' own `MixtralForCausalLM.from_pretrained` loads them."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapmoe_cli.synthetic import CHAT_TEMPLATE, TinySpec, hub_tensor_shapes

ODD = TinySpec(num_hidden_layers=3, num_local_experts=5, hidden_size=48, intermediate_size=80,
               num_attention_heads=4, num_key_value_heads=1)

# Layer 0 and the top-level names of a real Mixtral-architecture index on the hub
# (WizardLM-2-8x22B, model.safetensors.index.json), verbatim, so our names are checked against the hub's.
HUB_TOP_NAMES = {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"}
HUB_LAYER0_NAMES = {
    *(f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in range(8) for w in ("w1", "w2", "w3")),
    "model.layers.0.block_sparse_moe.gate.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
}
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def _headers(ckpt: Path) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """name → (file, dtype, shape) read from the safetensors files themselves."""
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                out[name] = (f.name, sl.get_dtype(), tuple(sl.get_shape()))
    return out


@pytest.mark.parametrize("spec", [TinySpec(), ODD], ids=["tiny", "odd"])
def test_checkpoint_has_the_hub_layout(make_checkpoint: Callable[..., Path], spec: TinySpec):
    ckpt = make_checkpoint(spec)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == spec.num_local_experts
    assert config["num_key_value_heads"] == spec.num_key_value_heads

    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) >= 2
    for i, name in enumerate(shards, start=1):
        m = SHARD_NAME.fullmatch(name)
        assert m, name
        assert (int(m.group(1)), int(m.group(2))) == (i, len(shards))

    heads = _headers(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: f for n, (f, _, _) in heads.items()}
    total = sum(torch.Size(s).numel() * 2 for _, _, s in heads.values())
    assert index["metadata"]["total_size"] == total
    assert {n: s for n, (_, _, s) in heads.items()} == hub_tensor_shapes(spec)
    assert {d for _, d, _ in heads.values()} == {"BF16"}

    # the names are the hub's: layer 0 and the top level as in a real Mixtral index
    layer0 = {n for n in heads if n.startswith("model.layers.0.")}
    want0 = {n for n in HUB_LAYER0_NAMES
             if not (m := EXPERT.fullmatch(n)) or int(m.group(2)) < spec.num_local_experts}
    assert layer0 == want0
    assert {n for n in heads if not n.startswith("model.layers.")} == HUB_TOP_NAMES

    # at least one expert's w1/w2/w3 straddle a file boundary, as in real shards
    files_of: dict[tuple[int, int], set[str]] = {}
    for n, (f, _, _) in heads.items():
        if m := EXPERT.fullmatch(n):
            files_of.setdefault((int(m.group(1)), int(m.group(2))), set()).add(f)
    assert any(len(fs) > 1 for fs in files_of.values())


def test_tokenizer_and_chat_template_load_with_transformers(make_checkpoint: Callable[..., Path]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_checkpoint()))
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nhi there<|end|>\n<|assistant|>\n"
    ids = tok("The quick brown fox")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "The quick brown fox"
    assert tok.eos_token == "</s>" and tok.convert_tokens_to_ids("<|end|>") == 6


@pytest.mark.parametrize("spec", [TinySpec(), ODD], ids=["tiny", "odd"])
def test_transformers_loads_the_checkpoint_with_every_weight(make_checkpoint: Callable[..., Path], spec: TinySpec):
    from transformers import MixtralForCausalLM

    ckpt = make_checkpoint(spec)
    model, info = MixtralForCausalLM.from_pretrained(str(ckpt), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    src: dict[str, torch.Tensor] = {}
    for f in ckpt.glob("*.safetensors"):
        src.update(load_file(f))
    sd = model.state_dict()
    last = spec.num_hidden_layers - 1
    for e in range(spec.num_local_experts):
        p = f"model.layers.{last}.block_sparse_moe.experts.{e}"
        gate_up = sd[f"model.layers.{last}.mlp.experts.gate_up_proj"][e]  # [2I, H]: w1 then w3
        assert torch.equal(gate_up, torch.cat([src[f"{p}.w1.weight"], src[f"{p}.w3.weight"]]))
        assert torch.equal(sd[f"model.layers.{last}.mlp.experts.down_proj"][e], src[f"{p}.w2.weight"])
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"):
        assert torch.equal(sd[name], src[name])
    router = src[f"model.layers.{last}.block_sparse_moe.gate.weight"]
    assert torch.equal(sd[f"model.layers.{last}.mlp.gate.weight"], router)


def test_loading_info_catches_a_misnamed_tensor(make_checkpoint: Callable[..., Path], tmp_path: Path):
    """Control for the test above: a name transformers does not know is reported, so 'no missing keys'
    means the names are real."""
    from transformers import MixtralForCausalLM

    ckpt = shutil.copytree(make_checkpoint(), tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    fname = index["weight_map"].pop("model.norm.weight")
    index["weight_map"]["model.final_norm.weight"] = fname
    tensors = load_file(ckpt / fname)
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _, info = MixtralForCausalLM.from_pretrained(str(ckpt), output_loading_info=True)
    assert "model.norm.weight" in info["missing_keys"]
    assert "model.final_norm.weight" in info["unexpected_keys"]
