"""Runs calibration text through an engine and measures, per MoE layer, how much the loss cares about
its lower-weighted experts, while recording the routing trace. The derivation of the estimates is in
docs/profile.md.

Two methods, recorded in the profile:
- `gradient` (models whose experts all fit in memory): one forward and backward pass per window with
  the loss summed over the window; for each token t and layer l, g = ∂L/∂y_l(t) at the routed experts'
  output, Δy = y_top1 − y (the change when only the top-1 expert is kept, weighted as the family's router
  would weight it alone: its whole total when the router renormalises, its own weight otherwise), and
  w₂ = 1 − s₁ the share of the router's weight that this drops (with top-2, the second weight). Then
      F_l          = mean_t ‖g‖²                       the paper's sensitivity
      predicted_l  = F_l · mean_t w₂²                  the paper's loss model ΔL ≈ F·w²
      second_l     = ½ mean_t (g·Δy)²                  the Fisher (second-order) term of the derivation
      first_l      = mean_t g·Δy                       the first-order term
- `forward` (any model): the loss increase when layer l alone keeps only its top-1 expert, measured by
  one forward pass over the text per layer; F_l = ΔL_l / mean_t w₂² so that F·w² reproduces it.
`expert_statistics` measures each expert's mean output and spread (expert_stats.py), for the compensating
rules, with one forward pass over the text it is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapmoe_cli.errors import UsageError
from adapmoe_cli.perplexity import evaluate
from adapmoe_cli.profiling.expert_stats import Accumulator
from adapmoe_cli.profiling.record import NextLayerPredictor
from adapmoe_cli.profiling.trace import Trace
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.gating import ExpertStats, GatePolicy
from adapmoe_cli.runtime.moe_block import LayerRecord

Progress = Callable[[int, int], None]


@dataclass
class Sensitivity:
    method: str
    fisher: list[float]  # F_l per MoE layer
    predicted: list[float]  # F_l · mean w2² (the paper's model of the loss increase)
    second_order: list[float] = field(default_factory=list)
    first_order: list[float] = field(default_factory=list)
    mean_w2_sq: list[float] = field(default_factory=list)


class _Recorder:
    """Observer that keeps each layer's routing, prediction and (gradient method) output for one window."""

    def __init__(self, engine: Engine, grads: bool):
        self.grads = grads
        self.predict = NextLayerPredictor(engine)
        self.records: dict[int, LayerRecord] = {}
        self.pred: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, rec: LayerRecord) -> None:
        if self.grads:
            rec.output.retain_grad()
        self.records[rec.layer] = rec
        pred = self.predict(rec)
        if pred is not None:
            nxt, ids, w = pred
            self.pred[nxt] = (ids, w)


