"""The supported families, one row each. Hub names are those the published checkpoints use (and
transformers' `save_pretrained` writes back, conversion_mapping.py); `defaults` are the transformers
config class's for the keys a config.json may omit (tests/test_families.py checks both)."""

from __future__ import annotations

from adapmoe_cli.families.base import (
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
)

__all__ = ["FAMILY_ROWS"]
