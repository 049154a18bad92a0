"""One token through one expert as one compiled kernel, in the compiled decode step (`--compile`).

Eagerly, x × a weight matrix for one token is `F.linear`, which PyTorch hands to the BLAS it was built with.
How fast that is depends on the CPU more than on the bytes: on this project's AMD EPYC machine MKL's
single-row product over a full-size expert's w1 and w3 (rows of `hidden_size` numbers) takes 1.43 ms, 7 GB/s,
where a multiply-and-sum loop compiled by inductor reads the same 11 MB in 0.40 ms (docs/performance.md).
So where the decode step is compiled, each expert of a native-format store (w1 and w3 or their fused w13,
the family's gated activation, w2, biases, the router's weight) is computed by one inductor kernel traced
from the eager arithmetic (`moe_block.expert_output`) with every product written as a multiply and a sum.

It is built on first use for the store's expert layout, traced with `make_fx` and compiled by inductor's
graph compiler without dynamo or AOT autograd, and called through the compiled module's own entry: a call
pays no guard checks and no wrappers (an embedded-model expert: 18–19 µs with its weights in the CPU's cache,
29–33 µs from memory, against 27–28 and 46–52 µs through `torch._inductor.compile`'s wrappers,
scripts/measure_expert_call.py), and checks its first output against the eager arithmetic.
Quantized parts (their own kernels, experts_format.py) and a fallback copy's parts (functions) are left to
the eager path; so is everything after a failed compile, said once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adapmoe_cli.runtime.moe_block import expert_output
from adapmoe_cli.skeleton import describe

#: the longest sum over K the kernel makes in one piece: inductor adds a sum of more than 4,096 numbers
#: through a cascade of partial sums, one helper call per vector, which holds a full-size expert's w2 (rows
#: of 7,424) to 18–23 GB/s; in pieces of at most this length, then summed, a full-size expert takes 4–7 %
#: less time and a decode step 0.5–0.6 ms less (scripts/measure_row_products.py, docs/performance.md)
_PIECE = 4096
#: how many views `ExpertKernel` remembers having checked (a cache's slots; more: it starts over)
_SEEN = 4096


def row_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [t, K] × a weight [N, K] as a multiply and a sum over K (inductor: one reduction loop; a long K in
    equal pieces of a quarter to all of `_PIECE`, then their sum; one piece where none divides K). The
    compiled step's one-row products: the experts' here, every `nn.Linear`'s (compiled.py)."""
    k = w.shape[-1]
    pieces = next((p for p in range(-(-k // _PIECE), -(-4 * k // _PIECE) + 1) if k % p == 0), 1)
    if pieces == 1:
        return (w * x.unsqueeze(-2)).sum(-1)
    return (w.view(*w.shape[:-1], pieces, k // pieces) * x.view(x.shape[0], 1, pieces, k // pieces)).sum(-1).sum(-1)


def _dot(x: torch.Tensor, part: dict[str, torch.Tensor]) -> torch.Tensor:
    """x × an expert part's weight (`row_product`)."""
    return row_product(x, part[""])


def weighted_output(glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], biases: bool, x: torch.Tensor,
                    w: dict[str, dict[str, torch.Tensor]], scale: torch.Tensor) -> torch.Tensor:
    """x through the expert whose parts are `w`, times `scale`, in x's dtype, every product a `row_product`:
    the arithmetic of `ExpertKernel` and `StackedExperts` alike."""
    return (expert_output(_dot, glu, biases, x, w) * scale).to(x.dtype)


class ExpertKernel:
    """`kernel(x, w, scale)`: x [1, H] through the expert whose parts are `w` (`by_part` views of a slot),
    times `scale`, in x's dtype — or None where it cannot: compute eagerly."""

    def __init__(self, glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], biases: bool,
                 note: Callable[[str], None] | None = None):
        """`glu`, `biases`: the family's, as `OffloadedExperts` has them (the same in every layer)."""
        self.glu = glu
        self.biases = biases
        self.note = note
        self.failure: str | None = None
        self._keys: tuple[str, ...] | None = None
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        #: the compiled module's own entry: [x, scale, *parts] → (output,)
        self._run: Callable[[list[torch.Tensor]], Any] | None = None
        #: id(w) → (w, its parts or None): a slot's views are made once (runtime/cache.py), so each is
        #: checked once, not on every call (held, so an id is not reused while it is here)
        self._seen: dict[int, tuple[Any, list[torch.Tensor] | None]] = {}

    def __call__(self, x: torch.Tensor, w: dict[str, Any], scale: torch.Tensor) -> torch.Tensor | None:
        seen = self._seen.get(id(w))
        if seen is not None and seen[0] is w and self._run is not None:
            parts = seen[1]
            return None if parts is None else self._run([x.contiguous(), scale, *parts])[0]
        if self.failure is not None:
            return None
        keys = self._keys if self._keys is not None else tuple(sorted(w))
        parts = self._parts(w, keys)
        if parts is not None and self._run is None:
            self._build(x, scale, keys, parts)
        if self._run is None:
            return None
        if len(self._seen) >= _SEEN:
            self._seen.clear()
        self._seen[id(w)] = (w, parts)
        if parts is None:
            return None
        return self._run([x.contiguous(), scale, *parts])[0]  # (compiled for a contiguous x: it checks)

    def _parts(self, w: dict[str, Any], keys: tuple[str, ...]) -> list[torch.Tensor] | None:
        """The parts' weights in the order of `keys`, or None where they are not plain tensors of the layout
        the kernel was built for."""
        try:
            parts = [w[k][""] for k in keys]
        except (KeyError, TypeError):  # a fallback copy's parts are functions; a quantized one has .q, .s
            return None
        if len(w) != len(keys) or any(len(w[k]) != 1 for k in keys):
            return None
        shapes = tuple(tuple(t.shape) for t in parts)
        if self._shapes is not None and shapes != self._shapes:
            return None
        return parts

    def _build(self, x: torch.Tensor, scale: torch.Tensor, keys: tuple[str, ...], parts: list[torch.Tensor]
               ) -> None:
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.decomposition import select_decomp_table
        from torch.fx.experimental.proxy_tensor import make_fx

        glu, biases = self.glu, self.biases

        def one_expert(x: torch.Tensor, scale: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor]:
            return (weighted_output(glu, biases, x, _named(keys, weights), scale),)

        try:
            # traced to ATen with inductor's decompositions, as AOT autograd would hand it to inductor, and
            # compiled by inductor's graph compiler itself: the call is the compiled module's own, without
            # the wrappers `torch._inductor.compile` puts around it for autograd and dynamo (9–18 µs of a
            # 27–52 µs expert call, scripts/measure_expert_call.py)
            graph = make_fx(one_expert, decomposition_table=select_decomp_table())(x, scale, *parts)
            compiled = compile_fx_inner(graph, [x, scale, *parts], is_inference=True)
            run = getattr(compiled, "current_callable", compiled)
            got = run([x.contiguous(), scale, *parts])[0]
            want = weighted_output(glu, biases, x, _named(keys, parts), scale)  # the same arithmetic, eagerly
            # (summed in another order, and in bfloat16 or float16 rounded once where eagerly each op rounds:
            # equal to a few of the dtype's steps, relative to the output's largest number; seen: one step)
            tol = max(1e-4, 4 * torch.finfo(want.dtype).eps) * float(want.abs().max()) + 1e-6
            if got.shape != want.shape or not float((got - want).abs().max()) <= tol:
                raise RuntimeError("the compiled kernel's output differs from the eager arithmetic's")
        except Exception as e:  # noqa: BLE001 — any failure of the compiler means: compute eagerly
            self.failure = f"{type(e).__name__}: {describe(e)}"[:200]
            if self.note is not None:
                self.note(f"--compile: compiling the expert kernel failed ({self.failure}); "
                          "experts computed eagerly")
            return
        self._run, self._keys, self._shapes = run, keys, tuple(tuple(t.shape) for t in parts)


def _named(keys: tuple[str, ...], weights: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Parts' weights in the order of `keys` as an expert's parts (`{name: {"": weight}}`)."""
    return {k: {"": t} for k, t in zip(keys, weights, strict=True)}


class StackedExperts:
    """One layer's experts read where the cache keeps them — each part of every slot as one tensor
    [slots, ...] over the layer's arena (`ExpertCache.stacked`) and each expert's place in it
    (`ExpertCache.place`) — for a compiled step that computes a settled layer's experts inside its graph
    (`OffloadedExperts._from_slots`): `stacked(x, expert, scale)` is `ExpertKernel`'s arithmetic, its weights
    picked by a tensor index, so nothing leaves the graph."""

    def __init__(self, glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], biases: bool,
                 parts: dict[str, dict[str, torch.Tensor]], place: torch.Tensor):
        self.glu = glu
        self.biases = biases
        self.parts = parts
        self.place = place
        for t in [place] + [p[""] for p in parts.values()]:
            torch._dynamo.mark_static(t)  # (the compiled step is dynamic in the KV cache's length only)

    def __call__(self, x: torch.Tensor, expert: torch.Tensor, scale: torch.Tensor, by_slot: bool = False
                 ) -> torch.Tensor:
        """`expert`: an expert's number, or with `by_slot` its slot's place in the arena (the manager's answer
        for a layer it still loads into, `moe_block.resolve_experts`)."""
        slot = expert.view(1) if by_slot else torch.index_select(self.place, 0, expert.view(1))
        w = {name: {"": torch.index_select(p[""], 0, slot)[0]} for name, p in self.parts.items()}
        return weighted_output(self.glu, self.biases, x, w, scale)
