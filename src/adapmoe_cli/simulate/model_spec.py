"""Model shapes for the simulator, in bytes: what one expert weighs (with its quantisation), what one
layer's dense part weighs, and the output head read once per token. Either a published configuration
(`configs/models/*.yaml`, with a `bits` field for the experts' quantisation) or the trace's own model,
read from its store. Knows nothing of hardware or of traces."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapmoe_cli.budget import CacheShape
from adapmoe_cli.errors import UsageError
from adapmoe_cli.safe_io import MAX_YAML_BYTES, read_capped
from adapmoe_cli.settings import parse_yaml
from adapmoe_cli.versioned import integer

if TYPE_CHECKING:
    from adapmoe_cli.store import Store

SCALE_BYTES = 4  # an fp16 scale and an fp16 zero point per quantisation group (HQQ / GPTQ-like layouts)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int  # MoE layers
    num_experts: int
    top_k: int
    slot_bytes: int  # one expert as a cache slot holds it and a transfer moves it (with its quantisation)
    dense_bytes_per_layer: int  # attention, norms, router: read once per token per layer
    head_bytes: int  # output head, read once per token
    bits: float | None = None  # expert quantisation; None: the store's own dtype
    source: str = ""
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_experts, self.top_k, self.slot_bytes) < 1:
            raise UsageError(f"model {self.name!r}: layers, experts, top-k and expert bytes must be positive")
        if max(self.num_layers, self.num_experts) > 1 << 12 or self.top_k > self.num_experts:
            raise UsageError(f"model {self.name!r}: at most 4096 layers and experts, and top-k at most the experts")
        if min(self.dense_bytes_per_layer, self.head_bytes) < 0 or (self.bits is not None and not 1 <= self.bits <= 32):
            raise UsageError(f"model {self.name!r}: byte counts must be ≥ 0 and bits between 1 and 32")

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def cache_shape(self) -> CacheShape:
        """What an expert budget is measured against (`budget.py`); layers are numbered 0 … L-1."""
        return CacheShape(tuple(range(self.num_layers)), self.num_experts, self.top_k, self.slot_bytes,
                          self.num_layers * self.dense_bytes_per_layer + self.head_bytes)

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = list(self.sources)
        return d


def shipped_dir() -> Path:
    return Path(str(resources.files("adapmoe_cli").joinpath("configs", "models")))


def known() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


def quantized_expert_bytes(hidden: int, intermediate: int, bits: float, group_size: int = 64, parts: int = 3) -> int:
    """Gate, up and down projections of one SwiGLU expert; below 16 bits, plus a scale and zero per group."""
    params = parts * hidden * intermediate
    scales = 0 if bits >= 16 else (params // group_size) * SCALE_BYTES
    return int(params * bits / 8) + scales


#: what each key of a model YAML may hold: (integer?, lowest, highest); anything else is one line naming the key
#: (a hidden size of 10^29, negative heads and `true` for a size were taken as they came, or truncated)
LIMITS: dict[str, tuple[bool, float, float]] = {
    "hidden_size": (True, 1, 1 << 20), "intermediate_size": (True, 1, 1 << 22),
    "moe_intermediate_size": (True, 1, 1 << 22), "num_attention_heads": (True, 1, 1 << 12),
    "num_key_value_heads": (True, 1, 1 << 12), "head_dim": (True, 1, 1 << 14), "num_experts": (True, 1, 1 << 12),
    "top_k": (True, 1, 1 << 12), "num_layers": (True, 1, 1 << 12), "vocab_size": (True, 1, 1 << 24),
    "group_size": (True, 1, 1 << 20), "attention_params": (True, 1, 1 << 40),
    "shared_expert_intermediate_size": (True, 0, 1 << 22), "dense_layers": (True, 0, 1 << 12),
    "dense_intermediate_size": (True, 0, 1 << 22), "bits": (False, 1, 32), "dense_bits": (False, 1, 32),
}


def _value(d: dict[str, Any], key: str, default: Any = None) -> Any:
    """`d[key]` checked against LIMITS (`default` when absent; KeyError when absent without one)."""
    v = d[key] if default is None else d.get(key, default)
    whole, lo, hi = LIMITS[key]
    number = isinstance(v, int | float) and not isinstance(v, bool)
    if not number or (whole and not isinstance(v, int)) or not lo <= v <= hi:
        span = f"an integer from {int(lo):,} to {int(hi):,}" if whole else f"a number from {lo:g} to {hi:g}"
        raise UsageError(f"{key} must be {span}, got {v!r}{_as_text(v)}")
    return v


def _as_text(v: Any) -> str:
    """What to add when YAML read a number as text (PyYAML takes `1e30` for a string; `1.0e+30` is a number)."""
    if not isinstance(v, str):
        return ""
    try:
        float(v)
    except ValueError:
        return ""
    return " (YAML reads this as text: write a number such as 1.0e+3)"


def from_config(d: dict[str, Any], bits: float | None = None, path: str = "") -> ModelSpec:
    """A published configuration: hidden/intermediate sizes, heads, vocabulary → bytes. Optional keys for
    the families that have them: `attention_params` (per layer, where attention is not plain multi-head:
    DeepSeek's MLA), `shared_expert_intermediate_size` (dense experts every token reads in each MoE layer)
    and `dense_layers` with `dense_intermediate_size` (dense decoder layers, their bytes spread over the MoE
    layers so that a token reads them once). Each value is checked against LIMITS."""
    try:
        h = _value(d, "hidden_size")
        inter = _value(d, "moe_intermediate_size") if "moe_intermediate_size" in d else _value(d, "intermediate_size")
        heads = _value(d, "num_attention_heads")
        kv = _value(d, "num_key_value_heads", heads)
        head_dim = _value(d, "head_dim", max(h // heads, 1))
        n_exp, dense_bits = _value(d, "num_experts"), float(_value(d, "dense_bits", 16))
        b = float(bits if bits is not None else _value(d, "bits", 16))
        layers = _value(d, "num_layers")
        # q and o are heads×head_dim wide, k and v kv_heads×head_dim (unless given); the router is E×H; two norms
        attn = (_value(d, "attention_params") if d.get("attention_params")
                else h * heads * head_dim * 2 + h * kv * head_dim * 2)
        shared = 3 * h * _value(d, "shared_expert_intermediate_size", 0)
        dense_layers = _value(d, "dense_layers", 0)
        dense_ffn = 3 * h * _value(d, "dense_intermediate_size", 0)
        extra = dense_layers * (attn + dense_ffn + 2 * h) / max(layers, 1)
        dense = int((attn + h * n_exp + 2 * h + shared + extra) * dense_bits / 8)
        if not isinstance(d["name"], str) or not d["name"].strip():
            raise UsageError(f"name must be a string, got {d['name']!r}")
        return ModelSpec(
            name=d["name"] + ("" if b == 16 else f"@{b:g}bit"), num_layers=layers,
            num_experts=n_exp, top_k=_value(d, "top_k"),
            slot_bytes=quantized_expert_bytes(h, inter, b, _value(d, "group_size", 64)),
            dense_bytes_per_layer=dense, head_bytes=int(_value(d, "vocab_size") * h * dense_bits / 8), bits=b,
            source=path or d["name"], sources=_sources(d.get("sources", ())),
        )
    except UsageError as e:
        raise UsageError(f"model file {path or d.get('name')!r}: {e}") from None
    except KeyError as e:
        raise UsageError(f"model file {path or d.get('name')!r} has no {e.args[0]}; see docs/simulate.md") from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise UsageError(f"model file {path or d.get('name')!r} is malformed ({e}); see docs/simulate.md") from None


def _sources(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(s, str) for s in value) or len(value) > 64:
        raise UsageError("sources must be a list of at most 64 strings")
    return tuple(value)


def mla_attention_params(cfg: dict[str, Any]) -> int | None:
    """Parameters of one DeepSeek-style multi-head latent attention layer (None when the config has none)."""
    if not cfg.get("kv_lora_rank"):
        return None
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    nope, rope, v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
    kv_rank, q_rank = int(cfg["kv_lora_rank"]), int(cfg.get("q_lora_rank") or 0)
    q = h * q_rank + q_rank + q_rank * heads * (nope + rope) if q_rank else h * heads * (nope + rope)
    return q + h * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v) + heads * v * h


_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float8_e4m3fn": 8}


def from_hf_config(cfg: dict[str, Any], name: str, bits: float | None = None) -> ModelSpec:
    """A Hugging Face `config.json` of an MoE model (Mixtral, Qwen-MoE, OLMoE, DeepSeek, … key names) →
    bytes. MoE layers are the decoder layers less the dense ones (`first_k_dense_replace`,
    `mlp_only_layers`, `decoder_sparse_step`); shared experts and dense layers count as dense bytes, and
    DeepSeek's latent attention by its own sizes."""
    def first(*keys: str) -> Any:
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        raise UsageError(f"{name}: config.json has none of {', '.join(keys)}: is it a Mixture-of-Experts model?")

    def count(value: Any, key: str, lo: int) -> int:
        return integer(value, f"{name}: config.json's {key}", UsageError, lo, MAX_COUNT)

    layers = count(first("num_hidden_layers", "n_layer", "num_layers"), "num_hidden_layers", 1)
    dense_first = count(cfg.get("first_k_dense_replace") or 0, "first_k_dense_replace", 0)
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list):
        raise UsageError(f"{name}: config.json's mlp_only_layers must be a list of layer numbers, got {only!r}")
    dense_layers = set(range(min(dense_first, layers))) | {count(i, "mlp_only_layers", 0) for i in only}
    step = count(cfg.get("decoder_sparse_step") or 1, "decoder_sparse_step", 1)
    moe = [i for i in range(layers) if i not in dense_layers and (i + 1) % step == 0]
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    d = {
        "name": name, "num_layers": len(moe), "hidden_size": first("hidden_size", "d_model"),
        "num_experts": first("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"),
        "top_k": first("num_experts_per_tok", "moe_top_k", "top_k"),
        "moe_intermediate_size": first("moe_intermediate_size", "expert_intermediate_size", "intermediate_size"),
        "num_attention_heads": first("num_attention_heads", "n_head"),
        "num_key_value_heads": cfg.get("num_key_value_heads") or first("num_attention_heads", "n_head"),
        "vocab_size": first("vocab_size"), "bits": _DTYPE_BITS.get(dtype, 16), "dense_bits": _DTYPE_BITS.get(dtype, 16),
    }
    if cfg.get("head_dim"):
        d["head_dim"] = cfg["head_dim"]
    shared = cfg.get("shared_expert_intermediate_size") or (
        int(cfg.get("n_shared_experts") or 0) * int(d["moe_intermediate_size"]))
    if shared:
        d["shared_expert_intermediate_size"] = shared
    if layers - len(moe) and cfg.get("intermediate_size"):
        d["dense_layers"], d["dense_intermediate_size"] = layers - len(moe), cfg["intermediate_size"]
    try:
        mla = mla_attention_params(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{name}: config.json's latent attention sizes are incomplete ({e!r})") from None
    if mla:
        d["attention_params"] = mla
    if not moe:
        raise UsageError(f"{name}: no Mixture-of-Experts layer in this config")
    return from_config(d, bits, name)


#: the most of anything a config counts (layers, a layer number) that `from_hf_config` takes; ModelSpec allows at
#: most 4096 MoE layers. Checked before anything is built from it: a range of 10^12 layer numbers filled the memory
MAX_COUNT = 1 << 12


def load_model(name_or_file: str, bits: float | None = None) -> ModelSpec:
    if bits is not None and not 1 <= bits <= 32:
        raise UsageError(f"--bits must be between 1 and 32, got {bits}")
    p = Path(name_or_file).expanduser()
    if not (p.suffix in (".yaml", ".yml") or p.exists()):
        p = shipped_dir() / f"{name_or_file}.yaml"
        if not p.exists():
            raise UsageError(f"unknown model config {name_or_file!r}: choose one of {', '.join(known())} "
                             "or give a YAML file")
    d = parse_yaml(read_capped(p, MAX_YAML_BYTES, f"model config {p}", UsageError, follow=True), f"model config {p}")
    if not isinstance(d, dict):
        raise UsageError(f"model config {p} is not a YAML mapping")
    return from_config(d, bits, str(p))


def from_store(store: Store) -> ModelSpec:
    """The store's own model: an expert is what a cache slot holds and a read moves (its aligned length);
    the dense part per layer is the dense weights less embeddings and head, over the layers."""
    shape, cfg = store.shape, store.config
    elem = store.dtype.itemsize if hasattr(store.dtype, "itemsize") else 2
    vocab_h = int(cfg.get("vocab_size", 0)) * shape.hidden_size * elem
    tied = bool(cfg.get("tie_word_embeddings"))
    per_layer = max(0, store.dense_bytes - vocab_h * (1 if tied else 2)) // shape.num_layers
    return ModelSpec(
        name=f"{store.family.model_type} store ({store.path.name})", num_layers=len(shape.moe_layers),
        num_experts=shape.num_experts, top_k=shape.top_k, slot_bytes=store.slot_bytes,
        dense_bytes_per_layer=per_layer, head_bytes=vocab_h, bits=None, source=str(store.path),
    )
