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


#: the largest h39s file read: ~4 million layer calls of two experts (125,000 tokens of a 32-layer model), parsed
#: in ~13 s here; the shipped trace is 100 KB
MAX_H39S_BYTES = 16 << 20
#: the most experts a layer may have in a trace (as a simulated model may: ModelSpec)
MAX_EXPERT_ID = (1 << 12) - 1


def h39s_calls(path: Path) -> list[tuple[int, ...]]:
    """The layer calls of an h39s file, each the sorted expert ids of one line; every problem one line naming
    the file and the line: not text, an id that is not a plain number, negative or above MAX_EXPERT_ID, an
    expert named twice."""
    from adapmoe_cli.safe_io import read_capped

    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_H39S_BYTES:
        raise UsageError(f"h39s trace {path} is {path.stat().st_size:,} bytes; adapmoe simulates traces of at most "
                         f"{MAX_H39S_BYTES >> 20} MiB (~4 million layer calls): cut it to fewer tokens")
    data = read_capped(path, MAX_H39S_BYTES, f"h39s trace {path}", UsageError, follow=True)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not an h39s trace: not UTF-8 text (byte {e.start})") from None
    calls = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        fields = line.split(",")
        if not all(f.strip().isascii() and f.strip().isdigit() for f in fields):
            raise UsageError(f"{path}, line {n}: {line[:40]!r} is not comma-separated expert ids (numbers from 0)")
        ids = [int(f) for f in fields]
        if max(ids) > MAX_EXPERT_ID:
            raise UsageError(f"{path}, line {n}: expert {max(ids)} is above {MAX_EXPERT_ID} (at most "
                             f"{MAX_EXPERT_ID + 1} experts a layer)")
        if len(set(ids)) < len(ids):
            raise UsageError(f"{path}, line {n} names an expert twice ({line[:40]})")
        calls.append(tuple(sorted(ids)))
    if not calls:
        raise UsageError(f"{path} holds no expert ids")
    return calls


def prefill_lines(calls: list[tuple[int, ...]]) -> int | None:
    """The layer count an h39s trace implies: the number of its leading prefill lines (wider than the last
    line), or None when it has no prefill."""
    width = [len(c) for c in calls]
    if width[0] <= width[-1]:
        return None
    n = 0
    while n < len(width) and width[n] == width[0]:
        n += 1
    return n


def read_h39s(path: Path, num_layers: int = 32, prefill: bool = True,
              calls: list[tuple[int, ...]] | None = None) -> SimTrace:
    """h39s/mlsys `active_experts.txt`: `num_layers` prefill lines (when the first line names more than
    top-k experts), then one line per decode step and layer. Weights are unknown (equal within a row,
    flagged), predictions absent (-1). A prefill layer call's experts spread over rows of one step.
    `prefill=False` drops the prefill: the decode starts from a cold cache. `calls`: the file's lines, when
    `h39s_calls` has read them already."""
    import numpy as np

    path = Path(path)
    calls = calls if calls is not None else h39s_calls(path)
    k = max(len(c) for c in calls[-num_layers:])
    has_prefill = len(calls[0]) > k
    pre, dec = (calls[:num_layers], calls[num_layers:]) if has_prefill else ([], calls)
    if not dec:
        raise UsageError(f"{path} holds only a prefill pass ({len(pre)} lines), no decode steps")
    if len(dec) % num_layers:
        raise UsageError(f"{path}: {len(dec)} decode lines are not a whole number of steps of {num_layers} layers; "
                         "check the model's layer count (--model-config)")
    k = max(len(c) for c in dec)
    pre_rows = max((-(-len(c) // k) for c in pre), default=0) if prefill else 0
    n_dec = len(dec) // num_layers
    tr = _empty(pre_rows + n_dec, num_layers, k)
    for layer, c in enumerate(pre if prefill else []):
        for j, e in enumerate(c):
            tr.ids[j // k, layer, j % k] = e
    ids = np.full((len(dec), k), -1, dtype=np.int16)  # the decode lines, filled a width at a time
    for w in {len(c) for c in dec}:
        rows = [i for i, c in enumerate(dec) if len(c) == w]
        ids[rows, :w] = np.array([dec[i] for i in rows], dtype=np.int16)
    tr.ids[pre_rows:] = torch.from_numpy(ids).view(n_dec, num_layers, k)
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
        raise UsageError(f"the trace names expert {st.num_experts - 1} but {model_name} has only {num_experts} (0 to "
                         f"{num_experts - 1}): choose a model config with {st.num_experts} experts, or check the trace")
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
