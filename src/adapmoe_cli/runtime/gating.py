"""The adaptive gate as pure tensor functions. A family's own router gives each token k experts and
their weights; `rank` orders them by weight and expresses each as its share of the k weights' total;
the gate keeps the top-1 and, by the policy's mode, every other expert whose share reaches the layer's
threshold (`share`), every expert while the tail from it on still carries the threshold (`tail`:
post-hoc top-p with p = 1 − threshold) or while the tail's shares in quadrature do (`l2`), or the first
k' (`count`: static top-k'). With top-2, `share`, `tail` and `l2` are all the paper's rule on the
normalised second weight. `reweigh` gives the kept experts the weights the family's router would give
them had it chosen only those (docs/gating.md). A policy with expert statistics (`ExpertStats`, made by
the profile) instead *compensates*: the kept experts keep the router's weights, each dropped expert's
output is replaced by its mean output (`compensation`), and, with spreads, each share is weighed by how
far that expert's output strays from its mean before the mode applies (`costs`). No modules, no state."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch


def rank(weights: torch.Tensor, ids: torch.Tensor, ordered: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A router's (weights, ids) [T, k] → (shares, ids, weights), all ordered by weight, descending (ties
    keep the router's order): `shares` are float32 and sum to 1 per token, `weights` are the router's own
    (any total: 1, less than 1 without renormalisation, a scaling factor). `ordered`: the router already
    returns them descending (a sorted top-k), so nothing is reordered."""
    w = weights.float()
    if not ordered:
        order = torch.argsort(w, dim=-1, descending=True, stable=True)
        w, ids = w.gather(-1, order), ids.gather(-1, order)
    return w / w.sum(dim=-1, keepdim=True), ids, w


def reweigh(weights: torch.Tensor, shares: torch.Tensor, keep: torch.Tensor, renormalises: bool) -> torch.Tensor:
    """The router's weights [T, k] with the dropped experts' set to 0. A router that renormalises its
    top-k gives the kept experts the whole total, in proportion (kept weight × total / kept total = kept
    weight / kept share); one that does not leaves them as they are."""
    kept = weights.masked_fill(~keep, 0.0)
    if not renormalises:
        return kept
    return kept / shares.masked_fill(~keep, 0.0).sum(dim=-1, keepdim=True)


def adaptive_keep(shares: torch.Tensor, threshold: float | None, mode: str = "share") -> torch.Tensor:
    """shares [T, k] (descending, summing to 1; or `costs`) → keep mask [T, k]: the top-1 always; the others
    by `mode`: `share`: s_j ≥ threshold; `tail`: s_j + … + s_k ≥ threshold (the kept ones are the smallest
    prefix whose total reaches 1 − threshold); `l2`: s_j² + … + s_k² ≥ threshold²; `count`: j ≤ threshold
    (an integer k')."""
    keep = torch.ones_like(shares, dtype=torch.bool)
    if threshold is None or shares.shape[-1] == 1:
        return keep
    if mode == "share":
        keep[:, 1:] = shares[:, 1:] >= threshold
    elif mode == "tail":
        keep[:, 1:] = shares[:, 1:].flip(-1).cumsum(-1).flip(-1) >= threshold
    elif mode == "l2":
        keep[:, 1:] = shares[:, 1:].square().flip(-1).cumsum(-1).flip(-1) >= threshold * threshold
    elif mode == "count":
        keep[:, max(1, int(threshold)):] = False
    else:
        raise ValueError(f"unknown gate mode {mode!r}")
    return keep


def renormalise(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    return kept / kept.sum(dim=-1, keepdim=True)


def costs(shares: torch.Tensor, ids: torch.Tensor, spread: torch.Tensor | None) -> torch.Tensor:
    """What the gate's mode compares with the threshold: each share, or, with an expert statistics'
    `spread` [E] (how far each expert's output strays from its mean, 1 on the layer's average), each share
    times its expert's spread (ids [T, k]: the ranked experts, all ≥ 0)."""
    return shares if spread is None else shares * spread[ids]


def compensation(weights: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor
                 ) -> torch.Tensor:
    """What the dropped experts are replaced by: Σ_dropped w_j · mean_j [T, H] (weights: the router's own
    [T, k]; ids: the ranked experts, all ≥ 0; mean [E, H]: each expert's mean output)."""
    dropped = weights.masked_fill(keep, 0.0)
    return torch.einsum("tk,tkh->th", dropped, mean[ids].float())


@dataclass(frozen=True)
class ExpertStats:
    """Per MoE layer, each expert's mean output `mean` [E, H] and its spread around it `spread` [E] (1 on
    the layer's average), measured by the profile where a gate drops them (profiling/expert_stats.py)."""

    mean: Mapping[int, torch.Tensor]
    spread: Mapping[int, torch.Tensor]
    file: str = ""  # where they were read from, and its sha256 (plans and bench workers name them so)
    sha256: str = ""


@dataclass(frozen=True)
class GatePolicy:
    """Per-layer thresholds of the adaptive gate and how they apply (`mode`, see `adaptive_keep`). A layer
    without a threshold routes plain top-k. `rule` and `scale` say how the thresholds were made (recorded
    in plans and reports)."""

    thresholds: Mapping[int, float] = field(default_factory=dict)
    rule: str = "off"
    scale: float | None = None
    mode: str = "share"
    #: compensate dropped experts with their mean outputs (`compensation`); `spreads`: weigh shares too
    stats: ExpertStats | None = field(default=None, compare=False)
    spreads: bool = False

    def threshold(self, layer: int) -> float | None:
        return self.thresholds.get(layer)

    def mean(self, layer: int) -> torch.Tensor | None:
        """The layer's experts' mean outputs when this policy compensates (and gates the layer), else None."""
        if self.stats is None or layer not in self.thresholds:
            return None
        return self.stats.mean[layer]

    def spread(self, layer: int) -> torch.Tensor | None:
        """The layer's experts' spreads when this policy weighs shares by them, else None."""
        if self.stats is None or not self.spreads or layer not in self.thresholds:
            return None
        return self.stats.spread[layer]

    @staticmethod
    def off() -> GatePolicy:
        return GatePolicy()

    @staticmethod
    def top1(layers: Iterable[int]) -> GatePolicy:
        """Keep only the top-1 expert in `layers` (a threshold no second weight reaches)."""
        return GatePolicy({layer: 1.0 + 1e-6 for layer in layers}, rule="top1")

    @staticmethod
    def static(k: int, layers: Iterable[int]) -> GatePolicy:
        """Static top-k' (k' = `k`) in `layers`: the baseline an adaptive gate has to beat."""
        return GatePolicy({layer: float(k) for layer in layers}, rule=f"top-{k}", scale=float(k), mode="count")


def apply_gate(weights: torch.Tensor, ids: torch.Tensor, threshold: float | None, mode: str = "share",
               spread: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shares, ids) [T, k] → (shares renormalised over kept, ids with dropped set to -1, keep mask): what
    a trace's replay needs (planning/replay.py). `spread`: the policy's, for its layer (`costs`)."""
    keep = adaptive_keep(costs(weights, ids.clamp(min=0), spread), threshold, mode)
    if threshold is None:
        return weights, ids, keep
    return renormalise(weights, keep), ids.masked_fill(~keep, -1), keep
