"""Builds transformers' own model for a config without allocating weights (meta device), and lists the
dense tensors that model expects in hub naming. Knows nothing of files or stores."""

from __future__ import annotations

from typing import Any

import torch

from adapmoe_cli.families import ModelFamily


def config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config it cannot build a model from (wrong types, bad values)."""
    from huggingface_hub.errors import StrictDataclassError

    return (TypeError, ValueError, KeyError, AttributeError, StrictDataclassError)


def describe(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split()) or type(e).__name__


def hf_config(config: dict[str, Any]) -> Any:
    from transformers import CONFIG_MAPPING

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    return CONFIG_MAPPING[model_type](**{k: v for k, v in cfg.items() if k != "transformers_version"})


def without_transformers_hqq() -> None:
    """Keep transformers from importing hqq. It does so whenever hqq is installed (for its quantized KV cache,
    which adapmoe never uses), and hqq's import pulls in torch's compiler stack: 0.9–1.3 s on every start of
    the runtime here (3.9 against 4.9 s to import a family's model). adapmoe imports hqq itself where it
    quantizes experts (experts_format.py), unaffected. Does nothing once transformers' caches are imported."""
    import sys

    if "transformers.cache_utils" in sys.modules:
        return
    import transformers.utils

    transformers.utils.is_hqq_available = lambda *args, **kwargs: False


def empty_model(family: ModelFamily, config: dict[str, Any], dtype: torch.dtype = torch.float32) -> Any:
    """The causal-LM module with every parameter on the meta device; buffers are rebuilt by the caller
    (see `engine.materialise_buffers`)."""
    without_transformers_hqq()
    import transformers

    cls = getattr(transformers, family.causal_lm_class)
    cfg = hf_config(config)
    cfg.dtype = dtype
    with torch.device("meta"):
        model = cls(cfg)
    return model.to(dtype=dtype)


def expected_dense_tensors(family: ModelFamily, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hub name → shape of every non-expert tensor a checkpoint of this config must contain."""
    model = empty_model(family, config)
    tied = bool(config.get("tie_word_embeddings", False))
    out: dict[str, tuple[int, ...]] = {}
    for key, tensor in model.state_dict().items():
        if family.is_expert_param(key) or (tied and key == "lm_head.weight"):
            continue
        out[family.model_to_hub_key(key)] = tuple(tensor.shape)
    return out
