"""Settings: one frozen, validated object built once from `configs/default.yaml`, an optional preset
(`--config FILE`) and command-line flags, in that order. Derived numbers (slots from a memory size) are
computed from it once, by `budget.resolve`, never passed alongside."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from adapmoe_cli.budget import BudgetRequest
from adapmoe_cli.errors import UsageError

DEVICES = ("cpu", "cuda", "auto")
AUTO_PROFILE = ("ask", "yes", "no")


@dataclass(frozen=True)
class CacheSettings:
    budget: BudgetRequest = field(default_factory=BudgetRequest)  # interpreted by budget.py
    policy: str = "lru"


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
        if self.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise UsageError("--temperature must be ≥ 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise UsageError("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise UsageError("--top-k must be ≥ 0 (0 = off)")
        if self.repetition_penalty <= 0:
            raise UsageError("--repeat-penalty must be > 0 (1 = off)")
        if self.context is not None and self.context < 2:
            raise UsageError("--ctx must be at least 2 tokens")


@dataclass(frozen=True)
class GateSettings:
    adaptive: bool = True  # use the plan's adaptive gate (or --gate-scale); False: plain top-k
    scale: float | None = None  # thresholds from the profile with this scale, overriding the plan's
    rule: str = "auto"

    def __post_init__(self) -> None:
        if self.scale is not None and self.scale < 0:
            raise UsageError(f"--gate-scale must be ≥ 0, got {self.scale}")


@dataclass(frozen=True)
class Settings:
    cache: CacheSettings = field(default_factory=CacheSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    prefetch: bool = True
    device: str = "auto"
    plan: str = "auto"  # auto: the store's plan.json (re-solved for the budget); none; or a file
    auto_profile: str = "ask"  # a store without a profile: ask (interactive chat), yes (profile and plan), no

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UsageError(f"unsupported device {self.device!r}: choose one of {', '.join(DEVICES)}")
        if self.auto_profile not in AUTO_PROFILE:
            raise UsageError(f"auto_profile must be one of {', '.join(AUTO_PROFILE)}, got {self.auto_profile!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UsageError(f"unknown setting {where}{unknown[0]}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        subs = {"cache": CacheSettings, "generation": GenerationSettings, "gate": GateSettings}
        sub = subs.get(name) if cls is Settings else None
        if sub is not None:
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
    data = yaml.safe_load(default_config_text())
    if config is not None:
        data = _merge(data, _read_yaml(config))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return _build(Settings, data, "")


__all__ = ["CacheSettings", "GateSettings", "GenerationSettings", "Settings", "load_settings", "replace"]
