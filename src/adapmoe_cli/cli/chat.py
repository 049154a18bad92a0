"""`adapmoe chat [MODEL]`: an interactive, streaming chat on the offloading runtime; `--prompt` (or a
prompt on stdin) answers once, `--json` prints one object."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from adapmoe_cli.cli.common import (
    AdaptiveOpt,
    CacheExpertsOpt,
    ConfigOpt,
    DeviceOpt,
    GateScaleOpt,
    JsonFlag,
    MemoryOpt,
    ModelArg,
    PlanOpt,
    PolicyOpt,
    PrefetchOpt,
    console,
    err_console,
    note,
    open_store,
    runtime_settings,
)
from adapmoe_cli.conversation import Conversation, load_tokenizer
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.generate import Response
from adapmoe_cli.runtime.stats import Stats
from adapmoe_cli.units import format_bytes

HELP = """commands:
  /help          this text
  /reset         forget the conversation (keeps the expert cache)
  /stats         cumulative runtime statistics
  /save FILE     write the transcript as JSON
  /exit          quit (Ctrl-D works too)
input: end a line with \\ to continue on the next one, or wrap a block in \"\"\" lines.
Ctrl-C stops the current answer."""


def register(app: typer.Typer) -> None:
    app.command("chat", help="Chat with a model on the offloading runtime.")(chat_cmd)


def chat_cmd(
    model: ModelArg = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer this once and exit.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: plain continuation.")] = False,
    as_json: JsonFlag = False,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", "-n", show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="0 = greedy.",
                                                      show_default=False)] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", show_default=False)] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option("--seed", show_default=False)] = None,
    cache_experts: CacheExpertsOpt = None,
    memory: MemoryOpt = None,
    prefetch: PrefetchOpt = None,
    policy: PolicyOpt = None,
    plan: PlanOpt = None,
    adaptive_gate: AdaptiveOpt = None,
    gate_scale: GateScaleOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe chat

      adapmoe chat --prompt "What does the json module do?" --json

      adapmoe chat ./mixtral-store --memory 12GiB --temperature 0.7
    """
    settings = runtime_settings(
        config, cache_experts=cache_experts, memory=memory, prefetch=prefetch, device=device, policy=policy,
        plan=plan, adaptive=adaptive_gate, gate_scale=gate_scale,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
    )
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise typer.BadParameter("stdin held no prompt", param_hint="stdin")
    if as_json and prompt is None:
        raise typer.BadParameter("answers one prompt as JSON: give --prompt or a prompt on stdin",
                                 param_hint="--json")
    store = open_store(model)
    with open_engine(store, settings, note=note) as engine:
        conv = Conversation(engine, load_tokenizer(store), settings.generation, system=system, raw=raw)
        if prompt is not None:
            _one_shot(conv, prompt, as_json)
        else:
            _interactive(conv)


def _status(resp: Response | None) -> str:
    if resp is None:
        return "no tokens"
    return f"{resp.generation_tokens} tokens · {resp.tokens_per_s:.1f} tok/s"


def _turn_line(last: Response | None, turn: Stats) -> str:
    return (
        f"{_status(last)} · hit rate {turn.hit_rate:.0%} · {turn.experts_per_token:.2f} experts/token · "
        f"stall {turn.stall_s:.2f} s · read {format_bytes(turn.bytes_read)}"
    )


def _one_shot(conv: Conversation, prompt: str, as_json: bool) -> None:
    before = conv.engine.stats.copy()
    last = None
    for resp in conv.send(prompt):
        last = resp
        if not as_json:
            sys.stdout.write(resp.text)
            sys.stdout.flush()
    turn = conv.engine.stats.delta(before)
    if as_json:
        text = conv.messages[-1]["content"]
        print(json.dumps({
            "text": text,
            "token_ids": last.token_ids if last else [],
            "stats": {
                "tokens": last.generation_tokens if last else 0,
                "tokens_per_s": last.tokens_per_s if last else 0.0,
                "prompt_tokens": last.prompt_tokens if last else 0,
                "prompt_s": last.prompt_s if last else 0.0,
                "experts_per_token": turn.experts_per_token,
                "hit_rate": turn.hit_rate,
                "hits": turn.hits,
                "misses": turn.misses,
                "prefetch_hits": turn.prefetch_hits,
                "wasted_prefetches": turn.wasted_prefetches,
                "bytes_read": turn.bytes_read,
                "stall_s": turn.stall_s,
                "finish_reason": last.finish_reason if last else None,
            },
        }))
    else:
        sys.stdout.write("\n")
        err_console.print(f"[dim]{_turn_line(last, turn)}[/]")


