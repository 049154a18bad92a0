"""What adapmoe must know about a model family, as one table row (`ModelFamily`): the config keys of its
MoE shape (with transformers' defaults for the keys a config may leave out), which layers are sparse, the
hub names of its expert tensors, how its dense hub names map onto transformers' module names, where the
router sits in the MoE block, and whether the router renormalises the kept weights (what dropping an
expert means, docs/gating.md). Everything else — the router's own maths, shared experts, attention,
norms — stays transformers' own module; the runtime replaces only the block's `experts` module (the
experts seam of `transformers.integrations.moe`, runtime/moe_block.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: the parts of one expert, in the order they are packed into the store: gate (w1), up (w3), down (w2) …
EXPERT_PARTS = ("w1", "w3", "w2")
#: … and, for families whose experts have biases, theirs (always kept in the store's dtype, never quantized)
BIAS_PARTS = ("b1", "b3", "b2")


def is_weight(part: str) -> bool:
    """A weight matrix (what an experts format may quantize), not a bias."""
    return part in EXPERT_PARTS


@dataclass(frozen=True)
class FusedExperts:
    """A family whose hub checkpoints stack a layer's experts in a few tensors (experts along dim 0)."""

    #: kind → hub name of the stacked tensor, with {layer}
    tensors: Mapping[str, str]
    #: (hidden, intermediate) → kind → the shape of one expert's row
    rows: Callable[[int, int], dict[str, tuple[int, ...]]]
    #: one expert's rows → adapmoe's parts (w1 [I, H], w3 [I, H], w2 [H, I], biases)
    split: Callable[[Mapping[str, Any]], dict[str, Any]]
    #: adapmoe's parts → one expert's rows (export)
    join: Callable[[Mapping[str, Any]], dict[str, Any]]
    #: kinds an MXFP4 checkpoint (`quantization_config.quant_method: mxfp4`) holds as `NAME_blocks`
    #: [E, out, in/32, 16] and `NAME_scales` [E, out, in/32]: the row transposed, 4-bit E2M1 values two to
    #: a byte (low nibble first) with one power-of-two scale (E8M0) per 32 along `in`
    mxfp4: tuple[str, ...] = ()


def quant_method(config: Mapping[str, Any]) -> str | None:
    """The checkpoint's `quantization_config.quant_method` (None: plain weights)."""
    q = config.get("quantization_config")
    return str(q.get("quant_method")) if isinstance(q, dict) else (None if q is None else "?")


@dataclass(frozen=True)
class ExpertKey:
    """A hub tensor that belongs to one expert: `part` is adapmoe's name for it (`w1`, `w3`, `w2`)."""

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


