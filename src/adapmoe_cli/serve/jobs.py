"""What one request does on the runtime, whatever API it came through: feed the prompt (reusing the KV cache
of the previous request's common prefix), sample, stop at the model's end token, a stop sequence or the token
limit, and report each token's text and log-probabilities as it comes. Runs on the thread that owns the
engine; knows nothing of HTTP or of other requests."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.generate import PrefixKV, Response, stream_generate
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.settings import GenerationSettings


@dataclass(frozen=True)
class JobSpec:
    prompt: tuple[int, ...]
    max_tokens: int  # 0: only the prompt's own log-probabilities (`echo`)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None  # None: a fresh one per request when sampling
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # go on past the model's end token (timed runs that need a fixed length)
    logprobs: int | None = None  # how many alternatives to report per token (None: no log-probabilities)
    echo: bool = False  # report the prompt's tokens with their log-probabilities first


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at this position, most likely first


@dataclass(frozen=True)
class TokenEvent:
    text: str  # new text; held back while it may still turn out to start a stop sequence
    token: int
    logprob: TokenLogprob | None


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    text: str  # the whole completion (without a stop sequence that ended it)
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int  # prompt tokens whose K/V came from the previous request
    stats: Stats
    prompt_s: float  # to the first token
    decode_s: float  # from the first token to the last
    echo: list[TokenLogprob] = field(default_factory=list)


class StopText:
    """Text deltas cut at the first stop sequence; a tail that may be the start of one is held back."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0
        self.hit = False

    def add(self, delta: str) -> str:
        self.text += delta
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.text = True, self.text[:cut]
            return self.flush()
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        out = self.text[self.sent:len(self.text) - hold]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out


def top_logprobs(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, list[tuple[tuple[int, float], ...]]]:
    """Log-softmax of logits [T, V] and the `n` most likely (token, logprob) of each row."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    if n <= 0:
        return logp, [() for _ in range(logp.shape[0])]
    values, ids = logp.topk(min(n, logp.shape[-1]), dim=-1)
    return logp, [tuple(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)]


def run(engine: Engine, tokenizer: Any, prefix: PrefixKV, spec: JobSpec, eos: set[int],
        emit: Callable[[TokenEvent], None], cancelled: Callable[[], bool], reuse: bool = True) -> Finished:
    """One request on the engine. `prefix` holds the previous request's KV cache: its common prefix with this
    prompt is reused (not with `echo`, which needs every position's logits). `emit` hears each token;
    `cancelled` is asked after each one (a client that went away)."""
    full = list(spec.prompt)
    if not reuse or spec.echo:
        prefix.reset()
    common = prefix.start(full)
    new = full[common:]
    gen = GenerationSettings(max_new_tokens=max(1, spec.max_tokens), temperature=spec.temperature,
                             top_p=spec.top_p, top_k=spec.top_k, repetition_penalty=spec.repetition_penalty,
                             seed=spec.seed if spec.seed is not None else secrets.randbits(63))
    n_logprobs = spec.logprobs or 0
    echo: list[TokenLogprob] = []

    def score_prompt(logits: torch.Tensor) -> None:  # [T, V]: position i predicts prompt token i + 1
        if not spec.echo:
            return
        logp, tops = top_logprobs(logits[:-1], n_logprobs)
        targets = torch.tensor(full[1:], dtype=torch.long)
        chosen = logp.gather(1, targets[:, None])[:, 0].tolist() if len(full) > 1 else []
        echo.append(TokenLogprob(full[0], None))
        echo.extend(TokenLogprob(t, lp, top) for t, lp, top in zip(full[1:], chosen, tops, strict=True))

    before = engine.stats.copy()
    stop = StopText(spec.stop)
    reason = "length"
    last: Response | None = None
    try:
        for resp in stream_generate(engine, tokenizer, new, prefix.kv, gen, history=full[:common],
                                    stop_ids=set() if spec.ignore_eos else eos, on_prefill=score_prompt):
            prefix.fed(new if last is None else [last.token])  # what the cache holds: all but this token
            last = resp
            if spec.max_tokens == 0:
                break
            if resp.finish_reason == "stop":  # the model's end token
                reason = "stop"
                break
            lp = None
            if spec.logprobs is not None and resp.logits is not None:
                logp, tops = top_logprobs(resp.logits, n_logprobs)
                lp = TokenLogprob(resp.token, float(logp[0, resp.token]), tops[0])
            emit(TokenEvent(stop.add(resp.text), resp.token, lp))
            if stop.hit:
                reason = "stop"
                break
            if resp.finish_reason or cancelled():
                reason = resp.finish_reason or "cancelled"
                break
        tail = "" if stop.hit or last is None else stop.flush()
        if tail:
            emit(TokenEvent(tail, last.token, None))
    finally:
        prefix.settle()
    generated = 0 if last is None or spec.max_tokens == 0 else last.generation_tokens
    return Finished(reason, stop.text, len(full), generated, common, engine.stats.delta(before),
                    last.prompt_s if last else 0.0, last.generation_s if last else 0.0, echo)
