"""`adapmoe serve`'s HTTP side: the OpenAI API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`),
`/health` and `/metrics` (Prometheus text) over one `Worker`. FastAPI parses and answers; every failure is
OpenAI's error shape with a status (400, 401, 404, 413, 429, 500), never a traceback; streaming is server-sent
events ending in `[DONE]`, and a client that goes away cancels its request."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.serve.jobs import Finished, JobSpec, TokenEvent, TokenLogprob
from adapmoe_cli.serve.protocol import ApiError, ChatRequest, CompletionRequest, error_message
from adapmoe_cli.serve.worker import Busy, Failed, Ticket, Worker

MAX_BODY = 8 << 20  # bytes of a request body
#: more characters than this a token of the context cannot be a prompt that fits (the longest tokens of the
#: families' tokenizers are runs of a few dozen spaces); checked before tokenizing (`_Api.fits`)
MAX_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    context: int  # tokens a request may hold: prompt and completion
    default_max_tokens: int  # when a request gives none (at most what the context leaves)
    api_key: str | None = None
    temperature: float = 0.0  # when a request gives none
    top_p: float = 1.0


def create_app(worker: Worker, options: ServeOptions) -> FastAPI:
    app = FastAPI(title="adapmoe", docs_url=None, redoc_url=None, openapi_url=None)
    api = _Api(worker, options)
    app.add_middleware(_Guard, check_key=api.check_key)

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        message, param = error_message(list(e.errors()))
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, e: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", "server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": options.model_name, "waiting": worker.waiting, "running": worker.running}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        api.check_model(name)
        return api.model_card()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        from adapmoe_cli.serve.metrics import exposition

        body, content_type = exposition(worker)
        return PlainTextResponse(body, media_type=content_type)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await api.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await api.completions(body, request)

    return app


class _Guard:
    """Before any route: the API key on /v1/ and /metrics, and the body's size (its Content-Length, and what
    actually arrives). Plain ASGI, so streaming and disconnects pass through untouched."""

    def __init__(self, app: Any, check_key: Callable[[str | None], None]) -> None:
        self.app, self.check_key = app, check_key

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        too_big = ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB", code="request_too_large")
        try:
            if scope["path"].startswith("/v1/") or scope["path"] == "/metrics":
                self.check_key(headers.get("authorization"))
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                raise too_big
        except ApiError as e:
            await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise too_big
            return message

        await self.app(scope, counted, send)


class _Api:
    def __init__(self, worker: Worker, options: ServeOptions) -> None:
        self.worker, self.options = worker, options
        self.tokenizer = worker.tokenizer
        self.vocab = int(worker.engine.model.config.vocab_size)
        self.created = int(time.time())

    # ---- checks -------------------------------------------------------------------------------------------
    def check_key(self, header: str | None) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = header[7:] if header and header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str) -> None:
        if name != self.options.model_name:
            raise ApiError(404, f"the model {name!r} is not served here; this server serves "
                                f"{self.options.model_name!r}", "not_found_error", "model_not_found", "model")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.options.model_name, "object": "model", "created": self.created, "owned_by": "adapmoe",
                "max_model_len": self.options.context}

    def spec(self, body: ChatRequest | CompletionRequest, prompt: list[int], max_tokens: int | None,
             logprobs: int | None, echo: bool = False) -> JobSpec:
        self.check_model(body.model)
        body.unsupported()
        ctx = self.options.context
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(prompt) >= ctx:
            raise ApiError(413, f"the prompt is {len(prompt)} tokens; the context holds {ctx}: shorten it",
                           code="context_length_exceeded")
        if max_tokens is not None and len(prompt) + max_tokens > ctx:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"context of {ctx} tokens; lower max_tokens", code="context_length_exceeded",
                           param="max_tokens")
        if max_tokens == 0 and not echo:
            raise ApiError(400, "max_tokens 0 asks for nothing: give at least 1 (or echo the prompt)",
                           param="max_tokens")
        if max_tokens is None:
            max_tokens = min(self.options.default_max_tokens, ctx - len(prompt))
        temperature = self.options.temperature if body.temperature is None else body.temperature
        top_p = self.options.top_p if body.top_p is None else body.top_p
        return JobSpec(tuple(prompt), max_tokens, temperature, top_p, body.top_k, body.repetition_penalty, body.seed,
                       body.stops, body.ignore_eos, logprobs, echo)

    def fits(self, chars: int) -> None:
        """Refuse a text that cannot fit the context before tokenizing it: tokenizing holds the event loop
        (a 7 MB message kept `/health` and every other request waiting 6–8 s for its 413)."""
        ctx = self.options.context
        if chars > ctx * MAX_CHARS_PER_TOKEN:
            raise ApiError(413, f"the prompt is {chars:,} characters; the context holds {ctx} tokens (at most "
                                f"~{ctx * MAX_CHARS_PER_TOKEN:,} characters): shorten it",
                           code="context_length_exceeded")

    def tokens_of(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            from adapmoe_cli.conversation import clean_text

            self.fits(len(prompt))
            return list(self.tokenizer.encode(clean_text(prompt), add_special_tokens=True))
        bad = [t for t in prompt if not 0 <= t < self.vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0 … {self.vocab - 1})", param="prompt")
        return list(prompt)

    def submit(self, spec: JobSpec) -> Ticket:
        try:
            return self.worker.submit(spec)
        except Busy as e:
            raise ApiError(429, str(e), "rate_limit_error", "queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None

    # ---- endpoints ----------------------------------------------------------------------------------------
    async def chat(self, body: ChatRequest, request: Request) -> Any:
        from adapmoe_cli.conversation import chat_ids, clean_text

        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        messages = [{"role": m["role"], "content": clean_text(m["content"])} for m in body.template_messages()]
        self.fits(sum(len(m["content"]) for m in messages))
        try:
            prompt = chat_ids(self.tokenizer, messages)
        except Exception as e:  # the template's own refusal (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        spec = self.spec(body, prompt, max_tokens, logprobs)
        rid, kind = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion"
        ticket = self.submit(spec)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(self._chat_chunks(ticket, rid, usage), ticket)
        done, events = await _collect(ticket, request)
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                  "logprobs": self._chat_logprobs([e.logprob for e in events if e.logprob]) if body.logprobs else None,
                  "finish_reason": done.reason}
        return self._response(rid, kind, [choice], done)

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        prompts = [self.tokens_of(p) for p in body.prompts()]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # the API's own default
        specs = [self.spec(body, p, max_tokens, body.logprobs, body.echo) for p in prompts]
        rid, kind = f"cmpl-{uuid.uuid4().hex}", "text_completion"
        if body.stream:
            if len(specs) > 1:
                raise ApiError(400, "streaming takes one prompt per request", param="prompt")
            ticket = self.submit(specs[0])
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(self._completion_chunks(ticket, rid, usage, body.echo), ticket)
        choices, total = [], None
        for i, spec in enumerate(specs):
            done, events = await _collect(self.submit(spec), request)
            text = (self.tokenizer.decode(list(spec.prompt)) if body.echo else "") + done.text
            lps = [*done.echo, *(e.logprob for e in events if e.logprob)] if body.logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": self._completion_logprobs(lps) if lps else None,
                            "finish_reason": done.reason})
            total = done if total is None else _sum(total, done)
        assert total is not None
        return self._response(rid, kind, choices, total)

    # ---- bodies -------------------------------------------------------------------------------------------
    def _response(self, rid: str, kind: str, choices: list[dict[str, Any]], done: Finished) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.options.model_name,
                "choices": choices, "usage": _usage(done), "adapmoe": runtime_numbers(done)}

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            piece = self._piece(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**entry(lp.token, lp.logprob or 0.0), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    def _completion_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        tokens = [self._piece(lp.token) for lp in lps]
        offsets, at = [], 0
        for piece in tokens:
            offsets.append(at)
            at += len(piece)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [None if lp.logprob is None else {self._piece(t): v for t, v in lp.top}
                                 for lp in lps],
                "text_offset": offsets}

    async def _chat_chunks(self, ticket: Ticket, rid: str, usage: bool) -> AsyncIterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": self.options.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        yield chunk({"role": "assistant", "content": ""})
        async for event in _events(ticket):
            if isinstance(event, TokenEvent):
                lp = self._chat_logprobs([event.logprob]) if event.logprob else None
                if event.text or lp:
                    yield chunk({"content": event.text}, logprobs=lp)
            else:
                yield chunk({}, event.reason)
                if usage:
                    yield {**chunk({}), "choices": [], "usage": _usage(event), "adapmoe": runtime_numbers(event)}

    async def _completion_chunks(self, ticket: Ticket, rid: str, usage: bool, echo: bool) -> AsyncIterator[dict]:
        def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": int(time.time()),
                    "model": self.options.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        if echo:
            yield chunk(self.tokenizer.decode(list(ticket.spec.prompt)))
        async for event in _events(ticket):
            if isinstance(event, TokenEvent):
                lp = self._completion_logprobs([event.logprob]) if event.logprob else None
                if event.text or lp:
                    yield chunk(event.text, logprobs=lp)
            else:
                yield chunk("", event.reason)
                if usage:
                    yield {**chunk(""), "choices": [], "usage": _usage(event), "adapmoe": runtime_numbers(event)}


def _usage(done: Finished) -> dict[str, Any]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.reused_tokens}}


def runtime_numbers(done: Finished) -> dict[str, Any]:
    """The runtime's counters for one request: what `adapmoe` adds to each answer."""
    s = done.stats
    return {"hit_rate": s.hit_rate, "experts_per_token": s.experts_per_token, "hits": s.hits,
            "prefetch_hits": s.prefetch_hits, "misses": s.misses, "loads": s.loads, "bytes_read": s.bytes_read,
            "stall_s": s.stall_s, "reused_prompt_tokens": done.reused_tokens, "time_to_first_token_s": done.prompt_s,
            "decode_tokens_per_s": (done.completion_tokens - 1) / done.decode_s if done.decode_s > 0 else 0.0}


