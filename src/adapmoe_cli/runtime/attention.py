"""Attention of one decoded token on the CPU, grouped-query heads packed onto their key/value head.

transformers' `sdpa` attention hands a single query with grouped-query heads (Mixtral: 32 query heads on 8
key/value heads) to `scaled_dot_product_attention(..., enable_gqa=True)` when there is no mask. PyTorch's
CPU kernels then go over each key/value head once per query head that shares it. Packing instead puts a
key/value head's G query heads where the query positions go (`(batch, heads, 1, dim)` →
`(batch, kv_heads, G, dim)`): one pass over each key/value head answers all G queries, the same arithmetic
per query (a single query sees every held position, so nothing needs a causal mask). transformers packs
this way itself (`pack_gqa`, which this module calls) only where a mask is given and it is not being compiled.

`adapmoe_sdpa` is transformers' `sdpa` (its masks, its function for prompts, other devices and everything
else) with that one case packed; `use_packed_attention` switches a model that runs `sdpa` to it. Other
implementations (gpt-oss's eager attention with its sinks) are left as they are. docs/performance.md,
"Attention of a decoded token" has the measurements."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "adapmoe_sdpa"
#: transformers' sdpa_attention_forward and pack_gqa, bound by use_packed_attention (transformers is imported
#: after skeleton.without_transformers_hqq has run, not when this module is)
_sdpa: Any = None
_pack: Any = None


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    heads, q_len = query.shape[1], query.shape[2]
    kv_heads = key.shape[1]  # the keys' own heads (multi-head latent attention hands every head its keys)
    if (q_len != 1 or kv_heads == heads or heads % kv_heads or query.device.type != "cpu" or dropout != 0.0
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions", False)):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = heads // kv_heads  # (a mask per query head is packed as its query is; one shared by all is kept)
    out = F.scaled_dot_product_attention(_pack(query, groups), key, value, attn_mask=_pack(attention_mask, groups),
                                         scale=scaling)
    return out.reshape(out.shape[0], heads, 1, out.shape[-1]).transpose(1, 2).contiguous(), None


def use_packed_attention(model: Any) -> bool:
    """Run `model`'s attention through `adapmoe_sdpa` where it runs transformers' `sdpa`; True if it does."""
    global _sdpa, _pack
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _sdpa, _pack = sdpa_attention_forward, pack_gqa
    ALL_ATTENTION_FUNCTIONS.register(NAME, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.config._attn_implementation = NAME
    return True
