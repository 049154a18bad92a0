"""Each expert's mean output and its spread around it, measured on calibration text (windows spread over
all of it, profiler.py): what a compensating gate replaces a dropped expert with and how it weighs each
share (runtime/gating.py `ExpertStats`).

Measured on the occurrences a gate drops: those in the lower half of the router's ranking (rank > k/2;
the second with top-2), each weighted by its share squared — the dropped output's error is w_j·(E_j − mean_j),
so the mean that minimises its expected square is the w²-weighted one. The spread is the weighted RMS
distance of the outputs from that mean, shrunk toward the layer's average for an expert seen only a few
times (`PRIOR_OCCURRENCES`), and divided by the layer's average so that 1 is a typical expert; an expert
never seen there gets no mean (its drop is not compensated) and the layer's largest spread.

On disk (`write`/`read`): a safetensors file of float32 tensors `mean.L` [E, H] and `spread.L` [E] per
MoE layer L, named by the profile with its sha256 (profile_file.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from adapmoe_cli.errors import ProfileError
from adapmoe_cli.runtime.gating import ExpertStats
from adapmoe_cli.safe_io import read_capped, write_atomic

PRIOR_OCCURRENCES = 8  # occurrences' worth of the layer's average spread an expert's own is shrunk toward
MAX_BYTES = 2 << 30
FORMAT = "adapmoe-expert-stats"


class Accumulator:
    """Sums over the calibration text, one layer at a time (`add`), then `stats()`."""

    def __init__(self, layers: list[int], experts: int, top_k: int):
        self.layers, self.experts = layers, experts
        self.first = max(1, top_k // 2)  # the first rank counted (0-based): the lower half of the ranking
        self.w = {layer: torch.zeros(experts, dtype=torch.float64) for layer in layers}
        self.n = {layer: torch.zeros(experts, dtype=torch.float64) for layer in layers}
        self.wy: dict[int, torch.Tensor] = {}
        self.wy2 = {layer: torch.zeros(experts, dtype=torch.float64) for layer in layers}

    def add(self, layer: int, shares: torch.Tensor, ids: torch.Tensor, outputs: torch.Tensor) -> None:
        """shares, ids [T, k] (ranked, descending), outputs [T, k, H]: each routed expert's own output."""
        s = shares[:, self.first:].detach().double().reshape(-1)
        i = ids[:, self.first:].reshape(-1).long()
        y = outputs[:, self.first:].detach().double().reshape(s.numel(), -1)
        w = s * s
        if layer not in self.wy:
            self.wy[layer] = torch.zeros(self.experts, y.shape[1], dtype=torch.float64)
        self.w[layer].index_add_(0, i, w)
        self.n[layer].index_add_(0, i, torch.ones_like(w))
        self.wy[layer].index_add_(0, i, w[:, None] * y)
        self.wy2[layer].index_add_(0, i, w * y.square().sum(-1))

    def stats(self) -> ExpertStats:
        mean, spread = {}, {}
        for layer in self.layers:
            w, n = self.w[layer], self.n[layer]
            seen = w > 0
            m = torch.where(seen[:, None], self.wy[layer] / w.clamp(min=1e-300)[:, None], 0.0)
            var = torch.where(seen, (self.wy2[layer] / w.clamp(min=1e-300) - m.square().sum(-1)).clamp(min=0), 0.0)
            avg = float((w * var).sum() / w.sum()) if bool(seen.any()) else 1.0
            shrunk = ((n * var + PRIOR_OCCURRENCES * avg) / (n + PRIOR_OCCURRENCES)).sqrt()
            if bool(seen.any()):
                shrunk = torch.where(seen, shrunk, shrunk[seen].max())
                shrunk = shrunk / shrunk[seen].mean()
            else:
                shrunk = torch.ones_like(shrunk)
            mean[layer], spread[layer] = m.float(), shrunk.float()
        return ExpertStats(mean, spread)


def write(path: Path, stats: ExpertStats) -> str:
    """Write the statistics atomically; their sha256."""
    from safetensors.torch import save

    tensors = {}
    for layer in stats.mean:
        tensors[f"mean.{layer}"] = stats.mean[layer].contiguous()
        tensors[f"spread.{layer}"] = stats.spread[layer].contiguous()
    blob = save(tensors, metadata={"format": FORMAT})
    write_atomic(path, blob)
    return hashlib.sha256(blob).hexdigest()


def read(path: Path, sha256: str, layers: list[int], experts: int, hidden: int | None = None) -> ExpertStats:
    """The statistics at `path`, checked against the sha256 the profile recorded, the model's layers and
    expert count (and hidden size, when given), and for finite numbers. ProfileError otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    def bad(why: str) -> ProfileError:
        return ProfileError(f"the expert statistics {path} {why}; re-run `adapmoe profile`")

    try:
        present = path.is_file()
    except (OSError, ValueError):  # a name the system refuses (too long, a NUL in it)
        present = False
    if not present:
        raise bad("are missing")
    blob = read_capped(path, MAX_BYTES, str(path), ProfileError, follow=True)
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise bad("do not match the profile that names them")
    try:
        tensors = load(bytes(blob))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise bad(f"are not a safetensors file ({e})") from None
    mean, spread = {}, {}
    for layer in layers:
        m, s = tensors.get(f"mean.{layer}"), tensors.get(f"spread.{layer}")
        if m is None or s is None:
            raise bad(f"lack layer {layer}")
        if m.dim() != 2 or m.shape[0] != experts or (hidden is not None and m.shape[1] != hidden) \
                or tuple(s.shape) != (experts,):
            raise bad(f"have layer {layer} of shapes {list(m.shape)}, {list(s.shape)}")
        if not (m.is_floating_point() and s.is_floating_point()):
            raise bad(f"have layer {layer} not in floating point")
        if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(s).all())) or bool((s < 0).any()):
            raise bad(f"hold numbers in layer {layer} that are NaN, infinite or negative spreads")
        mean[layer], spread[layer] = m.float(), s.float()
    return ExpertStats(mean, spread, str(path), sha256)


def entry(stats: ExpertStats, base: Path) -> dict[str, str]:
    """How a plan names the statistics: the file relative to the plan's folder `base` (its name alone when
    they lie side by side, as in a store or a shipped model) and its sha256."""
    return {"file": os.path.relpath(Path(stats.file).resolve(), Path(base).resolve()), "sha256": stats.sha256}


def from_entry(item: object, base: Path, layers: list[int], experts: int, where: str) -> ExpertStats:
    """The statistics an `entry` names (relative to `base`), read and checked."""
    if not isinstance(item, dict) or not isinstance(item.get("file"), str) or not isinstance(item.get("sha256"), str):
        raise ProfileError(f"{where}: the gate's expert statistics must name a file and its sha256")
    return read(base / item["file"], item["sha256"], layers, experts)
