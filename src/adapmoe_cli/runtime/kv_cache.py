"""The KV cache of an eager decode: transformers' `DynamicCache`, whose full-attention layers keep their keys
and values in buffers with room to grow instead of concatenating.

transformers' `DynamicLayer.update` concatenates the new position onto the old keys and values: every decoded
token copies the whole cache and allocates a new one, so a token's cost grows with the context (Mixtral's
shape in bfloat16: 537 MB copied a token at 4,096 positions, 2.1 GB at 16,384 — 47 and 693 ms a token on
this project's CPU, against 0.7 ms with this cache: scripts/measure_kv_cache.py). `GrowingLayer` writes each
new position into a buffer sized for more (a quarter more than needed, at least `MIN_ROOM` positions) and
hands attention a view of the positions held: a copy only when the buffer grows. The same numbers reach
attention; cropping, and anything that replaces the keys (beam reordering), work as transformers' layer: a
layer whose keys are no longer a view of its buffer takes them over on its next update.

Sliding-window layers stay transformers' own (they hold at most the window). A compiled decode step keeps
transformers' plain `DynamicCache` (runtime/compiled.py marks the concatenated keys' length dynamic)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: the fewest positions a buffer grows by (a prompt's first update sizes it to the prompt plus this)
MIN_ROOM = 256


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` with its keys and values held in buffers with room to grow (module docstring)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        #: times the buffers were (re)allocated: what a test counts
        self.grown = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.compiler.is_compiling():  # a graph concatenates, as transformers' layer does (new_kv_cache gives
            return super().update(key_states, value_states, *args, **kwargs)  # compiled engines that cache)
        held = self.get_seq_length()
        end = held + key_states.shape[-2]
        if not self._fits(held, end, key_states, value_states):
            self._grow(held, end, key_states, value_states)
        kbuf, vbuf = self.buffers
        kbuf[..., held:end, :].copy_(key_states)
        vbuf[..., held:end, :].copy_(value_states)
        self.keys, self.values = kbuf[..., :end, :], vbuf[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self.buffers = None
        super().reset()

    def _fits(self, held: int, end: int, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether the buffers take positions up to `end` of tensors like these, and the layer's keys and values
        are their first `held` positions (not new tensors put in their place, by a reordering for one)."""
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            return False
        for t, new, buf in zip((self.keys, self.values), (key_states, value_states), self.buffers, strict=True):
            if (buf.shape[:-2] != new.shape[:-2] or buf.shape[-1] != new.shape[-1] or buf.dtype != new.dtype
                    or buf.device != new.device):
                return False
            if held and (t.data_ptr() != buf.data_ptr() or t.stride() != buf.stride()):
                return False
        return True

    def _grow(self, held: int, end: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        room = max(end + end // 4, end + MIN_ROOM)
        new = []
        for old, like in ((self.keys, key_states), (self.values, value_states)):
            buf = like.new_empty((*like.shape[:-2], room, like.shape[-1]))
            if held:
                buf[..., :held, :].copy_(old[..., :held, :])
            new.append(buf)
        self.buffers = (new[0], new[1])
        self.grown += 1


class GrowingCache(DynamicCache):
    """`DynamicCache(config=…)` with `GrowingLayer` for its full-attention layers."""

    def __init__(self, config: Any):
        super().__init__(config=config)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:  # (a config naming no layer types: made on first use)
            self.layer_class_to_replicate = GrowingLayer
