"""The KV cache of a decode: transformers' `DynamicCache`, whose full-attention layers keep their keys and values
in buffers with room to grow instead of concatenating, eagerly and in the compiled step alike.

transformers' `DynamicLayer.update` concatenates the new position onto the old keys and values: every decoded
token copies the whole cache and allocates a new one, so a token's cost grows with the context (Mixtral's
shape in bfloat16: 537 MB copied a token at 4,096 positions, 2.1 GB at 16,384 — 47 and 693 ms a token on
this project's CPU, against 0.7 ms with this cache: scripts/measure_kv_cache.py). `GrowingLayer` writes each
new position into a buffer sized for more (a quarter more than needed, at least `MIN_ROOM` positions): a copy
only when the buffer grows.

Attention gets the positions held, eagerly and in the compiled decode step alike: the same numbers as
transformers' layer. The layer's `keys` and `values` are a view of them, made when asked for; cropping, and
anything that puts other tensors in their place (beam reordering), work as transformers' layer: tensors that
are not the buffers' are taken over at the next update.

A compiled step (runtime/compiled.py) cannot make a view from a length it reads in Python (a constant of
the graph: a recompile a token) or from a tensor's value. So its caller makes room first
(`GrowingCache.reserve`) and hands each layer a tensor as long as the positions held after the step
(`step`, a view of one small tensor shared by the layers); the graph takes the buffers and that tensor as
inputs, their sizes dynamic, writes the new position into the buffers in place and gives attention their
first `step.shape[0]` positions; the caller then counts the position held (`advance`). A longer step or a
grown buffer compiles nothing; a step that does not run compiled counts nothing. The buffers keep one
position spare: a view as long as its buffer would be compiled for again. Per token this costs 13–17 µs of
Python for 8 layers, where views handed to the graph cost ~150 µs (`reserve` making two per layer).

Sliding-window layers stay transformers' own (they hold at most the window)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: the fewest positions a buffer grows by (a prompt's first update sizes it to the prompt plus this)
MIN_ROOM = 256

_OWN = object()  # a part (keys, values) that is its buffer's first positions


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` with its keys and values held in buffers with room to grow (module docstring). `keys` and
    `values` are properties: the held positions of the buffers, as a view made when asked for; a tensor put in
    their place (a crop's shorter view is still the buffer's; a reordering's is not) is taken over at the next
    update."""

    def __init__(self) -> None:
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._parts: list[Any] = [None, None]  # per part: _OWN, or the tensor transformers' code put there
        self._lens = [0, 0]  # per part: positions of the buffer held, where _OWN
        self._views: list[tuple[int, torch.Tensor] | None] = [None, None]  # the last view made, and its length
        #: positions a compiled step feeds, and a tensor as long as the positions it leaves held (`reserve`)
        self.pending = 0
        self.step: torch.Tensor | None = None
        #: times the buffers were (re)allocated since the layer was started: what a test counts
        self.grown = 0
        super().__init__()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.buffers, self.grown = None, 0
        super().lazy_initialization(key_states, value_states)

    keys = property(lambda self: self._get(0), lambda self, t: self._set(0, t))
    values = property(lambda self: self._get(1), lambda self, t: self._set(1, t))

    def _get(self, i: int) -> Any:
        part = self._parts[i]
        if part is not _OWN:
            return part
        n, view = self._views[i] or (-1, None)
        if n != self._lens[i]:
            view = self.buffers[i][..., :self._lens[i], :]
            self._views[i] = (self._lens[i], view)
        return view

    def _set(self, i: int, t: Any) -> None:
        buf = None if self.buffers is None else self.buffers[i]
        if (isinstance(t, torch.Tensor) and buf is not None and t.data_ptr() == buf.data_ptr()
                and t.stride() == buf.stride() and t.shape[:-2] == buf.shape[:-2] and t.shape[-1] == buf.shape[-1]
                and t.dtype == buf.dtype):  # the buffer's first positions (a crop, or our own view)
            self._parts[i], self._lens[i], self._views[i] = _OWN, t.shape[-2], (t.shape[-2], t)
        else:
            self._parts[i] = t

    def _held(self) -> int | None:
        """Positions held in the buffers, or None where a part is not theirs."""
        if self._parts[0] is _OWN and self._parts[1] is _OWN and self._lens[0] == self._lens[1]:
            return self._lens[0]
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # the compiled step, after `reserve` (module docstring)
            end, n = self.step.shape[0], key_states.shape[-2]
            kbuf, vbuf = self.buffers
            kbuf.narrow(-2, end - n, n).copy_(key_states)
            vbuf.narrow(-2, end - n, n).copy_(value_states)
            return kbuf.narrow(-2, 0, end), vbuf.narrow(-2, 0, end)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        end = held + key_states.shape[-2]
        self._room(held, end, key_states, value_states)
        kbuf, vbuf = self.buffers
        kbuf[..., held:end, :].copy_(key_states)
        vbuf[..., held:end, :].copy_(value_states)
        self._lens = [end, end]
        return self.keys, self.values

    def get_seq_length(self) -> Any:
        if torch.compiler.is_compiling():
            return self.step.shape[0] - self.pending
        held = self._held()
        return held if held is not None else super().get_seq_length()

    def reserve(self, n: int) -> int | None:
        """Before a compiled step feeding `n` positions: room for them; the positions held after it, or None
        where the layer holds nothing yet (the step runs eagerly and starts it)."""
        held = self.get_seq_length()
        if not held:
            return None
        if self._held() != held or held + n >= self.buffers[0].shape[-2]:  # (else `_room` has nothing to do)
            self._room(held, held + n, self.keys, self.values)
        self.pending = n
        return held + n

    def advance(self, n: int) -> None:
        """After a compiled step that fed `n` positions: they are held."""
        self._lens = [self._lens[0] + n, self._lens[1] + n]

    def reset(self) -> None:
        self.buffers = None
        super().reset()

    def _room(self, held: int, end: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers that take positions up to `end` of tensors like these, holding the layer's first `held`, with
        one position to spare (a compiled step's graph, made for views shorter than their buffers, would be
        compiled again for one as long)."""
        if self.buffers is not None and end < self.buffers[0].shape[-2] and (not held or self._held() == held):
            if all(buf.shape[:-2] == new.shape[:-2] and buf.shape[-1] == new.shape[-1] and buf.dtype == new.dtype
                   and buf.device == new.device
                   for buf, new in zip(self.buffers, (key_states, value_states), strict=True)):
                return
        room = max(end + end // 4, end + MIN_ROOM)
        new = []
        for old, like in ((self.keys, key_states), (self.values, value_states)):
            buf = like.new_empty((*like.shape[:-2], room, like.shape[-1]))
            if held:
                buf[..., :held, :].copy_(old[..., :held, :])
            new.append(buf)
        self.buffers = (new[0], new[1])
        self._parts, self._lens, self._views = [_OWN, _OWN], [held, held], [None, None]
        self.grown += 1


class GrowingCache(DynamicCache):
    """`DynamicCache(config=…)` with `GrowingLayer` for its full-attention layers."""

    def __init__(self, config: Any = None):
        super().__init__(config=config)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:  # (a config naming no layer types: made on first use)
            self.layer_class_to_replicate = GrowingLayer
        self._ruler: torch.Tensor | None = None  # a tensor whose first positions are each step's length

    def reserve(self, n: int) -> bool:
        """Before a compiled step feeding `n` positions (module docstring); False: run this step eagerly."""
        step = None
        for layer in self._growing():
            end = layer.reserve(n)
            if end is None or (step is not None and step.shape[0] != end):
                return False
            if step is None:
                if self._ruler is None or self._ruler.shape[0] < end:
                    self._ruler = torch.empty(max(2 * end, MIN_ROOM), dtype=torch.int8)
                step = self._ruler[:end]
            layer.step = step
        return True

    def advance(self, n: int) -> None:
        """After a compiled step that fed `n` positions: they are held."""
        for layer in self._growing():
            layer.advance(n)

    def _growing(self) -> list[GrowingLayer]:
        return [layer for layer in self.layers if isinstance(layer, GrowingLayer)]
