"""`bench --endpoint URL`: the bench's prompts and token counts against any OpenAI-compatible server (ours,
llama-server, ollama, vLLM, SGLang) through the official `openai` client. Decode speed comes from the streamed
chunks' arrival times, time to first token from the request's start; where the server is adapmoe, its
counters (hit rate, experts per token, stall, bytes read) ride along in each answer's `adapmoe` field.
Several endpoints are run interleaved, repeat by repeat, like the bench's policies. Knows nothing of
terminals."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

from adapmoe_cli.errors import UsageError
from adapmoe_cli.progress import Steps


@dataclass(frozen=True)
class Timed:
    ttft_s: float
    decode_s: float  # first content chunk to last
    completion_tokens: int  # the server's usage, else the content chunks
    prompt_tokens: int | None
    counters: dict[str, Any] | None  # adapmoe's own numbers for this request, if the server is adapmoe

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


def _client(url: str, api_key: str | None) -> Any:
    import openai

    key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
    return openai.OpenAI(base_url=url.rstrip("/"), api_key=key, max_retries=2, timeout=600)


def _errors() -> tuple[type[Exception], ...]:
    import openai

    return (openai.APIError, openai.APIConnectionError)


def served_model(url: str, api_key: str | None) -> str:
    """The first model the server lists (what to ask for when --model is not given)."""
    try:
        models = list(_client(url, api_key).models.list())
    except _errors() as e:
        raise UsageError(f"{url} did not answer GET /models ({_why(e)}); is an OpenAI-compatible server "
                         "running there? (the URL ends in /v1)") from None
    if not models:
        raise UsageError(f"{url} serves no model; give --model")
    return str(models[0].id)


def _why(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def one_request(client: Any, url: str, model: str, prompt: str, tokens: int) -> Timed:
    """One streamed chat completion, greedy, `tokens` long (the end token ignored where the server allows)."""
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = counters = None
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                first = now if first is None else first
                last = now
                chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
                counters = (chunk.model_extra or {}).get("adapmoe")
    except _errors() as e:
        raise UsageError(f"{url}: the request failed ({_why(e)})") from None
    if first is None or last is None:
        raise UsageError(f"{url} streamed no text for {prompt!r}; check --model and that the server generates")
    n = usage.completion_tokens if usage is not None and usage.completion_tokens else chunks
    return Timed(first - t0, last - first, n, usage.prompt_tokens if usage is not None else None, counters)


def run(endpoints: list[str], model: str | None, prompts: list[str], tokens: int, repeats: int,
        api_key: str | None = None, progress: Steps | None = None) -> dict[str, Any]:
    """Each endpoint × prompt × repeat, interleaved by repeat; one result dict (the bench's shape where it
    applies: `policies` keyed by endpoint)."""
    if tokens < 2:
        raise UsageError("--tokens must be at least 2 to time decoding against an endpoint")
    if not prompts:
        raise UsageError("no prompts to run")
    names = {url: model or served_model(url, api_key) for url in endpoints}
    clients = {url: _client(url, api_key) for url in endpoints}
    for url in endpoints:  # one untimed request each: connections, lazy loads, the server's own warm-up
        one_request(clients[url], url, names[url], prompts[0], 2)
    runs: dict[str, list[list[Timed]]] = {url: [] for url in endpoints}
    total, done = repeats * len(endpoints), 0
    for _ in range(repeats):
        for url in endpoints:
            if progress:
                progress(url, done, total)
            runs[url].append([one_request(clients[url], url, names[url], p, tokens) for p in prompts])
            done += 1
    if progress:
        progress("done", total, total)
    return {"endpoints": {url: summarise(names[url], runs[url]) for url in endpoints}, "tokens": tokens,
            "prompts": len(prompts), "repeats": repeats}


def summarise(model: str, repeats: list[list[Timed]]) -> dict[str, Any]:
    """Per repeat: decode tok/s over all its prompts (tokens after the first / time after the first), mean
    time to first token; then median, min and max over repeats; adapmoe's counters summed over all."""
    rates, ttfts = [], []
    for rep in repeats:
        decode_s = sum(t.decode_s for t in rep)
        rates.append(sum(t.completion_tokens - 1 for t in rep) / decode_s if decode_s > 0 else 0.0)
        ttfts.append(statistics.fmean(t.ttft_s for t in rep))
    every = [t for rep in repeats for t in rep]
    out: dict[str, Any] = {
        "model": model,
        "decode_tokens_per_s": statistics.median(rates), "decode_tokens_per_s_min": min(rates),
        "decode_tokens_per_s_max": max(rates),
        "time_to_first_token_s": statistics.median(ttfts), "time_to_first_token_s_min": min(ttfts),
        "time_to_first_token_s_max": max(ttfts),
        "completion_tokens_per_request": statistics.fmean(t.completion_tokens for t in every),
        "prompt_tokens_per_request": (statistics.fmean(t.prompt_tokens for t in every)
                                      if all(t.prompt_tokens is not None for t in every) else None),
        "adapmoe": None,
    }
    counted = [t.counters for t in every if t.counters]
    if counted and len(counted) == len(every):  # per generated token, the prompt's share included
        toks = sum(t.completion_tokens for t in every)
        c = {k: sum(x[k] for x in counted) for k in ("hits", "prefetch_hits", "misses", "bytes_read", "stall_s")}
        uses = c["hits"] + c["prefetch_hits"] + c["misses"]
        out["adapmoe"] = {
            "hit_rate": (c["hits"] + c["prefetch_hits"]) / uses if uses else 0.0,
            "experts_per_token": statistics.fmean(x["experts_per_token"] for x in counted),
            "stall_s_per_token": c["stall_s"] / toks if toks else 0.0,
            "bytes_read_per_token": c["bytes_read"] / toks if toks else 0.0,
            "reused_prompt_tokens": sum(x["reused_prompt_tokens"] for x in counted),
            # the same requests' decode speed as the server's runtime measured it (no HTTP, no client)
            "server_decode_tokens_per_s": _server_rate(every),
        }
    return out


def _server_rate(every: list[Timed]) -> float:
    """Decode tok/s over all requests from the server's own per-request rates (their decode times summed)."""
    pairs = [(t.completion_tokens - 1, t.counters["decode_tokens_per_s"]) for t in every if t.counters]
    seconds = sum(n / rate for n, rate in pairs if rate > 0)
    return sum(n for n, rate in pairs if rate > 0) / seconds if seconds > 0 else 0.0
