"""Routing as pure tensor functions: router logits → top-k expert ids and normalised weights, per the
family's semantics, and the adaptive gate that drops low-weight experts below a per-layer threshold
(the top-1 is always kept). No modules, no state."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch


def route(logits: torch.Tensor, top_k: int, scheme: str = "softmax_topk_renorm") -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] → (weights [T, k] float32, ids [T, k]) sorted by weight, descending."""
    if scheme == "softmax_topk_renorm":
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids
    if scheme == "softmax_topk":
        probs = torch.softmax(logits.float(), dim=-1)
        return torch.topk(probs, top_k, dim=-1)
    if scheme == "topk_softmax":
        values, ids = torch.topk(logits.float(), top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids
    raise ValueError(f"unknown routing scheme {scheme!r}")


def adaptive_keep(weights: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """weights [T, k] (descending, summing to 1) → keep mask [T, k]: top-1 always, others ≥ threshold."""
    keep = torch.ones_like(weights, dtype=torch.bool)
    if threshold is not None and weights.shape[-1] > 1:
        keep[:, 1:] = weights[:, 1:] >= threshold
    return keep


def renormalise(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    return kept / kept.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class GatePolicy:
    """Per-layer thresholds of the adaptive gate. A layer without a threshold routes plain top-k.
    `rule` and `scale` say how the thresholds were made (recorded in plans and reports)."""

    thresholds: Mapping[int, float] = field(default_factory=dict)
    rule: str = "off"
    scale: float | None = None

    def threshold(self, layer: int) -> float | None:
        return self.thresholds.get(layer)

    @staticmethod
    def off() -> GatePolicy:
        return GatePolicy()

    @staticmethod
    def top1(layers: Iterable[int]) -> GatePolicy:
        """Keep only the top-1 expert in `layers` (a threshold no second weight reaches)."""
        return GatePolicy({layer: 1.0 + 1e-6 for layer in layers}, rule="top1")


def apply_gate(weights: torch.Tensor, ids: torch.Tensor, threshold: float | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, ids) [T, k] → (weights renormalised over kept, ids with dropped set to -1, keep mask)."""
    keep = adaptive_keep(weights, threshold)
    if threshold is None:
        return weights, ids, keep
    return renormalise(weights, keep), ids.masked_fill(~keep, -1), keep