def config_int(config: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    """An integer setting of a model's config within [lo, hi]; ValueError (with the key) otherwise. The
    bounds keep a hostile or damaged config from sizing loops and buffers."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config {key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"config {key} = {value} is outside {lo}…{hi}")
    return value


def every_layer(config: Mapping[str, Any], n: int) -> tuple[int, ...]:
    return tuple(range(n))


def after_dense_layers(config: Mapping[str, Any], n: int) -> tuple[int, ...]:
    """DeepSeek, GLM: the first `first_k_dense_replace` layers are dense."""
    first = config_int(config, "first_k_dense_replace", 0, n)
    return tuple(range(first, n))


def sparse_step_layers(config: Mapping[str, Any], n: int) -> tuple[int, ...]:
    """Qwen2/3-MoE: every `decoder_sparse_step`-th layer is sparse, except those in `mlp_only_layers`."""
    step = config_int(config, "decoder_sparse_step", 1, max(n, 1))
    only = config.get("mlp_only_layers")
    if not isinstance(only, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in only):
        raise ValueError(f"config mlp_only_layers must be a list of layer numbers, got {only!r}")
    return tuple(layer for layer in range(n) if layer not in only and (layer + 1) % step == 0)


def always(config: Mapping[str, Any]) -> bool:
    return True


def never(config: Mapping[str, Any]) -> bool:
    return False


def norm_topk_prob(config: Mapping[str, Any]) -> bool:
    value = config.get("norm_topk_prob")
    if not isinstance(value, bool):
        raise ValueError(f"config norm_topk_prob must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelFamily:
    """One supported `model_type`. Adding a family is adding one of these (families/__init__.py)."""

    model_type: str
    #: name of the `transformers` causal-LM class, e.g. "MixtralForCausalLM"
    causal_lm_class: str
    #: config key of the routed experts per MoE layer
    experts_key: str
    #: config key of one expert's intermediate size (what `store/export.py` pads)
    intermediate_key: str
    #: hub name of one expert tensor, with {layer}, {expert} and {part} (the hub's part name); "" when fused
    hub_expert_name: str
    #: adapmoe's part (w1 gate, w3 up, w2 down) → the hub's name for it
    hub_parts: Mapping[str, str]
    #: (config with defaults, number of layers) → the sparse layers
    moe_layers: Callable[[Mapping[str, Any], int], tuple[int, ...]] = every_layer
    #: whether the router rescales its kept weights to a fixed total (then a dropped expert's weight goes
    #: to the kept ones in proportion; otherwise the kept weights stay as the router gave them)
    renormalises: Callable[[Mapping[str, Any]], bool] = always
    #: hub substring → model substring for dense tensors, applied in order (and in reverse order back)
    dense_renames: tuple[tuple[str, str], ...] = ()
    #: attribute of the router inside the MoE block (`gate`, or `router`)
    router_attr: str = "gate"
    #: whether the router returns its k weights in descending order (a sorted `torch.topk` on the weights
    #: themselves); otherwise the runtime orders them (tests/test_families.py would catch a wrong `True`)
    ordered: bool = True
    #: whether a full-size variant may pad the intermediate dimension (not when dense weights depend on it)
    pads: bool = True
    #: transformers' defaults of the config keys the functions above read (checked by tests)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: another name a config.json may give a key (transformers' `attribute_map`) → the name read here
    aliases: Mapping[str, str] = field(default_factory=dict)
    #: the hub's stacked expert tensors, for families that fuse them (then hub_expert_name is unused)
    fused: FusedExperts | None = None
    #: whether each expert has biases (b1, b3, b2)
    biases: bool = False
    #: the gated activation: `act` (act_fn(gate) × up, the experts module's act_fn) or `clamped_swiglu`
    #: (GPT-OSS: gate and up clamped, gate × sigmoid(α gate) × (up + 1), α and the limit from the module)
    activation: str = "act"

    def __post_init__(self) -> None:
        alt = "|".join(re.escape(p) for p in self.hub_parts.values()) or "$^"
        pattern = (re.escape(self.hub_expert_name).replace(r"\{layer\}", r"(\d+)")
                   .replace(r"\{expert\}", r"(\d+)").replace(r"\{part\}", f"({alt})")) or "$^"
        object.__setattr__(self, "_pattern", re.compile(pattern))
        object.__setattr__(self, "_part_of", {hub: part for part, hub in self.hub_parts.items()})
        fused = "|".join(re.escape(t).replace(r"\{layer\}", r"\d+") + "(?:_blocks|_scales)?"
                         for t in (self.fused.tensors.values() if self.fused else ())) or "$^"
        object.__setattr__(self, "_fused_pattern", re.compile(fused))

    @property
    def expert_parts(self) -> tuple[str, ...]:
        """The parts of one expert in the order they are packed into the store."""
        return EXPERT_PARTS + (BIAS_PARTS if self.biases else ())

    def settings(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The config with transformers' defaults for the keys it leaves out (and aliases resolved)."""
        named = {key: config[alias] for alias, key in self.aliases.items() if alias in config and key not in config}
        return {**self.defaults, **named, **config}

    def moe_shape(self, config: Mapping[str, Any]) -> MoEShape:
        cfg = self.settings(config)
        n = config_int(cfg, "num_hidden_layers", 1, 1 << 10)
        experts = config_int(cfg, self.experts_key, 1, 1 << 12)
        layers = self.moe_layers(cfg, n)
        if not layers:
            raise ValueError("the config has no MoE layer: there are no experts to offload")
        return MoEShape(
            num_layers=n,
            num_experts=experts,
            top_k=config_int(cfg, "num_experts_per_tok", 1, experts),
            hidden_size=config_int(cfg, "hidden_size", 1, 1 << 17),
            intermediate_size=config_int(cfg, self.intermediate_key, 1, 1 << 19),
            moe_layers=layers,
        )

    def router_renormalises(self, config: Mapping[str, Any]) -> bool:
        return self.renormalises(self.settings(config))

    def expert_key(self, name: str) -> ExpertKey | None:
        m = self._pattern.fullmatch(name)  # type: ignore[attr-defined]
        if not m:
            return None
        return ExpertKey(int(m.group(1)), int(m.group(2)), self._part_of[m.group(3)])  # type: ignore[attr-defined]

    def expert_tensor_name(self, layer: int, expert: int, part: str) -> str:
        return self.hub_expert_name.format(layer=layer, expert=expert, part=self.hub_parts[part])

    def expert_part_shapes(self, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Shape of each expert part as the store holds it (nn.Linear layout: out × in)."""
        cfg = self.settings(config)
        h, i = int(cfg["hidden_size"]), int(cfg[self.intermediate_key])
        shapes: dict[str, tuple[int, ...]] = {"w1": (i, h), "w3": (i, h), "w2": (h, i)}
        if self.biases:
            shapes.update({"b1": (i,), "b3": (i,), "b2": (h,)})
        return shapes

    def expert_tensor_shapes(self, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Hub name → shape of every expert tensor a checkpoint of this config holds."""
        shape = self.moe_shape(config)
        out: dict[str, tuple[int, ...]] = {}
        if self.fused is not None:
            rows = self.fused.rows(shape.hidden_size, shape.intermediate_size)
            mx = self.fused.mxfp4 if self.reads_mxfp4(config) else ()
            for layer in shape.moe_layers:
                for kind, name in self.fused.tensors.items():
                    name = name.format(layer=layer)
                    if kind in mx:
                        n_in, n_out = rows[kind]
                        out[name + "_blocks"] = (shape.num_experts, n_out, n_in // 32, 16)
                        out[name + "_scales"] = (shape.num_experts, n_out, n_in // 32)
                    else:
                        out[name] = (shape.num_experts, *rows[kind])
            return out
        parts = self.expert_part_shapes(config)
        for layer in shape.moe_layers:
            for e in range(shape.num_experts):
                for part, s in parts.items():
                    out[self.expert_tensor_name(layer, e, part)] = s
        return out

    def reads_mxfp4(self, config: Mapping[str, Any]) -> bool:
        """A checkpoint whose fused experts are MXFP4 (what the hub holds for GPT-OSS)."""
        return quant_method(config) == "mxfp4" and self.fused is not None and bool(self.fused.mxfp4)

    def is_expert_tensor(self, name: str) -> bool:
        """A hub tensor holding expert weights (one expert's part, or a fused family's stacked tensor)."""
        return self.expert_key(name) is not None or bool(self._fused_pattern.fullmatch(name))  # type: ignore[attr-defined]

    def hub_to_model_key(self, name: str) -> str:
        """Rename a dense hub tensor to its name in the in-memory transformers model."""
        for hub, model in self.dense_renames:
            name = name.replace(hub, model)
        return name

    def model_to_hub_key(self, name: str) -> str:
        for hub, model in self.dense_renames:
            name = name.replace(model, hub)
        return name

    def is_expert_param(self, model_key: str) -> bool:
        """True for the in-memory parameters that hold expert weights (never loaded: the block's experts
        module is replaced)."""
        return ".mlp.experts." in model_key

    def moe_block(self, model: Any, layer: int) -> Any:
        """The family's own sparse-MoE block of `layer` (router, experts, shared experts …)."""
        return model.model.layers[layer].mlp

    def router(self, model: Any, layer: int) -> Any:
        return getattr(self.moe_block(model, layer), self.router_attr)

    def experts(self, model: Any, layer: int) -> Any:
        return self.moe_block(model, layer).experts

    def set_experts(self, model: Any, layer: int, experts: Any) -> None:
        self.moe_block(model, layer).experts = experts
