"""The supported families, one row each. Hub names are those the published checkpoints use (and
transformers' `save_pretrained` writes back, conversion_mapping.py); `defaults` are the transformers
config class's for the keys a config.json may omit (tests/test_families.py checks both)."""

from __future__ import annotations

from typing import Any

from adapmoe_cli.families.base import (
    FusedExperts,
    ModelFamily,
    after_dense_layers,
    never,
    norm_topk_prob,
    sparse_step_layers,
)

MIXTRAL_PARTS = {"w1": "w1", "w3": "w3", "w2": "w2"}
PROJ_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
BLOCK_SPARSE = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight"
MLP_EXPERTS = "model.layers.{layer}.mlp.experts.{expert}.{part}.weight"

GPT_OSS_EXPERTS = "model.layers.{layer}.mlp.experts."


def _gpt_oss_rows(h: int, i: int) -> dict[str, tuple[int, ...]]:
    # x @ gate_up [H, 2I] with gate and up interleaved (even, odd columns); x @ down [I, H]
    return {"gate_up": (h, 2 * i), "gate_up_bias": (2 * i,), "down": (i, h), "down_bias": (h,)}


def _gpt_oss_split(rows: Any) -> dict[str, Any]:
    gu, gub = rows["gate_up"], rows["gate_up_bias"]
    return {"w1": gu[:, 0::2].T.contiguous(), "w3": gu[:, 1::2].T.contiguous(), "w2": rows["down"].T.contiguous(),
            "b1": gub[0::2].contiguous(), "b3": gub[1::2].contiguous(), "b2": rows["down_bias"].contiguous()}


def _gpt_oss_join(parts: Any) -> dict[str, Any]:
    w1, w3, b1, b3 = parts["w1"], parts["w3"], parts["b1"], parts["b3"]
    gu = w1.new_empty((w1.shape[1], 2 * w1.shape[0]))
    gu[:, 0::2], gu[:, 1::2] = w1.T, w3.T
    gub = b1.new_empty((2 * b1.shape[0],))
    gub[0::2], gub[1::2] = b1, b3
    return {"gate_up": gu, "gate_up_bias": gub, "down": parts["w2"].T.contiguous(), "down_bias": parts["b2"]}


GPT_OSS_FUSED = FusedExperts(
    tensors={"gate_up": GPT_OSS_EXPERTS + "gate_up_proj", "gate_up_bias": GPT_OSS_EXPERTS + "gate_up_proj_bias",
             "down": GPT_OSS_EXPERTS + "down_proj", "down_bias": GPT_OSS_EXPERTS + "down_proj_bias"},
    rows=_gpt_oss_rows, split=_gpt_oss_split, join=_gpt_oss_join, mxfp4=("gate_up", "down"))

FAMILY_ROWS: tuple[ModelFamily, ...] = (
    # softmax over all experts, top-k, renormalised
    ModelFamily("mixtral", "MixtralForCausalLM", "num_local_experts", "intermediate_size", BLOCK_SPARSE,
                MIXTRAL_PARTS, dense_renames=((".block_sparse_moe.", ".mlp."),),
                aliases={"num_experts": "num_local_experts"}),
    # sparsemixer: each kept weight a masked softmax of its own, not renormalised
    ModelFamily("phimoe", "PhimoeForCausalLM", "num_local_experts", "intermediate_size", BLOCK_SPARSE,
                MIXTRAL_PARTS, renormalises=never, router_attr="router", ordered=False,
                dense_renames=((".block_sparse_moe.gate.", ".mlp.router."), (".block_sparse_moe.", ".mlp."))),
    # softmax, top-k, renormalised when norm_topk_prob; a shared expert with its own sigmoid gate
    ModelFamily("qwen2_moe", "Qwen2MoeForCausalLM", "num_experts", "moe_intermediate_size", MLP_EXPERTS,
                PROJ_PARTS, moe_layers=sparse_step_layers, renormalises=norm_topk_prob,
                defaults={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False}),
    ModelFamily("qwen3_moe", "Qwen3MoeForCausalLM", "num_experts", "moe_intermediate_size", MLP_EXPERTS,
                PROJ_PARTS, moe_layers=sparse_step_layers, renormalises=norm_topk_prob,
                defaults={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False},
                aliases={"num_local_experts": "num_experts"}),
    ModelFamily("olmoe", "OlmoeForCausalLM", "num_experts", "intermediate_size", MLP_EXPERTS, PROJ_PARTS,
                renormalises=norm_topk_prob, defaults={"norm_topk_prob": False},
                aliases={"num_local_experts": "num_experts"}),
    # softmax (greedy or group-limited), × routed_scaling_factor, never renormalised; shared experts whose
    # size is a multiple of the expert's (so the intermediate size cannot be padded alone); dense first layers
    ModelFamily("deepseek_v2", "DeepseekV2ForCausalLM", "n_routed_experts", "moe_intermediate_size",
                MLP_EXPERTS, PROJ_PARTS, moe_layers=after_dense_layers, renormalises=never, pads=False, ordered=False,
                defaults={"first_k_dense_replace": 0}, aliases={"num_experts": "n_routed_experts"}),
    # sigmoid scores + correction bias, grouped top-k, renormalised when norm_topk_prob, × scaling factor
    ModelFamily("deepseek_v3", "DeepseekV3ForCausalLM", "n_routed_experts", "moe_intermediate_size",
                MLP_EXPERTS, PROJ_PARTS, moe_layers=after_dense_layers, renormalises=norm_topk_prob, pads=False,
                ordered=False,
                defaults={"first_k_dense_replace": 3, "norm_topk_prob": True},
                aliases={"num_local_experts": "n_routed_experts"}),
    ModelFamily("glm4_moe", "Glm4MoeForCausalLM", "n_routed_experts", "moe_intermediate_size", MLP_EXPERTS,
                PROJ_PARTS, moe_layers=after_dense_layers, renormalises=norm_topk_prob, pads=False, ordered=False,
                defaults={"first_k_dense_replace": 1, "norm_topk_prob": True},
                aliases={"num_local_experts": "n_routed_experts"}),
    # logits (with a bias) → top-k → softmax over the k (renormalised by construction); experts stacked on
    # the hub (MXFP4 as published, or bf16), with biases and a clamped SwiGLU
    ModelFamily("gpt_oss", "GptOssForCausalLM", "num_local_experts", "intermediate_size", "", {},
                router_attr="router", fused=GPT_OSS_FUSED, biases=True, activation="clamped_swiglu",
                aliases={"num_experts": "num_local_experts"}),
)

__all__ = ["FAMILY_ROWS"]