def _sum(a: Finished, b: Finished) -> Finished:
    stats = Stats()
    stats.add(a.stats)
    stats.add(b.stats)
    return Finished(b.reason, "", a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                    a.reused_tokens + b.reused_tokens, stats, a.prompt_s + b.prompt_s, a.decode_s + b.decode_s)


async def _events(ticket: Ticket) -> AsyncIterator[TokenEvent | Finished]:
    """The ticket's events up to its end; a failure is raised as a 500."""
    while True:
        event = await ticket.events.get()
        if isinstance(event, Failed):
            raise ApiError(500, f"the generation failed: {event.message}", "server_error")
        yield event
        if isinstance(event, Finished):
            return


async def _collect(ticket: Ticket, request: Request) -> tuple[Finished, list[TokenEvent]]:
    """Wait for a whole answer; a client that disconnects meanwhile cancels it."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        ticket.cancel()

    watcher = asyncio.create_task(watch())
    events: list[TokenEvent] = []
    try:
        async for event in _events(ticket):
            if isinstance(event, Finished):
                return event, events
            events.append(event)
    finally:
        watcher.cancel()
        ticket.cancel()  # (a no-op once it has finished)
    raise AssertionError("unreachable")


def _sse(chunks: AsyncIterator[dict[str, Any]], ticket: Ticket) -> StreamingResponse:
    """Server-sent events: one `data:` line per chunk, `[DONE]` last; a failure mid-stream is sent as an error
    event (the status line has gone out already); the request is cancelled however the stream ends."""

    async def body() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            ticket.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
