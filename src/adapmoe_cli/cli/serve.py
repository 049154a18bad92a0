"""`adapmoe serve [MODEL]`: the model behind an OpenAI-compatible HTTP API (serve/app.py) on the offloading
runtime, with uvicorn. Binds 127.0.0.1 unless told; Ctrl-C or SIGTERM finish the requests in flight, then
exit."""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from adapmoe_cli.catalog import EMBEDDED_MODELS
from adapmoe_cli.cli.chat import budget_text, compile_now, gate_text, offer_method
from adapmoe_cli.cli.common import (
    DEFAULTS,
    AdaptiveOpt,
    CacheExpertsOpt,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    ExpertsFormatOpt,
    GateScaleOpt,
    GroupSizeOpt,
    MemoryOpt,
    ModelArg,
    PlanOpt,
    PolicyOpt,
    PrefetchOpt,
    err_console,
    note,
    open_store,
    runtime_settings,
)
from adapmoe_cli.errors import UsageError

if TYPE_CHECKING:
    import uvicorn

    from adapmoe_cli.runtime.engine import Engine
    from adapmoe_cli.serve.worker import Worker
    from adapmoe_cli.store import Store

G = DEFAULTS.generation
KEY_ENV = "ADAPMOE_API_KEY"


def register(app: typer.Typer) -> None:
    app.command("serve", help="Serve a model over an OpenAI-compatible HTTP API.")(serve_cmd)


def serve_cmd(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback exposes the model "
                                      "to the network (give --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one, printed).")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar=KEY_ENV, show_envvar=True,
        help="Require `Authorization: Bearer KEY` on /v1/ and /metrics.")] = None,
    model_name: Annotated[str | None, typer.Option(
        "--model-name", help="The name clients ask for (default: the store's name).")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait while one runs; more get "
                                           "429 with Retry-After.")] = 16,
    prefix_cache: Annotated[bool, typer.Option(
        "--prefix-cache/--no-prefix-cache", help="Reuse the KV cache of the previous request's common prefix "
        "(a conversation's earlier turns).")] = True,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", "-n", help="Tokens to generate when a chat request gives no max_tokens.",
        show_default=str(G.max_new_tokens))] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", "--num-ctx", help="Tokens a request may hold (at most the "
                                            "model's context).", show_default="the model's context")] = None,
    cache_experts: CacheExpertsOpt = None,
    memory: MemoryOpt = None,
    prefetch: PrefetchOpt = None,
    compile: CompileOpt = None,
    policy: PolicyOpt = None,
    plan: PlanOpt = None,
    adaptive_gate: AdaptiveOpt = None,
    gate_scale: GateScaleOpt = None,
    device: DeviceOpt = None,
    experts_format: ExpertsFormatOpt = "native",
    group_size: GroupSizeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe serve

      adapmoe serve ./mixtral-store --memory 12GiB --port 8080 --api-key "$(openssl rand -hex 16)"

      curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "embedded", "messages": [{"role": "user", "content": "Hello"}]}'
    """
    if not 0 <= port <= 65535:  # (what can be checked is checked before torch and the server are imported)
        raise UsageError(f"--port must be 0 … 65535, got {port}")
    if max_queue < 0:
        raise UsageError("--max-queue must be ≥ 0")
    if api_key is not None and not api_key.strip():
        raise UsageError(f"--api-key (or {KEY_ENV}) is empty; give a key or leave it out")
    settings = runtime_settings(
        config, cache_experts=cache_experts, memory=memory, prefetch=prefetch, device=device, policy=policy,
        compile=compile,
        plan=plan, adaptive=adaptive_gate, gate_scale=gate_scale, max_new_tokens=max_new_tokens, context=ctx,
    )
    _check_port(host, port)  # before the model loads: a taken port is the error to show, at once
    import uvicorn

    from adapmoe_cli.conversation import load_tokenizer
    from adapmoe_cli.planning.resolve import open_engine
    from adapmoe_cli.serve.app import ServeOptions, create_app
    from adapmoe_cli.serve.worker import Worker

    store = open_store(model, experts_format, group_size)
    offer_method(store, settings, interactive=False)
    with open_engine(store, settings, note=note) as engine:
        tokenizer = load_tokenizer(store)
        limit = int(store.config.get("max_position_embeddings", 1 << 30))
        context = min(limit, settings.generation.context) if settings.generation.context else limit
        name = model_name or _default_name(model, store)
        worker = Worker(engine, tokenizer, max_waiting=max_queue, reuse_prefix=prefix_cache)
        options = ServeOptions(name, context, settings.generation.max_new_tokens,
                               api_key.strip() if api_key else None, settings.generation.temperature,
                               settings.generation.top_p)
        server = uvicorn.Server(uvicorn.Config(create_app(worker, options), host=host, port=port,
                                               log_level="warning", access_log=False, timeout_graceful_shutdown=60,
                                               lifespan="off"))
        compile_now(engine)
        _banner(engine, name, context, host, api_key is not None)
        _run(server, worker)


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}; give an address of this machine (127.0.0.1, 0.0.0.0)") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (0: any free one) "
                             "or stop what uses it") from None


def _default_name(model: str | None, store: Store) -> str:
    return "embedded" if model is None else model if model in EMBEDDED_MODELS else store.path.name


def _host(h: str) -> str:
    return f"[{h}]" if ":" in h else h


def _banner(engine: Engine, name: str, context: int, host: str, keyed: bool) -> None:
    exposed = host not in ("127.0.0.1", "localhost", "::1")
    err_console.print(
        f"[bold]adapmoe serve[/] · {escape(name)} · {budget_text(engine)} · prefetch "
        f"{'on' if engine.settings.prefetch else 'off'} · gate {gate_text(engine, engine.gate)} · ctx {context}"
        + ("\n[yellow]listening beyond this machine without an API key: anyone who can reach it can use it[/]"
           if exposed and not keyed else ""), soft_wrap=True)


def _run(server: uvicorn.Server, worker: Worker) -> None:
    """HTTP on a thread of its own, the runtime on this one (where the engine was built; see serve/worker.py).
    Ctrl-C or SIGTERM: uvicorn stops accepting, lets the requests in flight finish, and then the runtime's
    loop ends; a second one stops at once."""

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.02)
        bound = [s.getsockname() for srv in server.servers for s in srv.sockets]
        where = ", ".join(f"http://{_host(h)}:{p}/v1" for h, p, *_ in bound)
        err_console.print(f"serving at {where} (Ctrl-C stops after the requests in flight)", soft_wrap=True)

    async def main() -> None:
        task = asyncio.create_task(announce())
        try:
            await server.serve()
        finally:
            task.cancel()

    def http() -> None:
        try:
            asyncio.run(main())
        finally:
            worker.close()

    def stop(_signum: int, _frame: object) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="adapmoe-http", daemon=True)
    thread.start()
    try:
        worker.run()
    finally:
        thread.join(90)
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if not server.started:  # uvicorn could not start (it said why)
        raise UsageError(f"the server did not start on port {server.config.port}")
