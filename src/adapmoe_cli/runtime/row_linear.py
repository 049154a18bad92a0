"""`linear(x, w, bias)`: `F.linear`, except that one token's product (x one row, float32) is computed eagerly by
whichever of two ways this machine does faster for that weight shape, as measured on the first products of
that shape in the process.

`F.linear` of one row goes to the BLAS PyTorch was built with (MKL), and how fast MKL's single-row product is
depends on the CPU more than on the bytes: on the project's AMD EPYC it reads a weight with short rows
(`hidden_size` numbers: w1 and w3, the lm head) at 7–8 GB/s when the weight is not in the cache, where
`(w * x).sum(-1)` — a multiply into a buffer that stays in the cache, and a sum — reads the same bytes at
18–30 GB/s (a full-size expert's w1 and w3, 11 MB: 1.49 against 0.53 ms); for rows of thousands of numbers
(w2) MKL is as fast or faster. On another CPU MKL may win everywhere. So the first products of each weight
shape alternate between the two ways, `_TRIALS` of them timed, on the model's own weights as the decode step
reads them (nothing at start-up; the loop's memory is one 2 MiB buffer per thread); then the shape takes the
multiply-and-sum only where it is clearly faster (`prefers_loop`), and keeps that choice for the life of the
process.

Several rows (prompts), other dtypes (a multiply in bfloat16 would round each product) and inputs that need a
gradient keep `F.linear`. Both ways compute the same sums in another order: logits agree to float rounding
(tests/test_families.py holds either way to transformers' tokens). The compiled step has its own form of the
idea (expert_kernel.row_product)."""

from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

#: the multiply-and-sum is taken where its time is at most this share of BLAS's (`prefers_loop`): a shape
#: where the two are within noise keeps BLAS
_MARGIN = 0.85
#: the products of a shape timed before choosing, half each way (after one untimed each way)
_TRIALS = 24

_chosen: dict[tuple[int, int], bool] = {}  # (N, K) → multiply-and-sum (True) or BLAS (False)
_trials: dict[tuple[int, int], tuple[list[float], list[float]]] = {}  # (N, K) → (BLAS's times, the loop's)
#: the loop's products are made this many bytes of rows at a time (`_loop`)
_CHUNK = 2 << 20
_local = threading.local()
_forced: bool | None = None
_clock = time.perf_counter


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] × w [N, K] (+ bias), as `F.linear` computes it — for one float32 row, by the faster way."""
    loop = _forced if _forced is not None else _chosen.get(w.shape)  # (torch.Size hashes as the tuple)
    if loop is False or not (x.dim() >= 2 and x.numel() == x.shape[-1] and x.dtype == torch.float32
                             and w.dtype == torch.float32 and w.dim() == 2 and not x.requires_grad and x.is_cpu):
        return F.linear(x, w, bias)  # (a shape that keeps BLAS pays one lookup here, a few µs a token)
    if loop is None:
        return _trial((w.shape[0], w.shape[1]), x, w, bias)
    return _loop(x, w, bias)


def chosen() -> dict[str, str]:
    """The choices made in this process: "NxK" → "multiply-and-sum" or "blas"."""
    return {f"{n}x{k}": "multiply-and-sum" if loop else "blas" for (n, k), loop in sorted(_chosen.items())}


def force(loop: bool | None) -> None:
    """Take the multiply-and-sum everywhere (True), BLAS everywhere (False) or the measured choice (None):
    tests and measurements compare the two on one machine."""
    global _forced
    _forced = loop


def prefers_loop(blas_s: list[float], loop_s: list[float]) -> bool:
    """The rule: the multiply-and-sum only where its lower quartile time is clearly lower. (While experts are
    still loading, a product now and then takes ten times as long — the loader's thread holds the CPU — so the
    lower quartile, not the median or the mean, is each way's own speed.)"""
    return _low(loop_s) <= _MARGIN * _low(blas_s)


def _low(times: list[float]) -> float:
    return sorted(times)[len(times) // 4]


def _loop(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The multiply and the sum, `_CHUNK` bytes of rows at a time through this thread's one buffer (allocated
    once: a fresh temporary of a full-size expert's 11 MB would be new pages each call, 1–14 ms of page faults;
    a buffer that size per shape would cost a memory cap a slot; 2 MiB pieces take 7 % longer than one piece
    on the full-size store's w1 and w3)."""
    n, k = w.shape
    if 4 * k > _CHUNK:  # (no model has rows this long; one would not fit the buffer)
        return F.linear(x, w, bias)
    flat = getattr(_local, "buffer", None)
    if flat is None or flat.numel() != _CHUNK // 4:
        with torch.inference_mode(False):  # a normal tensor: written inside inference mode or outside it
            flat = _local.buffer = torch.empty(_CHUNK // 4)
    rows, xr, y = _CHUNK // (4 * k), x.reshape(1, k), torch.empty(n)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        torch.sum(torch.mul(w[s:e], xr, out=flat[: (e - s) * k].view(e - s, k)), -1, out=y[s:e])
    y = y.view(*x.shape[:-1], n)
    return y if bias is None else y + bias


def _trial(key: tuple[int, int], x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One of a shape's first products: BLAS and the loop in turn, each timed; the last one chooses, leaving out
    each way's first (which pays for first touches)."""
    blas, loop = _trials.setdefault(key, ([], []))
    by_loop = len(loop) < len(blas)
    t0 = _clock()
    y = _loop(x, w, bias) if by_loop else F.linear(x, w, bias)
    (loop if by_loop else blas).append(_clock() - t0)
    if len(loop) > _TRIALS // 2:
        _chosen[key] = prefers_loop(blas[1:], loop[1:])
        del _trials[key]
    return y
