"""Generation in layers over transformers' model and KV cache: `generate_step` (a generator of token ids)
→ `stream_generate` (yields `Response`s with the text delta, the token and the counted statistics of
that token). `chat` consumes the stream; timed runs (`measure.py`) step the model directly. Knows
nothing of terminals."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.settings import GenerationSettings


def new_kv_cache(engine: Engine) -> Any:
    """A KV cache for the engine's model, eager or compiled: one that grows without copying itself each token
    (runtime/kv_cache.py)."""
    from adapmoe_cli.runtime.kv_cache import GrowingCache

    return GrowingCache(engine.model.config)


@dataclass
class PrefixKV:
    """A KV cache and the token ids whose K/V it holds. A sequence that starts with the same tokens feeds only
    the rest (`start`); what it feeds is booked with `fed`, and `settle` cuts the cache back to what is booked
    (a forward cut off by an exception or a stop may have appended to some layers only)."""

    engine: Engine
    kv: Any = None
    ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.kv = new_kv_cache(self.engine)
        self.ids = []

    def start(self, full: list[int]) -> int:
        """Keep the longest common prefix of what the cache holds and `full`, leaving at least one token of
        `full` to feed; returns its length (the tokens reused)."""
        common = 0
        for a, b in zip(self.ids, full, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(full) - 1)
        self.ids = list(full[:common])
        self.settle()
        return common

    def fed(self, ids: list[int]) -> None:
        self.ids.extend(ids)

    def settle(self) -> None:
        for layer in self.kv.layers:
            extra = layer.get_seq_length() - len(self.ids)
            if extra > 0:
                layer.crop(-extra)


def _processors(gen: GenerationSettings) -> Any:
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if gen.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    if gen.temperature > 0:
        procs.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k > 0:
            procs.append(TopKLogitsWarper(gen.top_k))
        if gen.top_p < 1.0:
            procs.append(TopPLogitsWarper(gen.top_p))
    return procs


@torch.inference_mode()
def generate_step(
    engine: Engine,
    input_ids: list[int],
    kv_cache: Any,
    gen: GenerationSettings,
    history: list[int] | None = None,
    rng: torch.Generator | None = None,
    on_prefill: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Feed `input_ids` (appended to what `kv_cache` holds), then sample forever; yields (token, logits).
    The caller stops iterating; the last yielded token has not been fed to the model. `on_prefill` gets the
    logits of every fed position [T, V] of the first forward (a prompt's own log-probabilities)."""
    procs = _processors(gen)
    seen = torch.tensor([list(history or []) + list(input_ids)], dtype=torch.long)  # [1, N]
    ids = torch.tensor([input_ids], dtype=torch.long, device=engine.device)  # [1, T]
    while True:
        out = engine.decode(ids, kv_cache)
        if on_prefill is not None:
            on_prefill(out.logits[0].float())
            on_prefill = None
        logits = out.logits[:, -1, :].float()  # [1, V]
        scores = procs(seen, logits) if procs else logits
        probs = torch.softmax(scores, dim=-1) if gen.temperature > 0 else None
        if probs is not None and bool(torch.isfinite(probs).all()):
            token = int(torch.multinomial(probs, 1, generator=rng).item())
        else:  # greedy; or a temperature or repeat penalty so small that the scores overflowed (a softmax of NaN):
            token = int(scores.argmax(dim=-1).item())  # its limit, every chance on the highest score
        yield token, logits
        if procs:  # (only they read what was seen: greedy decoding skips the growing copy)
            seen = torch.cat([seen, torch.tensor([[token]])], dim=1)
        ids = torch.tensor([[token]], dtype=torch.long, device=engine.device)


@dataclass
class Response:
    text: str  # the new text since the previous response
    token: int
    token_ids: list[int]  # generated so far
    stats: Stats  # counted during this token's forward pass
    prompt_tokens: int
    prompt_s: float
    generation_s: float
    finish_reason: str | None = None  # "stop" | "length" when this is the last one
    logits: torch.Tensor | None = None  # [1, V] the distribution this token was drawn from (float32)

    @property
    def generation_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        # the first token comes out of the prefill; decode speed counts the ones after it
        n = len(self.token_ids) - 1
        return n / self.generation_s if n > 0 and self.generation_s > 0 else 0.0


