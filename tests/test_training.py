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
from training.family import MIXTRAL  # noqa: E402
from training.tokenizer import CHAT_TEMPLATE  # noqa: E402
from training.train import model_config, parameter_counts  # noqa: E402


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


def test_hub_export_of_a_tiny_mixtral_round_trips(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

        def __len__(self) -> int:
            return 64

    args = argparse.Namespace(hidden=32, intermediate=16, layers=2, heads=4, kv_heads=2, aux_coef=0.01, dropout=0.0)
    torch.manual_seed(0)
    config = model_config(Tok(), args, MIXTRAL, experts=4, top_k=2)
    model = MIXTRAL.model_class()(config).eval()
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
