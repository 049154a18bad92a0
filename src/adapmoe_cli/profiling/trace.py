"""The routing trace and the statistics drawn from it. Arrays only (torch tensors on the CPU), no model.

A trace over N tokens and L MoE layers with top-k routing holds
    ids          int16  [N, L, k]   experts chosen by the router, by descending weight
    weights      float32[N, L, k]   their normalised weights (sum 1 over k)
    pred_ids     int16  [N, L, k]   for layer l ≥ 1: router l applied to the hidden state entering
                                     layer l-1's MoE block (what prefetching sees); -1 for layer 0
    pred_weights float32[N, L, k]
    tokens       int32  [N]         the token ids (for reference)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

THRESHOLD_GRID = [round(0.01 * i, 2) for i in range(0, 51)]


@dataclass
class Trace:
    ids: torch.Tensor
    weights: torch.Tensor
    pred_ids: torch.Tensor
    pred_weights: torch.Tensor
    tokens: torch.Tensor
    layers: list[int]  # the model's layer index of each trace layer

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "weights": self.weights, "pred_ids": self.pred_ids,
                "pred_weights": self.pred_weights, "tokens": self.tokens,
                "layers": torch.tensor(self.layers, dtype=torch.int32)}

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor]) -> Trace:
        return Trace(t["ids"], t["weights"], t["pred_ids"], t["pred_weights"], t["tokens"],
                     [int(x) for x in t["layers"].tolist()])


def quantiles(x: torch.Tensor, qs: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> dict[str, float]:
    q = torch.quantile(x.double().flatten(), torch.tensor(qs, dtype=torch.float64))
    return {f"p{int(round(p * 100))}": float(v) for p, v in zip(qs, q, strict=True)}


def layer_stats(trace: Trace, num_experts: int) -> list[dict]:
    """Per layer: weight quantiles and histogram, single-expert ratio over thresholds, activation
    frequencies, next-layer prediction accuracy, router entropy of the top-k weights."""
    out = []
    k = trace.top_k
    for i, layer in enumerate(trace.layers):
        w = trace.weights[:, i, :].float()  # [N, k]
        ids = trace.ids[:, i, :].long()
        counts = torch.bincount(ids.flatten(), minlength=num_experts).double()
        entry = {
            "layer": layer,
            "weight_quantiles": {f"rank{r + 1}": quantiles(w[:, r]) for r in range(k)},
            "activation_frequency": (counts / counts.sum()).tolist(),
        }
        if k > 1:
            hist = torch.histc(w[:, 1].double(), bins=25, min=0.0, max=0.5)
            entry["second_weight_histogram"] = {"bins": [round(0.02 * j, 2) for j in range(26)],
                                                "counts": [int(c) for c in hist.tolist()]}
            # share of tokens that need only their top-1 expert when weights below T are dropped
            entry["single_expert_ratio"] = {
                str(t): float((w[:, 1] < t).double().mean()) for t in THRESHOLD_GRID
            }
        if i > 0:
            entry["prediction_accuracy"] = prediction_accuracy(trace, i)
        out.append(entry)
    return out


def prediction_accuracy(trace: Trace, i: int) -> float:
    """Of the experts layer i actually uses, the fraction the prediction named."""
    actual = trace.ids[:, i, :].long()  # [N, k]
    pred = trace.pred_ids[:, i, :].long()
    hit = (actual[:, :, None] == pred[:, None, :]).any(-1)  # [N, k]
    return float(hit.double().mean())


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda j: x[j])
        r = [0.0] * len(x)
        j = 0
        while j < len(order):
            m = j
            while m + 1 < len(order) and x[order[m + 1]] == x[order[j]]:
                m += 1
            for t in range(j, m + 1):
                r[order[t]] = (j + m) / 2
            j = m + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")
