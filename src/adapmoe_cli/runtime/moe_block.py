"""The module swapped into each decoder layer in place of the family's sparse-MoE block. Glue only:
routes with the original router module (so transformers' router-logit hooks still fire), asks the
manager to prefetch the next layer's predicted experts, and computes each needed expert from the slot
the manager hands it. Attention, norms and the KV cache stay transformers'."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adapmoe_cli.runtime.gating import route
from adapmoe_cli.runtime.manager import ExpertManager


class OffloadedMoE(nn.Module):
    def __init__(
        self,
        layer: int,
        gate: nn.Module,
        manager: ExpertManager,
        act: Callable[[torch.Tensor], torch.Tensor],
        top_k: int,
        routing: str,
        next_layer: int | None = None,
        next_gate: nn.Module | None = None,
        prefetch: bool = True,
    ):
        super().__init__()
        self.layer = layer
        self.gate = gate
        self.manager = manager
        self.act = act
        self.top_k = top_k
        self.routing = routing
        self.next_layer = next_layer
        # the next layer's router weight, held without registering the module twice
        self._next_gate = [next_gate] if next_gate is not None else []
        self.prefetch_enabled = prefetch and next_gate is not None

    def predict_next(self, x: torch.Tensor) -> list[int]:
        """Experts the next layer's router picks for the hidden state entering this block."""
        logits = F.linear(x, self._next_gate[0].weight)  # [T, E]
        _, ids = route(logits, self.top_k, self.routing)
        return sorted(set(ids.flatten().tolist()))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [T, H]
        _, weights, ids = self.gate(x)  # [T, k] float32, [T, k]
        if self.prefetch_enabled and x.shape[0] == 1:
            self.manager.prefetch(self.next_layer, self.predict_next(x))
        out = torch.zeros_like(x)
        needed = sorted(set(ids.flatten().tolist()))
        stats = self.manager.stats
        stats.layer_tokens += x.shape[0]
        stats.expert_activations += ids.numel()

        def compute(expert: int, w: dict[str, torch.Tensor]) -> None:
            token_idx, k_pos = torch.where(ids == expert)
            cur = x[token_idx]  # [t, H]
            hidden = self.act(F.linear(cur, w["w1"])) * F.linear(cur, w["w3"])  # [t, I]
            y = F.linear(hidden, w["w2"]) * weights[token_idx, k_pos, None]  # [t, H]
            out.index_add_(0, token_idx, y.to(out.dtype))

        self.manager.run_layer(self.layer, needed, compute)
        return out.reshape(b, s, h)