def collect(
    engine: Engine,
    tokens: list[int],
    window: int,
    method: str = "gradient",
    progress: Progress | None = None,
) -> tuple[Trace, Sensitivity]:
    if method not in ("gradient", "forward"):
        raise UsageError(f"unknown profiling method {method!r}: gradient or forward")
    shape = engine.store.shape
    layers, k = list(shape.moe_layers), shape.top_k
    if k < 2:
        raise UsageError("the model routes to one expert per token: there is nothing for the adaptive gate to drop")
    if method == "gradient" and engine.budget.total < len(engine.store.experts):
        raise UsageError("the gradient method needs every expert in memory; use --method forward")
    grads = method == "gradient"
    rec = _Recorder(engine, grads)
    engine.observers.callbacks.append(rec)
    engine.observers.expert_outputs = grads
    embed = engine.model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True)) if grads else None
    n, L = len(tokens), len(layers)
    trace = Trace(
        ids=torch.full((n, L, k), -1, dtype=torch.int16), weights=torch.zeros(n, L, k),
        pred_ids=torch.full((n, L, k), -1, dtype=torch.int16), pred_weights=torch.zeros(n, L, k),
        tokens=torch.tensor(tokens, dtype=torch.int32), layers=layers,
    )
    sums = {name: torch.zeros(L, dtype=torch.float64) for name in ("g2", "second", "first", "w2sq")}
    counted = 0
    ids_all = torch.tensor(tokens, dtype=torch.long)
    spans = [(s, min(s + window, n)) for s in range(0, n, window)]  # every token routed exactly once
    try:
        for j, (start, end) in enumerate(spans):
            chunk = ids_all[start:end][None]  # [1, W]
            rec.records.clear()
            rec.pred.clear()
            with torch.set_grad_enabled(grads):
                logits = engine.model(input_ids=chunk, use_cache=False).logits[0].float()  # [W, V]
                if grads:
                    loss = F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum")
                    loss.backward()
            for i, layer in enumerate(layers):
                r = rec.records[layer]
                trace.ids[start:end, i] = r.ids.to(torch.int16)
                trace.weights[start:end, i] = r.weights.detach().float()
                if layer in rec.pred:
                    pids, pw = rec.pred[layer]
                    trace.pred_ids[start:end, i] = pids.to(torch.int16)
                    trace.pred_weights[start:end, i] = pw.float()
                w = r.weights.detach().double()  # [T, k] shares, descending
                sums["w2sq"][i] += ((1 - w[:, 0]) ** 2).sum()  # the share dropped with all but the top-1
                if grads:
                    g = r.output.grad.double()  # [T, H]
                    e = r.expert_outputs.double()  # [T, k, H]
                    mass = r.mass.detach().double()[:, None]  # [T, 1] the router's total weight
                    # keep only the top-1: y = m Σ_j s_j E_j becomes m E1 (renormalising) or m s_1 E1
                    top1 = e[:, 0] if r.renormalises else w[:, :1] * e[:, 0]
                    dy = mass * (top1 - (w[:, :, None] * e).sum(1))
                    gd = (g * dy).sum(-1)
                    sums["g2"][i] += (g**2).sum()
                    sums["second"][i] += 0.5 * (gd**2).sum()
                    sums["first"][i] += gd.sum()
            counted += end - start
            if progress:
                progress(j + 1, len(spans) + (0 if grads else L))
    finally:
        engine.observers.callbacks.remove(rec)
        engine.observers.expert_outputs = False
        if hook is not None:
            hook.remove()
    mean_w2 = (sums["w2sq"] / counted).tolist()
    if grads:
        fisher = (sums["g2"] / counted).tolist()
        sens = Sensitivity(
            "gradient", fisher, [f * m for f, m in zip(fisher, mean_w2, strict=True)],
            second_order=(sums["second"] / counted).tolist(), first_order=(sums["first"] / counted).tolist(),
            mean_w2_sq=mean_w2,
        )
    else:
        drops = drop_losses(engine, tokens, window, progress=progress, offset=len(spans))
        fisher = [d / m if m > 0 else 0.0 for d, m in zip(drops, mean_w2, strict=True)]
        sens = Sensitivity("forward", fisher, drops, mean_w2_sq=mean_w2)
    return trace, sens


def expert_statistics(engine: Engine, tokens: list[int], window: int, progress: Progress | None = None
                      ) -> ExpertStats:
    """Each expert's mean output and spread where a gate would drop it (expert_stats.py), from one forward
    pass over `tokens` in windows of `window`, ungated."""
    shape = engine.store.shape
    acc = Accumulator(list(shape.moe_layers), shape.num_experts, shape.top_k)

    def seen(rec: LayerRecord) -> None:
        acc.add(rec.layer, rec.weights, rec.ids, rec.expert_outputs)

    saved = engine.gate
    engine.use_gate(GatePolicy.off())
    engine.observers.callbacks.append(seen)
    engine.observers.expert_outputs = True
    ids = torch.tensor(tokens, dtype=torch.long)
    spans = range(0, len(tokens), window)
    try:
        with torch.no_grad():
            for j, start in enumerate(spans):
                engine.model(input_ids=ids[start:start + window][None], use_cache=False)
                if progress:
                    progress(j + 1, len(spans))
    finally:
        engine.observers.callbacks.remove(seen)
        engine.observers.expert_outputs = False
        engine.use_gate(saved)
    return acc.stats()


def drop_losses(engine: Engine, tokens: list[int], window: int, progress: Progress | None = None,
                offset: int = 0) -> list[float]:
    """Per MoE layer, the mean loss increase when that layer alone keeps only its top-1 expert."""
    layers = list(engine.store.shape.moe_layers)
    saved = engine.gate
    try:
        engine.use_gate(GatePolicy.off())
        base = evaluate(engine, tokens, window).loss
        out = []
        for i, layer in enumerate(layers):
            engine.use_gate(GatePolicy.top1([layer]))
            out.append(evaluate(engine, tokens, window).loss - base)
            if progress:
                progress(offset + i + 1, offset + len(layers))
        return out
    finally:
        engine.use_gate(saved)

