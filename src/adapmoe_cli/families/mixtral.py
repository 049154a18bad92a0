"""Mixtral (and Mixtral-layout checkpoints): experts `w1` (gate, I×H), `w3` (up, I×H), `w2` (down, H×I)
under `block_sparse_moe` on the hub; transformers 5 keeps the block at `layer.mlp` with fused experts.
Routing: softmax over all experts in float32, top-k, renormalise the k weights."""

from __future__ import annotations

import re
from typing import Any

from adapmoe_cli.families.base import ModelFamily, MoEShape, config_int


class Mixtral(ModelFamily):
    model_type = "mixtral"
    causal_lm_class = "MixtralForCausalLM"
    expert_parts = ("w1", "w3", "w2")
    expert_pattern = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
    routing = "softmax_topk_renorm"

    def moe_shape(self, config: dict[str, Any]) -> MoEShape:
        n = config_int(config, "num_hidden_layers", 1, 1 << 10)
        experts = config_int(config, "num_local_experts", 1, 1 << 12)
        return MoEShape(
            num_layers=n,
            num_experts=experts,
            top_k=config_int(config, "num_experts_per_tok", 1, experts),
            hidden_size=config_int(config, "hidden_size", 1, 1 << 17),
            intermediate_size=config_int(config, "intermediate_size", 1, 1 << 19),
            moe_layers=tuple(range(n)),
        )

    def expert_tensor_name(self, layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight"

    def expert_part_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        h, i = int(config["hidden_size"]), int(config["intermediate_size"])
        return {"w1": (i, h), "w3": (i, h), "w2": (h, i)}

    def hub_to_model_key(self, name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")

    def model_to_hub_key(self, name: str) -> str:
        return name.replace(".mlp.", ".block_sparse_moe.")

    def is_expert_param(self, model_key: str) -> bool:
        return ".mlp.experts." in model_key

    def moe_block(self, model: Any, layer: int) -> Any:
        return model.model.layers[layer].mlp

    def set_moe_block(self, model: Any, layer: int, block: Any) -> None:
        model.model.layers[layer].mlp = block
