"""What adapmoe must know about a model family: the hub's tensor names, which are experts, the shapes
the config implies, the transformers class, where the sparse-MoE block sits in a layer and how its
router turns logits into expert weights. One subclass per family, looked up by `model_type`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExpertKey:
    """A hub tensor that belongs to one expert: `part` is the family's short name (e.g. `w1`)."""

    layer: int
    expert: int
    part: str


@dataclass(frozen=True)
class MoEShape:
    """The numbers every part of the runtime needs, read once from the config."""

    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    moe_layers: tuple[int, ...]


def config_int(config: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """An integer setting of a model's config within [lo, hi]; ValueError (with the key) otherwise. The
    bounds keep a hostile or damaged config from sizing loops and buffers."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config {key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"config {key} = {value} is outside {lo}…{hi}")
    return value


class ModelFamily:
    """Base class. Subclasses set the class attributes and implement the few methods below."""

    model_type: str = ""
    #: name of the `transformers` causal-LM class, e.g. "MixtralForCausalLM"
    causal_lm_class: str = ""
    #: the per-expert tensor parts in the order they are packed into the store
    expert_parts: tuple[str, ...] = ()
    #: regex over hub names with groups (layer, expert, part)
    expert_pattern: re.Pattern[str] = re.compile(r"$^")
    #: how the router turns logits into weights; see runtime/gating.py
    routing: str = "softmax_topk_renorm"
    #: the config key of an expert's intermediate size (what `store/export.py` pads)
    intermediate_key: str = "intermediate_size"

    def moe_shape(self, config: dict[str, Any]) -> MoEShape:
        raise NotImplementedError

    def expert_key(self, name: str) -> ExpertKey | None:
        m = self.expert_pattern.fullmatch(name)
        if not m:
            return None
        return ExpertKey(int(m.group(1)), int(m.group(2)), m.group(3))

    def expert_tensor_name(self, layer: int, expert: int, part: str) -> str:
        raise NotImplementedError

    def expert_part_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Shape of each expert part as stored on the hub."""
        raise NotImplementedError

    def hub_to_model_key(self, name: str) -> str:
        """Rename a dense hub tensor to its name in the in-memory transformers model."""
        return name

    def model_to_hub_key(self, name: str) -> str:
        return name

    def is_expert_param(self, model_key: str) -> bool:
        """True for the in-memory parameters that hold expert weights (left on the meta device)."""
        raise NotImplementedError

    def moe_block(self, model: Any, layer: int) -> Any:
        raise NotImplementedError

    def set_moe_block(self, model: Any, layer: int, block: Any) -> None:
        raise NotImplementedError
