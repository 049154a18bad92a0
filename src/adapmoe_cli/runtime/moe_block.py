"""The module swapped into each decoder layer in place of the family's sparse-MoE block. Glue only:
routes with the original router module (so transformers' router-logit hooks still fire), applies the
adaptive gate, asks the manager to prefetch the next layer's predicted experts, and computes each needed
expert from the slot the manager hands it. Attention, norms and the KV cache stay transformers'."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapmoe_cli.runtime.gating import GatePolicy, apply_gate, route
from adapmoe_cli.runtime.manager import ExpertManager


@dataclass
class LayerRecord:
    """What one MoE layer call saw, handed to observers (the profiler, trace recorders)."""

    layer: int
    hidden: torch.Tensor  # [T, H] entering the block
    weights: torch.Tensor  # [T, k] normalised routing weights, descending, before the adaptive gate
    ids: torch.Tensor  # [T, k]
    keep: torch.Tensor  # [T, k] bool: what the gate kept
    output: torch.Tensor  # [T, H] the block's output (in the autograd graph when grad is on)
    expert_outputs: torch.Tensor | None  # [T, k, H] unweighted expert outputs, when requested


@dataclass
class Observers:
    """Callbacks shared by all blocks of an engine; `expert_outputs` asks blocks to keep per-expert outputs."""

    callbacks: list[Callable[[LayerRecord], None]] = field(default_factory=list)
    expert_outputs: bool = False


class OffloadedMoE(nn.Module):
    def __init__(
        self,
        layer: int,
        gate: nn.Module,
        manager: ExpertManager,
        act: Callable[[torch.Tensor], torch.Tensor],
        top_k: int,
        routing: str,
        gate_policy: Callable[[], GatePolicy],
        observers: Observers,
        next_layer: int | None = None,
        next_gate: nn.Module | None = None,
        prefetch: bool = True,
        linear: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.layer = layer
        self.gate = gate
        self.manager = manager
        self.act = act
        self.top_k = top_k
        self.routing = routing
        self.gate_policy = gate_policy
        self.observers = observers
        self.next_layer = next_layer
        # the next layer's router, held without registering the module twice
        self._next_gate = [next_gate] if next_gate is not None else []
        self.prefetch_enabled = prefetch and next_gate is not None
        #: x × one expert part's weights (a part's tensors: `{"": w}` natively; quantized, experts_format.py)
        self.linear = linear or (lambda x, w: F.linear(x, w[""]))

    def predict_next(self, x: torch.Tensor) -> list[int]:
        """Experts the next layer would keep, from its router applied to the hidden state entering this
        block and the next layer's adaptive gate (prefetch follows the gate)."""
        logits = F.linear(x, self._next_gate[0].weight)  # [T, E]
        weights, ids = route(logits, self.top_k, self.routing)
        _, ids, keep = apply_gate(weights, ids, self.gate_policy().threshold(self.next_layer))
        return sorted(set(ids[keep].tolist()))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [T, H]
        _, weights, ids = self.gate(x)  # [T, k] float32, [T, k]
        gated_w, gated_ids, keep = apply_gate(weights, ids, self.gate_policy().threshold(self.layer))
        if self.prefetch_enabled and x.shape[0] == 1:
            self.manager.prefetch(self.next_layer, self.predict_next(x))
        out = torch.zeros_like(x)
        needed = sorted(set(gated_ids[keep].tolist()))
        record = self.observers.expert_outputs and bool(self.observers.callbacks)
        expert_out = x.new_zeros((x.shape[0], self.top_k, h)) if record else None

        lin = self.linear

        def compute(expert: int, w: dict[str, dict[str, torch.Tensor]]) -> None:
            token_idx, k_pos = torch.where(gated_ids == expert)
            cur = x[token_idx]  # [t, H]
            hidden = self.act(lin(cur, w["w1"])) * lin(cur, w["w3"])  # [t, I]
            y = lin(hidden, w["w2"])  # [t, H]
            if expert_out is not None:
                expert_out[token_idx, k_pos] = y.detach()
            out.index_add_(0, token_idx, (y * gated_w[token_idx, k_pos, None]).to(out.dtype))

        self.manager.run_layer(self.layer, needed, compute, tokens=x.shape[0], activations=int(keep.sum()))
        if self.observers.callbacks:
            rec = LayerRecord(self.layer, x, weights, ids, keep, out, expert_out)
            for fn in self.observers.callbacks:
                fn(rec)
        return out.reshape(b, s, h)
