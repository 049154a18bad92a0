"""Threshold rules of the adaptive gate, and the search for the largest gate scale within a quality
budget. A rule maps one scale `c` and the profile to per-layer thresholds T_l and says how they apply
(`runtime/gating.py` modes: `share`, a second-or-later expert whose share is below T_l is dropped;
`tail`, the experts from the j-th on are dropped while together they carry less than T_l):

- `paper`    T_l = sqrt(c / F_l), F_l the profile's sensitivity (AdapMoE, Zhong et al. 2024); share;
- `global`   T_l = c for every layer (one threshold on the weight, the plain baseline); share;
- `weighted` T_l = sqrt(c / S_l), S_l = ½ E[(g·Δy)²] / E[(1 − s_1)²]: the sensitivity weighted by what
             dropping actually changes in the output (the derivation's second-order term, docs/profile.md);
             share;
- `top-p`    T_l = c for every layer, tail: post-hoc top-p routing with p = 1 − c (arXiv 2403.07652's
             rule applied within the router's top-k, without retraining);
- `weighted-tail` `weighted`'s T_l, tail: the loss model S_l · (dropped share)² bounds the whole dropped
             tail rather than each expert in it;
- `weighted-l2` `weighted`'s T_l, l2: the dropped experts' shares add in quadrature (their outputs'
             errors, if independent, do), so the tail is dropped while sqrt(Σ s_j²) < T_l;
- `weighted+mean`, `weighted-tail+mean` the same thresholds and modes, *compensated*: the kept experts
             keep the router's weights and each dropped expert's output is replaced by its mean output
             (the profile's expert statistics, profiling/expert_stats.py);
- `spread-tail` `weighted-tail+mean`, with each share weighed by its expert's spread around its mean
             before the tail is summed: an expert whose output barely strays from its mean costs little
             to drop once the mean replaces it;
- `auto`     the default: with top-2 (where share and tail are one rule) `weighted+mean` when the profile
             was made with gradients and has expert statistics, `weighted` with gradients only, else
             `paper`; with top-k > 2, `AUTO_FINE` (docs/gating.md: the best measured on the fine-grained
             embedded model), `weighted-tail` without expert statistics, else `top-p`.

The quality budget is a relative perplexity increase; the scale is found by bisection on the calibration
text (perplexity grows with c) for the largest c whose increase's upper confidence bound stays within it
(`GateQuality.bound`, made in quality.py): a few thousand calibration tokens estimate the increase only
to ±0.2 %, and a search that spent the whole budget on that estimate overshoots it on other text."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from adapmoe_cli.errors import ProfileError, UsageError
from adapmoe_cli.runtime.gating import ExpertStats, GatePolicy

RULES = ("auto", "paper", "global", "weighted", "top-p", "weighted-tail", "weighted-l2", "weighted+mean",
         "weighted-tail+mean", "spread-tail")
_MODES = {"paper": "share", "global": "share", "weighted": "share", "top-p": "tail", "weighted-tail": "tail",
          "weighted-l2": "l2", "weighted+mean": "share", "weighted-tail+mean": "tail", "spread-tail": "tail"}
_FLAT = ("global", "top-p")  # one threshold for every layer: the scale itself
_WEIGHTED = ("weighted", "weighted-tail", "weighted-l2", "weighted+mean", "weighted-tail+mean", "spread-tail")
COMPENSATING = ("weighted+mean", "weighted-tail+mean", "spread-tail")  # need the profile's expert statistics
_SPREAD = ("spread-tail",)  # weigh each share by its expert's spread
AUTO_FINE = "spread-tail"  # `auto` with top-k > 2, a gradient profile and expert statistics
# the threshold above which a mode keeps only the top-1: no share but the first exceeds 1/2; the tail
# beyond the top-1 is 1 − s_1 < 1
MAX_THRESHOLD = {"share": 0.5 + 1e-6, "tail": 1.0, "l2": 1.0}


ONE_EXPERT = ("the router gives each token one expert: the adaptive gate has nothing to drop; "
              "running plain top-1")


def gateable(top_k: int) -> bool:
    """A router that chooses one expert per token leaves the gate nothing to threshold (ONE_EXPERT)."""
    return top_k > 1


def mode_of(rule: str) -> str:
    """How the thresholds of `rule` apply (a plan records only the rule; `top-K` is static top-K)."""
    if rule.startswith("top-") and rule[4:].isdigit():
        return "count"
    return _MODES.get(rule, "share")


def resolve_rule(rule: str, profile_layers: list[dict], top_k: int = 2, stats: bool = False) -> str:
    """`auto`: with top-2, `weighted+mean` when the profile has the gradient terms it needs (they ranked
    layers best on the embedded model, docs/gating.md) and expert statistics (`stats`), `weighted` with
    the gradient terms alone, else `paper`; with top-k > 2, `AUTO_FINE`, `weighted-tail`, `top-p` alike."""
    if rule != "auto":
        return rule
    gradients = "second_order_drop_loss" in profile_layers[0]
    if top_k > 2:
        return (AUTO_FINE if stats else "weighted-tail") if gradients else "top-p"
    return ("weighted+mean" if stats else "weighted") if gradients else "paper"


def compensates(rule: str) -> bool:
    return rule in COMPENSATING


def spreads(rule: str) -> bool:
    return rule in _SPREAD


def _layer_sensitivity(profile_layers: list[dict], rule: str) -> list[float]:
    if rule == "paper":
        return [float(x["sensitivity"]) for x in profile_layers]
    if rule in _WEIGHTED:
        if "second_order_drop_loss" not in profile_layers[0]:
            raise ProfileError("the `weighted` rule needs a profile made with the gradient method")
        return [float(x["second_order_drop_loss"]) / max(float(x["mean_second_weight_sq"]), 1e-12)
                for x in profile_layers]
    raise UsageError(f"unknown gate rule {rule!r}: choose one of {', '.join(RULES)}")


def _top(rule: str, stats: ExpertStats | None) -> float:
    """The threshold at which the rule keeps only the top-1: with spreads, the tail's cost reaches the
    largest spread."""
    top = MAX_THRESHOLD[mode_of(rule)]
    if rule in _SPREAD and stats is not None:
        top *= max(1.0, max(float(s.max()) for s in stats.spread.values()))
    return top


def thresholds(rule: str, scale: float, profile_layers: list[dict], top_k: int = 2,
               stats: ExpertStats | None = None) -> dict[int, float]:
    rule = resolve_rule(rule, profile_layers, top_k, stats is not None)
    if rule not in _MODES:
        raise UsageError(f"unknown gate rule {rule!r}: choose one of {', '.join(RULES)}")
    if not 0 <= scale < math.inf:  # (NaN too)
        raise UsageError(f"the gate scale must be a finite number ≥ 0, got {scale}")
    top = _top(rule, stats)
    layers = [int(x["layer"]) for x in profile_layers]
    if rule in _FLAT:
        return {layer: min(scale, top) for layer in layers}
    sens = _layer_sensitivity(profile_layers, rule)
    out = {}
    for layer, f in zip(layers, sens, strict=True):
        # a layer whose loss does not grow when experts are dropped (F ≤ 0) gates as hard as allowed
        out[layer] = top if f <= 0 else min(math.sqrt(scale / f), top)
    return out


def gate(rule: str, scale: float, profile_layers: list[dict], top_k: int = 2, stats: ExpertStats | None = None
         ) -> GatePolicy:
    """The gate of `rule` at `scale`; a compensating rule needs `stats` (the profile's expert statistics)."""
    if not gateable(top_k):
        return GatePolicy.off()
    rule = resolve_rule(rule, profile_layers, top_k, stats is not None)
    if compensates(rule) and stats is None:
        raise ProfileError(f"the gate rule {rule} needs a profile with expert statistics; re-run `adapmoe profile`")
    return GatePolicy(thresholds(rule, scale, profile_layers, top_k, stats), rule=rule, scale=scale,
                      mode=mode_of(rule), stats=stats if compensates(rule) else None, spreads=spreads(rule))


def max_scale(rule: str, profile_layers: list[dict], top_k: int = 2, stats: ExpertStats | None = None) -> float:
    """The smallest scale at which every layer keeps only the top-1."""
    rule = resolve_rule(rule, profile_layers, top_k, stats is not None)
    top = _top(rule, stats)
    if rule in _FLAT:
        return top
    sens = [f for f in _layer_sensitivity(profile_layers, rule) if f > 0]
    return top**2 * max(sens) if sens else 1.0


@dataclass(frozen=True)
class GateQuality:
    """A gate's perplexity on the calibration tokens against the ungated one on the same tokens: the
    relative increase and a one-sided upper confidence bound of it (quality.py)."""

    perplexity: float
    base_perplexity: float
    bound: float
    experts_per_token: float | None = None  # computed with the gate …
    ungated_experts_per_token: float | None = None  # … and without it

    @property
    def increase(self) -> float:
        return self.perplexity / self.base_perplexity - 1

    @property
    def drops(self) -> bool:
        """The gate dropped some expert on the scored text (unknown counts: assumed so)."""
        if self.experts_per_token is None or self.ungated_experts_per_token is None:
            return True
        return self.experts_per_token < self.ungated_experts_per_token


SEARCH_ITERATIONS = 14  # bisection steps of `find_scale`, at most …
SCALE_RESOLUTION = 0.03  # … it stops once the largest scale that failed is within 3 % of the one that held:
# finer steps move experts per token by a fraction of a percent, within the estimate's own noise


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

    @property
    def reachable(self) -> bool:
        """A gate that drops some expert kept the bound within the budget; else the chosen gate drops nothing
        (a tiny scale) and the search has in effect left the gate off."""
        return self.scale > 0 and self.quality.drops

    def closest(self) -> tuple[float, GateQuality] | None:
        """Of the gates tried that dropped some expert, the one whose bound came nearest the budget."""
        gated = [(s, q) for s, q in self.evaluations if s > 0 and q.drops]
        return min(gated, key=lambda sq: sq[1].bound) if gated else None

    def unreachable_text(self, budget: float) -> str | None:
        """One line for a budget no gate meets: what the nearest gate cost, and that the gate drops nothing
        (or why no gate was tried)."""
        if self.reachable:
            return None
        near = self.closest()
        if near is None:
            return ONE_EXPERT
        return (f"no gate that drops an expert keeps the perplexity increase within {budget:.2%} on the "
                f"calibration text (95% bound): the nearest, scale {near[0]:.3g}, measured {near[1].increase:+.2%} "
                f"(bound {near[1].bound:+.2%}); the gate drops nothing (plain top-k). Allow a larger "
                "--quality-budget")


def find_scale(rule: str, profile_layers: list[dict], budget: float, quality: Callable[[GatePolicy], GateQuality],
               iterations: int = SEARCH_ITERATIONS, top_k: int = 2, stats: ExpertStats | None = None) -> ScaleSearch:
    """Largest scale whose increase's upper bound (`GateQuality.bound`) stays within `budget`, by bisection."""
    if not 0 < budget <= 1:
        raise UsageError(f"the quality budget must be between 0 and 100%, got {budget:.4%}")
    if not gateable(top_k):
        return ScaleSearch(0.0, quality(GatePolicy.off()), [])
    rule = resolve_rule(rule, profile_layers, top_k, stats is not None)
    tried: list[tuple[float, GateQuality]] = []
    hi = max_scale(rule, profile_layers, top_k, stats)
    q_hi = quality(gate(rule, hi, profile_layers, top_k, stats))
    tried.append((hi, q_hi))
    if q_hi.bound <= budget:
        return ScaleSearch(hi, q_hi, tried)
    lo, q_lo = 0.0, quality(GatePolicy.off())
    for _ in range(iterations):
        if lo > 0 and hi <= lo * (1 + SCALE_RESOLUTION):
            break
        # bisect in sqrt-space for the threshold rules, where T grows like sqrt(c)
        mid = ((math.sqrt(lo) + math.sqrt(hi)) / 2) ** 2 if rule not in _FLAT else (lo + hi) / 2
        q = quality(gate(rule, mid, profile_layers, top_k, stats))
        tried.append((mid, q))
        if q.bound <= budget:
            lo, q_lo = mid, q
        else:
            hi = mid
    return ScaleSearch(lo, q_lo, tried)
