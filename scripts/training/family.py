"""The one place that names a model family: its transformers classes, config keys and hub tensor names.

Every other `training` module takes a `MoEFamily` argument that defaults to `MIXTRAL`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEFamily:
    """What differs between MoE architectures that share transformers 5's fused in-memory expert layout
    (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I], router `mlp.gate`)."""

    name: str  # in prose, e.g. the model card: "Mixtral"
    architecture: str  # transformers model class, also written to config.json's "architectures"
    config_class: str  # transformers config class
    experts_key: str  # config key: experts per MoE layer
    expert_intermediate_key: str  # config key: intermediate size of one expert
    hub_moe_block: str  # the hub's name for a layer's MoE block (router + experts)
    hub_expert_weights: tuple[str, str, str]  # the hub's names of one expert's gate, up and down projections
    extra_config: tuple[tuple[str, object], ...] = ()  # config keys only this family has, as the flagship sets them
    renormalises: bool = True  # the router renormalises its top-k weights to sum to 1

    def config(self, **kwargs):
        import transformers

        return getattr(transformers, self.config_class)(**kwargs)

    def model_class(self):
        import transformers

        return getattr(transformers, self.architecture)

    def num_experts(self, config) -> int:
        return getattr(config, self.experts_key)

    def hub_expert_prefix(self, layer: str | int, expert: int) -> str:
        return f"model.layers.{layer}.{self.hub_moe_block}.experts.{expert}"

    def hub_name(self, name: str) -> str:
        """Hub name of a non-expert tensor (only the router moves, with its MoE block)."""
        return name.replace(".mlp.gate.", f".{self.hub_moe_block}.gate.")


MIXTRAL = MoEFamily(
    name="Mixtral", architecture="MixtralForCausalLM", config_class="MixtralConfig",
    experts_key="num_local_experts", expert_intermediate_key="intermediate_size",
    hub_moe_block="block_sparse_moe", hub_expert_weights=("w1", "w3", "w2"),
)
# Qwen3-MoE as Qwen3-30B-A3B configures it: every layer sparse, top-k renormalised (`norm_topk_prob`)
QWEN3_MOE = MoEFamily(
    name="Qwen3-MoE", architecture="Qwen3MoeForCausalLM", config_class="Qwen3MoeConfig",
    experts_key="num_experts", expert_intermediate_key="moe_intermediate_size",
    hub_moe_block="mlp", hub_expert_weights=("gate_proj", "up_proj", "down_proj"),
    extra_config=(("norm_topk_prob", True), ("decoder_sparse_step", 1), ("mlp_only_layers", [])),
)
FAMILIES = {"mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE}
