"""Settings: one frozen, validated object built once from `configs/default.yaml`, an optional preset
(`--config FILE`) and command-line flags, in that order. Derived numbers (slots from a memory size) are
computed from it once, by `budget.resolve`, never passed alongside."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from adapmoe_cli.budget import BudgetRequest
from adapmoe_cli.errors import UsageError
from adapmoe_cli.runtime.eviction import check_name
from adapmoe_cli.runtime.prefetch import DEFAULT_MIN_PRECISION
from adapmoe_cli.safe_io import MAX_YAML_BYTES, read_capped

#: what quantized experts multiply (experts_format.py): bfloat16 activations, or the model's own dtype
ACTIVATIONS = ("bfloat16", "model")

DEVICES = ("cpu", "cuda", "auto")
#: a store's dtype (`shard`/`download --dtype`; store/writer.py): the checkpoint's own, or one of these
DTYPE_CHOICES = ("keep", "bfloat16", "float16", "float32")
AUTO_PROFILE = ("ask", "yes", "no")


def _check_types(obj: Any) -> None:
    """Each field of a settings dataclass holds its annotated type (a preset is YAML: `prefetch: "no"`
    or `seed: 1e23` must be refused, not used). Floats may be given as integers; NaN and inf never pass."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        if value is None and type(None) in allowed:
            continue
        ok = any(
            isinstance(value, bool) if t is bool else
            isinstance(value, int) and not isinstance(value, bool) if t is int else
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) if t is float else
            isinstance(value, t) for t in allowed if t is not type(None)
        )
        if not ok:
            names = " or ".join("null" if t is type(None) else "a finite number" if t is float else t.__name__
                                for t in allowed)
            raise UsageError(f"setting {f.name} must be {names}, got {value!r}")
        if float in allowed and isinstance(value, int):
            object.__setattr__(obj, f.name, float(value))


@dataclass(frozen=True)
class CacheSettings:
    budget: BudgetRequest = field(default_factory=BudgetRequest)  # interpreted by budget.py
    policy: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.policy != "auto":
            check_name(self.policy)  # (said before a model is opened)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 200
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    context: int | None = None  # tokens a conversation may hold (None: the model's context)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        if not 0 <= self.temperature < math.inf:
            raise UsageError(f"--temperature must be a finite number ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError("--top-k must be ≥ 0 (0 = off)")
        if not 0 < self.repetition_penalty < math.inf:
            raise UsageError(f"--repeat-penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        if not 0 <= self.seed < 1 << 63:
            raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {self.seed}")
        if self.context is not None and self.context < 2:
            raise UsageError("--ctx must be at least 2 tokens")


@dataclass(frozen=True)
class GateSettings:
    adaptive: bool = True  # use the plan's adaptive gate (or --gate-scale); False: plain top-k
    scale: float | None = None  # thresholds from the profile with this scale, overriding the plan's
    rule: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.scale is not None and not 0 <= self.scale < math.inf:
            raise UsageError(f"--gate-scale must be a finite number ≥ 0, got {self.scale}")


@dataclass(frozen=True)
class Settings:
    cache: CacheSettings = field(default_factory=CacheSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    prefetch: bool = True
    #: prefetch a predicted expert only when predictions like it (same layer, same rank) have been needed at
    #: least this often (runtime/prefetch.py); 0: every prediction
    prefetch_precision: float = DEFAULT_MIN_PRECISION
    compile: bool = False  # compile the decode step (runtime/compiled.py)
    device: str = "auto"
    plan: str = "auto"  # auto: the store's plan.json (re-solved for the budget); none; or a file
    auto_profile: str = "ask"  # a store without a profile: ask (interactive chat), yes (profile and plan), no
    quantized_activations: str = "bfloat16"  # what quantized experts multiply: bfloat16 (fast) | model (exact)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.quantized_activations not in ACTIVATIONS:
            raise UsageError(f"quantized_activations must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.quantized_activations!r}")
        if self.device not in DEVICES:
            raise UsageError(f"unsupported device {self.device!r}: choose one of {', '.join(DEVICES)}")
        if not 0 <= self.prefetch_precision <= 1:
            raise UsageError(f"prefetch_precision must be between 0 and 1, got {self.prefetch_precision}")
        if self.auto_profile not in AUTO_PROFILE:
            raise UsageError(f"auto_profile must be one of {', '.join(AUTO_PROFILE)}, got {self.auto_profile!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise UsageError(f"config file {path} does not exist")
    data = parse_yaml(read_capped(Path(path), MAX_YAML_BYTES, f"config file {path}", UsageError, follow=True),
                      f"config file {path}")
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings")
    return data


def parse_yaml(data: bytes, what: str) -> Any:
    """YAML from untrusted bytes (safe_load: no objects), every failure a UsageError naming `what`. Aliases
    (`*name`) are refused: none of adapmoe's files needs one, and nested ones expand a file of a kilobyte into
    gigabytes of values before anything could check them."""
    try:
        text = data.decode("utf-8")
        if "*" in text and any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise UsageError(f"{what} uses a YAML alias (*name); write the values out instead")
        return yaml.safe_load(text) or {}
    except UnicodeDecodeError:
        raise UsageError(f"{what} is not UTF-8 text") from None
    except RecursionError:
        raise UsageError(f"{what} nests too deeply") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{what} is not valid YAML: {str(e).splitlines()[0]}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    # YAML 1.1 reads some bare keys as other types (`on:` is True): compare and report them as text
    unknown = sorted((k for k in data if k not in known), key=repr)
    if unknown:
        raise UsageError(f"unknown setting {where}{unknown[0]!s}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        subs = {"cache": CacheSettings, "generation": GenerationSettings, "gate": GateSettings}
        sub = subs.get(name) if cls is Settings else None
        if sub is not None:
            if not isinstance(value or {}, dict):
                raise UsageError(f"setting {where}{name} must be a mapping of settings, got {value!r}")
            kwargs[name] = _build(sub, value or {}, f"{name}.")
        elif cls is CacheSettings and name == "budget" and not isinstance(value, BudgetRequest):
            kwargs[name] = BudgetRequest() if value is None else BudgetRequest.parse(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UsageError(f"bad settings in {where or 'config'}: {e}") from None


def default_config_text() -> str:
    return resources.files("adapmoe_cli").joinpath("configs/default.yaml").read_text()


def load_settings(config: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Defaults ← preset file ← flags. `overrides` uses dotted keys (`cache.experts`); None means unset."""
    return build_settings(_read_yaml(config) if config is not None else None, overrides)


def build_settings(preset: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> Settings:
    """`load_settings` after the preset file is read (a mapping, as `_read_yaml` returns it)."""
    data = yaml.safe_load(default_config_text())
    if preset is not None:
        data = _merge(data, preset)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"setting {p} must be a mapping of settings, got {node!r}")
        node[leaf] = value
    return _build(Settings, data, "")


__all__ = ["CacheSettings", "GateSettings", "GenerationSettings", "Settings", "load_settings", "replace"]
