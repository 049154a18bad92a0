"""Threshold rules of the adaptive gate, and the search for the largest gate scale within a quality
budget. A rule maps one scale `c` and the profile to per-layer thresholds T_l (a second-or-later expert
with normalised weight below T_l is dropped):

- `paper`    T_l = sqrt(c / F_l), F_l the profile's sensitivity (AdapMoE, Zhong et al. 2024);
- `global`   T_l = c for every layer (one threshold on the weight, the plain baseline);
- `auto`     `weighted` when the profile was made with gradients, else `paper` (the default);
- `weighted` T_l = sqrt(c / S_l), S_l = ½ E[(g·Δy)²] / E[w₂²]: the sensitivity weighted by what dropping
             actually changes in the output (the derivation's second-order term, docs/profile.md).

The quality budget is a relative perplexity increase; the scale is found by bisection on the calibration
text (perplexity grows with c) for the largest c whose increase's upper confidence bound stays within it
(`GateQuality.bound`, made in quality.py): a few thousand calibration tokens estimate the increase only
to ±0.2 %, and a search that spent the whole budget on that estimate overshoots it on other text."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from adapmoe_cli.errors import ProfileError, UsageError
from adapmoe_cli.runtime.gating import GatePolicy

RULES = ("auto", "paper", "global", "weighted")
MAX_THRESHOLD = 0.5 + 1e-6  # with top-2, a second weight is at most 0.5: this drops every second expert


def resolve_rule(rule: str, profile_layers: list[dict]) -> str:
    """`auto`: `weighted` when the profile has the gradient terms it needs (it ranked layers best on the
    embedded model, docs/gating.md), else `paper`."""
    if rule != "auto":
        return rule
    return "weighted" if "second_order_drop_loss" in profile_layers[0] else "paper"


def _layer_sensitivity(profile_layers: list[dict], rule: str) -> list[float]:
    if rule == "paper":
        return [float(x["sensitivity"]) for x in profile_layers]
    if rule == "weighted":
        if "second_order_drop_loss" not in profile_layers[0]:
            raise ProfileError("the `weighted` rule needs a profile made with the gradient method")
        return [float(x["second_order_drop_loss"]) / max(float(x["mean_second_weight_sq"]), 1e-12)
                for x in profile_layers]
    raise UsageError(f"unknown gate rule {rule!r}: choose one of {', '.join(RULES)}")


def thresholds(rule: str, scale: float, profile_layers: list[dict]) -> dict[int, float]:
    rule = resolve_rule(rule, profile_layers)
    if scale < 0:
        raise UsageError(f"the gate scale must be ≥ 0, got {scale}")
    layers = [int(x["layer"]) for x in profile_layers]
    if rule == "global":
        return {layer: min(scale, MAX_THRESHOLD) for layer in layers}
    sens = _layer_sensitivity(profile_layers, rule)
    out = {}
    for layer, f in zip(layers, sens, strict=True):
        # a layer whose loss does not grow when experts are dropped (F ≤ 0) gates as hard as allowed
        out[layer] = MAX_THRESHOLD if f <= 0 else min(math.sqrt(scale / f), MAX_THRESHOLD)
    return out


def gate(rule: str, scale: float, profile_layers: list[dict]) -> GatePolicy:
    rule = resolve_rule(rule, profile_layers)
    return GatePolicy(thresholds(rule, scale, profile_layers), rule=rule, scale=scale)


def max_scale(rule: str, profile_layers: list[dict]) -> float:
    """The smallest scale at which every layer drops every second expert."""
    rule = resolve_rule(rule, profile_layers)
    if rule == "global":
        return MAX_THRESHOLD
    sens = [f for f in _layer_sensitivity(profile_layers, rule) if f > 0]
    return MAX_THRESHOLD**2 * max(sens) if sens else 1.0


@dataclass(frozen=True)
class GateQuality:
    """A gate's perplexity on the calibration tokens against the ungated one on the same tokens: the
    relative increase and a one-sided upper confidence bound of it (quality.py)."""

    perplexity: float
    base_perplexity: float
    bound: float

    @property
    def increase(self) -> float:
        return self.perplexity / self.base_perplexity - 1


SEARCH_ITERATIONS = 14  # bisection steps of `find_scale`


@dataclass(frozen=True)
class ScaleSearch:
    scale: float
    quality: GateQuality  # of the chosen scale
    evaluations: list[tuple[float, GateQuality]]  # scales tried

    @property
    def perplexity(self) -> float:
        return self.quality.perplexity

    @property
    def base_perplexity(self) -> float:
        return self.quality.base_perplexity

    @property
    def increase(self) -> float:
        return self.quality.increase

    @property
    def bound(self) -> float:
        return self.quality.bound


def find_scale(rule: str, profile_layers: list[dict], budget: float, quality: Callable[[GatePolicy], GateQuality],
               iterations: int = SEARCH_ITERATIONS) -> ScaleSearch:
    """Largest scale whose increase's upper bound (`GateQuality.bound`) stays within `budget`, by bisection."""
    rule = resolve_rule(rule, profile_layers)
    if not 0 < budget <= 1:
        raise UsageError(f"the quality budget must be between 0 and 100%, got {budget:.4%}")
    tried: list[tuple[float, GateQuality]] = []
    hi = max_scale(rule, profile_layers)
    q_hi = quality(gate(rule, hi, profile_layers))
    tried.append((hi, q_hi))
    if q_hi.bound <= budget:
        return ScaleSearch(hi, q_hi, tried)
    lo, q_lo = 0.0, quality(GatePolicy.off())
    for _ in range(iterations):
        # bisect in sqrt-space for the threshold rules, where T grows like sqrt(c)
        mid = ((math.sqrt(lo) + math.sqrt(hi)) / 2) ** 2 if rule != "global" else (lo + hi) / 2
        q = quality(gate(rule, mid, profile_layers))
        tried.append((mid, q))
        if q.bound <= budget:
            lo, q_lo = mid, q
        else:
            hi = mid
    return ScaleSearch(lo, q_lo, tried)
