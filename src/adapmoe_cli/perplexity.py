"""Loss and perplexity of text through an engine, with the counted runtime statistics of the pass.
Texts longer than the window are scored with a sliding window: each window re-reads `window - stride`
tokens of context and scores only the `stride` new ones. Knows nothing of terminals."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapmoe_cli.errors import UsageError
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.safe_io import read_text


@dataclass(frozen=True)
class EvalResult:
    nll_sum: float
    tokens: int  # tokens scored
    stats: Stats
    token_nll: torch.Tensor | None = None  # [tokens] float64, each scored token's loss in text order

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def read_text_tokens(tokenizer: Any, path: Path, min_tokens: int = 2, max_tokens: int | None = None) -> list[int]:
    """Tokenize a text file (BOS first if the tokenizer adds one). Raises on missing/empty/short text."""
    path = Path(path)
    text = read_text(path, "text file", UsageError)
    if not text.strip():
        raise UsageError(f"text file {path} is empty")
    ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    if len(ids) < min_tokens:
        raise UsageError(f"{path} has only {len(ids)} tokens but {min_tokens} are needed; give a longer text")
    return ids[:max_tokens] if max_tokens else ids


def spread_windows(ids: list[int], tokens: int, window: int) -> list[list[int]]:
    """`tokens` tokens of `ids` as windows of `window` tokens at evenly spaced starts (all of `ids` when it
    holds no more than `tokens`)."""
    if len(ids) <= tokens:
        return [ids]
    count = max(1, tokens // window)
    size = tokens // count
    step = (len(ids) - size) / max(1, count - 1)
    return [ids[round(i * step):round(i * step) + size] for i in range(count)]


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over n tokens; every position ≥ 1 scored once."""
    out, start, scored = [], 0, 1
    while scored < n:
        end = min(start + window, n)
        out.append((start, end, scored))
        scored = end
        start = max(0, end - max(1, window - stride)) if end < n else end  # ≥ 1 token of context
    return out


@torch.inference_mode()
def evaluate(
    engine: Engine,
    tokens: list[int],
    window: int,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    if window < 2:  # (one token has no context to predict the next from)
        raise UsageError(f"the evaluation window must be at least 2 tokens, got {window}")
    stride = window if stride is None else stride
    if not 0 < stride <= window:
        raise UsageError("the evaluation stride must be between 1 and the window")
    before = engine.stats.copy()
    per_token: list[torch.Tensor] = []
    ids = torch.tensor(tokens, dtype=torch.long)
    spans = windows(len(tokens), window, stride)
    for i, (start, end, scored) in enumerate(spans):
        chunk = ids[start:end].to(engine.device)[None]  # [1, W]
        logits = engine.model(input_ids=chunk, use_cache=False).logits[0].float()  # [W, V]
        first = scored - start  # targets from position `scored` on
        pred = logits[first - 1 : end - start - 1]
        target = chunk[0, first:]
        per_token.append(torch.nn.functional.cross_entropy(pred, target, reduction="none").double())  # [S]
        engine.stats.tokens += end - start
        if progress:
            progress(i + 1, len(spans))
    nll = torch.cat(per_token) if per_token else torch.zeros(0, dtype=torch.float64)
    return EvalResult(float(nll.sum()), int(nll.numel()), engine.stats.delta(before), nll)


@torch.inference_mode()
def stepwise_nll(engine: Engine, tokens: list[int], segment: int = 256) -> torch.Tensor:
    """Each token's loss [n] with the text fed one token at a time, as decoding feeds it (teacher forcing),
    the KV cache restarted every `segment` tokens; the expert cache carries over. What a policy whose
    outputs depend on the cache's state (the miss fallback) is scored with."""
    from adapmoe_cli.runtime.generate import new_kv_cache

    out = []
    for start in range(0, len(tokens) - 1, segment):
        cache = new_kv_cache(engine)
        for i in range(start, min(start + segment, len(tokens) - 1)):
            logits = engine.model(input_ids=torch.tensor([[tokens[i]]]), cache=cache, use_cache=True).logits
            out.append(torch.nn.functional.cross_entropy(logits[0, -1:].double(), torch.tensor([tokens[i + 1]])))
    return torch.stack(out)