def _read_input() -> str | None:
    """One user message; None at end of input. Handles `\\` continuations and triple-quote blocks."""
    try:
        line = input("\n>>> ")
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                nxt = input("... ")
            except EOFError:
                break
            if nxt.strip() == '"""':
                break
            lines.append(nxt)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines)


def _stats_table(engine: Engine) -> Table:
    s = engine.stats
    t = Table(title="runtime statistics (since start)", show_header=False, box=None)
    rows: list[tuple[str, Any]] = [
        ("tokens through the model", s.tokens),
        ("experts per token", f"{s.experts_per_token:.3f}"),
        ("hit rate", f"{s.hit_rate:.1%}  ({s.hits} hits, {s.prefetch_hits} prefetch hits, {s.misses} misses)"),
        ("prefetches", f"{s.prefetches_issued} issued, {s.wasted_prefetches} wasted, "
                       f"{s.prefetches_dropped} dropped"),
        ("loads", f"{s.loads} ({format_bytes(s.bytes_read)})"),
        ("stall", f"{s.stall_s:.3f} s"),
        ("cache", f"{engine.budget.total} slots ({engine.budget.source}), "
                  f"{format_bytes(engine.cache.capacity_bytes)}"),
        ("prefetch", "on" if engine.settings.prefetch else "off"),
        ("adaptive gate", _gate_text(engine)),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def _gate_text(engine: Engine) -> str:
    g = engine.gate
    if not g.thresholds:
        return (f"off (top-{engine.store.shape.top_k}; `adapmoe profile` then `adapmoe plan-cache --budget N` "
                "turn it on)")
    return f"{g.rule}" + (f" c={g.scale:.3g}" if g.scale is not None else "")


def _interactive(conv: Conversation) -> None:
    # Ctrl-C must stop an answer even when a parent started us with SIGINT ignored (background jobs are)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    eng = conv.engine
    console.print(
        f"[bold]adapmoe chat[/] · {eng.store.family.model_type} from {eng.store.path} · "
        f"{eng.budget.total}/{len(eng.store.experts)} experts cached ({eng.budget.source}) · prefetch "
        f"{'on' if eng.settings.prefetch else 'off'} · gate {_gate_text(eng)}\n"
        "[dim]/help for commands, Ctrl-C stops an answer, /exit quits[/]"
    )
    while True:
        try:
            text = _read_input()
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-C: type /exit to quit)[/]")
            continue
        if text is None or text.strip() in ("/exit", "/quit"):
            console.print()
            return
        cmd = text.strip()
        if not cmd:
            continue
        if cmd == "/help":
            console.print(HELP, markup=False)
        elif cmd == "/reset":
            conv.reset()
            console.print("[dim]conversation reset[/]")
        elif cmd == "/stats":
            console.print(_stats_table(eng))
        elif cmd.startswith("/save"):
            parts = cmd.split(maxsplit=1)
            if len(parts) < 2:
                console.print("[red]usage: /save FILE[/]")
                continue
            path = Path(parts[1]).expanduser()
            try:
                path.write_text(json.dumps({"messages": conv.transcript()}, indent=2))
            except OSError as e:
                console.print(f"[red]cannot write {path}: {e.strerror}[/]")
                continue
            console.print(f"[dim]saved {len(conv.messages)} messages to {path}[/]")
        elif cmd.startswith("/"):
            console.print(f"[red]unknown command {cmd.split()[0]}[/]; /help lists them")
        else:
            _answer(conv, text)


def _answer(conv: Conversation, text: str) -> None:
    before = conv.engine.stats.copy()
    last = None
    interrupted = False
    try:
        for resp in conv.send(text):
            last = resp
            sys.stdout.write(resp.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    turn = conv.engine.stats.delta(before)
    sys.stdout.write("\n")
    note = " · [yellow]stopped[/]" if interrupted else ""
    console.print(f"[dim]{_turn_line(last, turn)}[/]{note}")