@dataclass
class Detokenizer:
    """Turns a growing list of ids into text deltas, holding back an incomplete UTF-8 sequence. Each token
    decodes only the ids since the last delta plus a few before them (`CONTEXT`), not the whole reply: a
    2,048-token reply would otherwise spend 0.4 ms a token in the tokenizer on the embedded model's
    (a sixth of a compiled step). The ids before are decoded twice, with and without the new ones, and the
    delta is the difference, so what a tokenizer does at the start of a decode (a dropped leading space)
    cancels out; where the two disagree, the whole reply is decoded as a check."""

    tokenizer: Any
    ids: list[int] = field(default_factory=list)
    text: str = ""
    _start: int = 0  # ids[_start:_done] are decoded again as the new ids' context
    _done: int = 0  # ids up to here are in `text`

    CONTEXT = 4

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._start:self._done], skip_special_tokens=True)
        now = decode(self.ids[self._start:], skip_special_tokens=True)
        if now.endswith("\ufffd"):
            return ""
        if now.startswith(before):
            delta = now[len(before):]
        else:  # the context decoded differently on its own: take the whole reply's text
            full = decode(self.ids, skip_special_tokens=True)
            delta = full[len(self.text):] if full.startswith(self.text) else full
        self.text += delta
        self._done = len(self.ids)
        self._start = max(0, self._done - self.CONTEXT)
        return delta


def stream_generate(
    engine: Engine,
    tokenizer: Any,
    input_ids: list[int],
    kv_cache: Any,
    gen: GenerationSettings,
    history: list[int] | None = None,
    stop_ids: set[int] | None = None,
    on_prefill: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[Response]:
    """`generate_step` as `Response`s: text deltas, counted stats and timing per token, until a stop token or
    `gen.max_new_tokens`; `on_prefill` as there."""
    rng = torch.Generator().manual_seed(gen.seed)
    stop = set(stop_ids if stop_ids is not None else eos_ids(engine, tokenizer))
    detok = Detokenizer(tokenizer)
    generated: list[int] = []
    t0 = time.perf_counter()
    before = engine.stats.copy()
    prompt_s = 0.0
    for n, (token, logits) in enumerate(generate_step(engine, input_ids, kv_cache, gen, history, rng, on_prefill)):
        now = time.perf_counter()
        if n == 0:
            prompt_s = now - t0
            engine.stats.tokens += len(input_ids)
        else:
            engine.stats.tokens += 1
        delta_stats = engine.stats.delta(before)
        before = engine.stats.copy()
        generated.append(token)
        finish = "stop" if token in stop else ("length" if len(generated) >= gen.max_new_tokens else None)
        text = "" if token in stop else detok.add(token)
        yield Response(text, token, list(generated), delta_stats, len(input_ids), prompt_s, now - t0 - prompt_s,
                       finish, logits)
        if finish:
            return


def compile_decode(engine: Engine) -> float | None:
    """Compile the engine's decode step now (with `--compile`, before a user waits on a reply): two tokens of
    prompt and one step on a scratch KV cache. What that run counted is taken back out of the statistics
    (the experts it loaded stay cached). Returns the seconds compiling took (None: nothing compiled)."""
    if not engine.decode.pending:
        return None
    saved = engine.stats.copy()
    with torch.inference_mode():
        kv = new_kv_cache(engine)
        bos = engine.store.config.get("bos_token_id")
        token = bos if isinstance(bos, int) and not isinstance(bos, bool) else 0
        engine.decode(torch.tensor([[token, token]], device=engine.device), kv)
        engine.decode(torch.tensor([[token]], device=engine.device), kv)
    engine.manager.drain()
    engine.stats.restore(saved)
    return engine.decode.compile_s


def eos_ids(engine: Engine, tokenizer: Any) -> set[int]:
    """The stop tokens: the store's generation config (its checked bytes) and the tokenizer's EOS."""
    from adapmoe_cli.errors import StoreError
    from adapmoe_cli.safe_io import parse_json

    ids: set[int] = set()
    data = engine.store.side_file("generation_config.json")
    if data is not None:
        cfg = parse_json(data, "generation_config.json", StoreError)
        eos = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
            raise StoreError(f"generation_config.json of {engine.store.path}: eos_token_id must be token ids")
        ids |= set(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
