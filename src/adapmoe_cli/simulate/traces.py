"""Routing traces for the simulator: the project's own (`Trace` of a profile, or recorded from a run),
the h39s text format (one line per MoE-layer call: the sorted expert ids it used; a real Mixtral-8x7B trace
of that format ships with the package), and the projection of
a trace onto another model's layer count. A `SimTrace` says what the trace lacks (weights, predictions)
so that policies needing them can say they fell back. No timing, no policies."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapmoe_cli.errors import UsageError
from adapmoe_cli.profiling.trace import Trace

FORMATS = ("adapmoe", "h39s")

@dataclass(frozen=True)
class SimTrace:
    """A trace with its step grouping (`steps[r]` = forward of row r) and what it holds."""

    trace: Trace
    steps: list[int]
    prompt_steps: frozenset[int]  # positions of steps that are prompt passes (excluded from decode numbers)
    num_experts: int
    has_weights: bool = True
    has_predictions: bool = True
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_layers(self) -> int:
        return len(self.trace.layers)

    @property
    def decode_steps(self) -> int:
        return len(set(self.steps)) - len(self.prompt_steps)


def _empty(n: int, layers: int, k: int) -> Trace:
    return Trace(
        ids=torch.full((n, layers, k), -1, dtype=torch.int16), weights=torch.zeros(n, layers, k),
        pred_ids=torch.full((n, layers, k), -1, dtype=torch.int16), pred_weights=torch.zeros(n, layers, k),
        tokens=torch.zeros(n, dtype=torch.int32), layers=list(range(layers)),
    )


def read_h39s(path: Path, num_layers: int = 32, prefill: bool = True) -> SimTrace:
    """h39s/mlsys `active_experts.txt`: `num_layers` prefill lines (when the first line names more than
    top-k experts), then one line per decode step and layer. Weights are unknown (equal within a row,
    flagged), predictions absent (-1). A prefill layer call's experts spread over rows of one step.
    `prefill=False` drops the prefill: the decode starts from a cold cache."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read trace {path} ({e})") from None
    try:
        calls = [tuple(sorted(int(x) for x in ln.split(","))) for ln in text.split() if ln.strip()]
    except ValueError:
        raise UsageError(f"{path} is not an h39s trace (lines of comma-separated expert ids)") from None
    if not calls or any(e < 0 for c in calls for e in c):
        raise UsageError(f"{path} holds no expert ids")
    k = max(len(c) for c in calls[-num_layers:])
    has_prefill = len(calls[0]) > k
    pre, dec = (calls[:num_layers], calls[num_layers:]) if has_prefill else ([], calls)
    if len(dec) % num_layers:
        raise UsageError(f"{path}: {len(dec)} decode lines are not a whole number of steps of {num_layers} layers; "
                         "check the model's layer count (--model-config)")
    pre_rows = max((-(-len(c) // k) for c in pre), default=0) if prefill else 0
    n_dec = len(dec) // num_layers
    tr = _empty(pre_rows + n_dec, num_layers, k)
    for layer, c in enumerate(pre if prefill else []):
        for j, e in enumerate(c):
            tr.ids[j // k, layer, j % k] = e
    for t in range(n_dec):
        for layer in range(num_layers):
            c = dec[t * num_layers + layer]
            tr.ids[pre_rows + t, layer, : len(c)] = torch.tensor(c, dtype=torch.int16)
    tr.weights[:] = torch.where(tr.ids >= 0, 1.0 / k, 0.0)
    steps = [0] * pre_rows + [t + (1 if pre_rows else 0) for t in range(n_dec)]
    notes = ["h39s trace: sorted expert ids only (no routing weights, no top-1 order, no next-layer predictions)"]
    if has_prefill and not prefill:
        notes.append("prefill dropped: the decode starts from a cold cache")
    return SimTrace(tr, steps, frozenset({0} if pre_rows else ()), int(tr.ids.max()) + 1, has_weights=False,
                    has_predictions=False, source=str(path), notes=tuple(notes))


def from_trace(trace: Trace, num_experts: int, source: str, steps: list[int] | None = None,
               prompt_steps: frozenset[int] = frozenset()) -> SimTrace:
    """The project's own trace. A profile's rows are calibration tokens: each is one (decode-like) step;
    a recorded run's (`profiling.record`) are grouped by `steps`, its prompt passes named by position."""
    has_pred = bool((trace.pred_ids >= 0).any())
    notes = () if has_pred else ("the trace holds no predictions: prefetching falls back to none",)
    return SimTrace(trace, steps if steps is not None else list(range(trace.num_tokens)), prompt_steps,
                    num_experts, has_weights=True, has_predictions=has_pred, source=source, notes=notes)


def project(st: SimTrace, num_layers: int, num_experts: int, model_name: str) -> SimTrace:
    """Map the trace onto a model with `num_layers` MoE layers: tile its layers (layer j replays trace
    layer j mod L) or keep the first ones. Expert ids keep their meaning, so the expert count must match."""
    if st.num_experts < num_experts:
        raise UsageError(
            f"the trace routes over {st.num_experts} experts per layer but {model_name} has {num_experts}: "
            "a trace cannot be projected honestly onto more experts than it saw (their popularity and "
            "co-occurrence are unknown); use a trace of a model with that many experts")
    if st.num_experts > num_experts:
        raise UsageError(f"the trace routes over {st.num_experts} experts per layer but {model_name} has only "
                         f"{num_experts}: choose a model config with {st.num_experts} experts")
    L = st.num_layers
    if num_layers == L:
        return st
    idx = [j % L for j in range(num_layers)]
    t = st.trace
    tr = Trace(t.ids[:, idx].clone(), t.weights[:, idx].clone(), t.pred_ids[:, idx].clone(),
               t.pred_weights[:, idx].clone(), t.tokens, list(range(num_layers)))
    note = (f"the trace has {L} layers and {model_name} {num_layers}: layers tiled (layer j replays trace layer "
            f"j mod {L})" if num_layers > L else
            f"the trace has {L} layers and {model_name} {num_layers}: only its first {num_layers} layers are used")
    return SimTrace(tr, st.steps, st.prompt_steps, st.num_experts, st.has_weights, st.has_predictions,
                    st.source, (*st.notes, note))


def uniform_trace(num_layers: int, num_experts: int, top_k: int, tokens: int = 256, seed: int = 0) -> SimTrace:
    """Routing with no structure: every decode step and layer draws top-k distinct experts uniformly (equal
    weights, no predictions). A pessimistic stand-in where no recorded trace of the model exists: real
    routing repeats experts across nearby tokens, which caches exploit."""
    g = torch.Generator().manual_seed(seed)
    tr = _empty(tokens, num_layers, top_k)
    for t in range(tokens):
        for layer in range(num_layers):
            tr.ids[t, layer] = torch.randperm(num_experts, generator=g)[:top_k].sort().values.to(torch.int16)
    tr.weights[:] = 1.0 / top_k
    return SimTrace(tr, list(range(tokens)), frozenset(), num_experts, has_weights=False, has_predictions=False,
                    source=f"uniform random routing ({tokens} tokens, seed {seed})",
                    notes=("routing assumed uniform at random: a pessimistic bound (real routing has locality)",))
