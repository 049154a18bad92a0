"""The KV cache of a decode: transformers' `DynamicCache`, whose full-attention layers keep their keys and values
in buffers with room to grow instead of concatenating, eagerly and in the compiled step alike.

transformers' `DynamicLayer.update` concatenates the new position onto the old keys and values: every decoded
token copies the whole cache and allocates a new one, so a token's cost grows with the context (Mixtral's
shape in bfloat16: 537 MB copied a token at 4,096 positions, 2.1 GB at 16,384 — 47 and 693 ms a token on
this project's CPU, against 0.7 ms with this cache: scripts/measure_kv_cache.py). `GrowingLayer` writes each
new position into a buffer sized for more (a quarter more than needed, at least `MIN_ROOM` positions): a copy
only when the buffer grows.

Attention gets a view of the positions held, eagerly and in the compiled decode step alike: the same numbers
as transformers' layer. Cropping, and anything that replaces the keys (beam reordering), work as
transformers' layer: a layer whose keys are no longer a view of its buffer takes them over on its next update.

A compiled step (runtime/compiled.py) cannot make a view whose length it computes, and a Python length read
in the graph would be a constant of it (a recompile a token). So its caller reserves the step's position
first (`GrowingCache.reserve`): the layer's keys and values become views one position longer, which the
graph takes as inputs — their length a dynamic size, so a longer view or a grown buffer compiles nothing —
and writes the new position into in place (their last), as `pending` until the step has run (`advance`).
A step that does not run compiled leaves nothing behind: an eager update or a crop gives a reservation back
first (`release`). A view never spans its whole buffer (one position is kept spare): laid out as a whole
tensor, it would be compiled for again.

Sliding-window layers stay transformers' own (they hold at most the window)."""

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
        #: positions at the end of `keys` reserved for a compiled step, not yet held (`reserve`)
        self.pending = 0
        #: times the buffers were (re)allocated: what a test counts
        self.grown = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # the compiled step: its positions were reserved (module docstring)
            n = key_states.shape[-2]
            self.keys[..., -n:, :].copy_(key_states)
            self.values[..., -n:, :].copy_(value_states)
            return self.keys, self.values
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.release()
        held = self.get_seq_length()
        end = held + key_states.shape[-2]
        if not self._fits(held, end, key_states, value_states):
            self._grow(held, end, key_states, value_states)
        kbuf, vbuf = self.buffers
        kbuf[..., held:end, :].copy_(key_states)
        vbuf[..., held:end, :].copy_(value_states)
        self.keys, self.values = kbuf[..., :end, :], vbuf[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        held = super().get_seq_length()
        return held - self.pending if held else held

    def crop(self, tokens_to_remove: int) -> None:
        self.release()
        super().crop(tokens_to_remove)

    def reserve(self, n: int) -> bool:
        """Before a compiled step feeding `n` positions: `keys` and `values` become views of the buffers with
        room for them at their end, which the graph writes (`pending` until `advance`). False: the layer holds
        nothing yet (the step runs eagerly and initialises it)."""
        if not self.is_initialized or self.keys.numel() == 0:
            return False
        self.release()
        held = self.keys.shape[-2]
        end = held + n
        if not self._fits(held, end, self.keys, self.values):
            self._grow(held, end, self.keys, self.values)
        kbuf, vbuf = self.buffers
        self.keys, self.values = kbuf[..., :end, :], vbuf[..., :end, :]
        self.pending = n
        return True

    def advance(self) -> None:
        """After a compiled step: the positions it wrote are held."""
        self.pending = 0

    def release(self) -> None:
        """Give back positions reserved for a step that did not run compiled (an eager update or a crop does this
        first: a step that raised, or ran eagerly after all, leaves nothing behind)."""
        if self.is_initialized and self.pending:
            end = self.keys.shape[-2] - self.pending
            self.keys, self.values = self.keys[..., :end, :], self.values[..., :end, :]
            self.pending = 0

    def reset(self) -> None:
        self.buffers = None
        super().reset()

    def _fits(self, held: int, end: int, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether the buffers take positions up to `end` of tensors like these, leaving one spare, and the layer's
        keys and values are their first `held` positions (not new tensors put in their place, by a reordering for
        one). (The spare position: a view as long as its buffer is laid out as a whole tensor, and a compiled
        step's graph, made for views shorter than their buffers, would be compiled again for it.)"""
        if self.buffers is None or end >= self.buffers[0].shape[-2]:
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

    def __init__(self, config: Any = None):
        super().__init__(config=config)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:  # (a config naming no layer types: made on first use)
            self.layer_class_to_replicate = GrowingLayer

    def reserve(self, n: int) -> bool:
        """Before a compiled step feeding `n` positions (module docstring); False: run this step eagerly."""
        return all(layer.reserve(n) for layer in self._growing())

    def advance(self) -> None:
        """After a compiled step: what it fed is held."""
        for layer in self._growing():
            layer.advance()
    def _growing(self) -> list[GrowingLayer]:
        return [layer for layer in self.layers if isinstance(layer, GrowingLayer)]
