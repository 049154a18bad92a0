"""The `training` package behind scripts/train_default_model.py, without training anything: the document
split, the Python chat rendering against the jinja template, and the hub export of a tiny random Mixtral."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from training.corpus import SYSTEM_PROMPT, render_chat, split_of  # noqa: E402
from training.export import hub_state_dict, reload_and_verify  # noqa: E402
from training.family import MIXTRAL, QWEN3_MOE  # noqa: E402
from training.tokenizer import CHAT_TEMPLATE  # noqa: E402
from training.train import balance_loss, model_config, parameter_counts  # noqa: E402


def test_split_is_deterministic_and_about_90_5_5() -> None:
    keys = [f"stdlib:module{i}" for i in range(4000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    counts = Counter(splits)
    assert set(counts) == {"train", "calibration", "heldout"}
    assert 0.87 < counts["train"] / len(keys) < 0.93
    assert 0.035 < counts["calibration"] / len(keys) < 0.065
    assert 0.035 < counts["heldout"] / len(keys) < 0.065


def test_render_chat_matches_the_jinja_template() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A mutable sequence.\n\nSee also tuple."}]
    for prompt in (False, True):
        rendered, _ = render_jinja_template([messages], chat_template=CHAT_TEMPLATE, add_generation_prompt=prompt,
                                            bos_token="<s>")
        assert rendered[0] == render_chat(messages, generation_prompt=prompt)


class Tok:
    """What `model_config` reads of a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self) -> int:
        return 64


def tiny_model(family, intermediate: int, experts: int, top_k: int):
    args = argparse.Namespace(hidden=32, intermediate=intermediate, layers=2, heads=4, kv_heads=2, aux_coef=0.01,
                              dropout=0.0)
    torch.manual_seed(0)
    config = model_config(Tok(), args, family, experts=experts, top_k=top_k)
    return config, family.model_class()(config).eval()


def test_hub_export_of_a_tiny_mixtral_round_trips(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    config, model = tiny_model(MIXTRAL, 16, 4, 2)
    tensors = hub_state_dict(model)
    for layer in range(2):
        assert f"model.layers.{layer}.block_sparse_moe.gate.weight" in tensors
        for e in range(4):
            base = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            assert tensors[f"{base}.w1.weight"].shape == tensors[f"{base}.w3.weight"].shape == (16, 32)
            assert tensors[f"{base}.w2.weight"].shape == (32, 16)
    assert not any(".mlp." in k for k in tensors)
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}

    params, active = parameter_counts(model)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert params == sum(v.numel() for v in tensors.values())
    assert active == params - expert_params // 2  # top-2 of 4 experts

    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(tmp_path))
    reload_and_verify(model, tmp_path, torch.randint(0, 64, (4, 9)))  # raises unless bit-exact after bf16


def test_hub_export_of_a_tiny_qwen3_moe_round_trips(tmp_path: Path) -> None:
    """The fine-grained embedded model's family: per-expert gate/up/down_proj under `mlp.experts.E`."""
    from safetensors.torch import save_file

    config, model = tiny_model(QWEN3_MOE, 8, 6, 3)
    assert config.norm_topk_prob and config.num_experts == 6 and config.mlp_only_layers == []
    tensors = hub_state_dict(model, QWEN3_MOE)
    assert tensors["model.layers.1.mlp.experts.5.gate_proj.weight"].shape == (8, 32)
    assert tensors["model.layers.1.mlp.experts.5.down_proj.weight"].shape == (32, 8)
    assert "model.layers.0.mlp.gate.weight" in tensors and not any("experts.gate_up_proj" in k for k in tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(tmp_path))
    reload_and_verify(model, tmp_path, torch.randint(0, 64, (4, 9)), QWEN3_MOE)


def test_balance_loss_is_per_layer():
    """1 when every layer spreads its choices and probability evenly; two layers lopsided in opposite
    directions look balanced to the pooled loss (transformers') but not to the per-layer one."""
    even = torch.zeros(64, 4)  # a uniform router: P even, so the loss is 1 whichever expert top-k picks
    assert float(balance_loss((even, even), top_k=1)) == 1.0
    skew_a = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]]).repeat(32, 1)  # experts 0, 1 only
    skew_b = torch.tensor([[0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 4.0]]).repeat(32, 1)  # experts 2, 3 only
    pooled = float(balance_loss((skew_a, skew_b), top_k=1, per_layer=False))
    per_layer = float(balance_loss((skew_a, skew_b), top_k=1))
    assert pooled < 1.1 < 1.5 < per_layer
