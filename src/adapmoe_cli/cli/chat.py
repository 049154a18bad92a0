"""`adapmoe chat [MODEL]`: an interactive, streaming chat on the offloading runtime; `--prompt` (or a
prompt on stdin) answers once, `--json` prints one object. The interactive session survives anything a
turn does: a full context drops the oldest turns, an error is one line and the prompt comes back."""

from __future__ import annotations

import json
import resource
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from adapmoe_cli.budget import total_slots
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
    steps_progress,
)
from adapmoe_cli.errors import AdapmoeError
from adapmoe_cli.units import format_bytes

if TYPE_CHECKING:  # the library (torch, transformers) is imported when a command runs, not for --help
    from adapmoe_cli.conversation import Conversation
    from adapmoe_cli.runtime.engine import Engine
    from adapmoe_cli.runtime.gating import GatePolicy
    from adapmoe_cli.runtime.generate import Response
    from adapmoe_cli.runtime.stats import Stats
    from adapmoe_cli.settings import Settings
    from adapmoe_cli.store import Store

HELP = """commands:
  /help            this text
  /show            model, store, budget, plan, gate, context and generation settings
  /set NAME VALUE  change a setting for the next turns: temperature, top_p, top_k, seed, max_tokens,
                   repeat_penalty, ctx, system (the rest of the line; empty clears it), gate on|off,
                   prefetch on|off
  /reset           forget the conversation (keeps the expert cache)
  /stats           cumulative runtime statistics
  /save FILE       write the transcript as JSON
  /exit            quit (Ctrl-D works too)
input: end a line with \\ to continue on the next one, or wrap a block in \"\"\" lines.
Ctrl-C stops the current answer. When the context is full, the oldest turns are dropped."""
DEMO = "embedded demo model: it shows the mechanics (offloading, gating, prefetch), not knowledge"
G = DEFAULTS.generation


def register(app: typer.Typer) -> None:
    app.command("chat", help="Chat with a model on the offloading runtime.")(chat_cmd)


def chat_cmd(
    model: ModelArg = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer this once and exit.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: plain continuation.")] = False,
    as_json: JsonFlag = False,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.",
                                                       show_default=str(G.max_new_tokens))] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="0 = greedy.",
                                                      show_default=str(G.temperature))] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", show_default=str(G.top_p))] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="0 = off.", show_default=str(G.top_k))] = None,
    repeat_penalty: Annotated[float | None, typer.Option(
        "--repeat-penalty", help="Above 1 discourages repeating tokens; 1 = off. With the default, -t 0 is greedy "
        "decoding of the penalised scores, not pure greedy.", show_default=str(G.repetition_penalty))] = None,
    seed: Annotated[int | None, typer.Option("--seed", show_default=str(G.seed))] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", "--num-ctx", help="Tokens the conversation may hold (at most "
                                            "the model's context).", show_default="the model's context")] = None,
    cache_experts: CacheExpertsOpt = None,
    memory: MemoryOpt = None,
    prefetch: PrefetchOpt = None,
    compile: CompileOpt = None,
    policy: PolicyOpt = None,
    plan: PlanOpt = None,
    adaptive_gate: AdaptiveOpt = None,
    gate_scale: GateScaleOpt = None,
    auto_profile: Annotated[bool | None, typer.Option(
        "--auto-profile/--no-auto-profile", help="A store with no profile: profile and plan it first (yes) or "
        "route plain top-k (no).", show_default=f"ask ({DEFAULTS.auto_profile})")] = None,
    device: DeviceOpt = None,
    experts_format: ExpertsFormatOpt = "native",
    group_size: GroupSizeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe chat

      adapmoe chat --prompt "What does the json module do?" --json

      adapmoe chat ./mixtral-store --memory 12GiB --temperature 0.7
    """
    settings = runtime_settings(
        config, cache_experts=cache_experts, memory=memory, prefetch=prefetch, device=device, policy=policy,
        compile=compile,
        plan=plan, adaptive=adaptive_gate, gate_scale=gate_scale, max_new_tokens=max_new_tokens,
        auto_profile=None if auto_profile is None else ("yes" if auto_profile else "no"),
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repeat_penalty, seed=seed, context=ctx,
    )
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD, never an exception
        sys.stdin.reconfigure(errors="replace")
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise typer.BadParameter("stdin held no prompt", param_hint="stdin")
    if as_json and prompt is None:
        raise typer.BadParameter("answers one prompt as JSON: give --prompt or a prompt on stdin",
                                 param_hint="--json")
    from adapmoe_cli.conversation import Conversation, load_tokenizer
    from adapmoe_cli.planning.resolve import open_engine

    store = open_store(model, experts_format, group_size)
    offer_method(store, settings, interactive=prompt is None and sys.stdin.isatty())
    with open_engine(store, settings, note=note) as engine:
        conv = Conversation(engine, load_tokenizer(store), settings.generation, system=system, raw=raw)
        compile_now(engine)
        if prompt is not None:
            _one_shot(conv, prompt, as_json)
        else:
            _interactive(conv)


def offer_method(store: Store, settings: Settings, interactive: bool) -> None:
    """A store without a profile routes plain top-k: profile and plan it first if the user says so when
    asked (interactive), or always with `--auto-profile` / `auto_profile: yes`."""
    from adapmoe_cli.planning.planner import make_method
    from adapmoe_cli.profiling.profile_file import default_path

    if default_path(store).exists() or settings.auto_profile == "no":
        return
    total_slots(settings.cache.budget, store.cache_shape)  # a bad budget is the error to show, not this offer
    if settings.auto_profile == "ask":
        if not interactive:  # one-shot and scripted use stay quiet; the interactive banner says how to turn it on
            return
        question = ("this store has no profile yet, so AdapMoE (adaptive gate, cache plan) is off; profile and "
                    "plan it now (a few minutes on a small model; --auto-profile does this without asking)?")
        if not typer.confirm(question, default=False):
            return
    with steps_progress("profile and plan") as progress:
        path = make_method(store, settings, progress)
    err_console.print(f"[dim]wrote {escape(str(path))}[/]")


def compile_now(engine: Engine) -> None:
    """With --compile: compile the decode step before the first prompt (a reply must not stall on it)."""
    from adapmoe_cli.runtime.generate import compile_decode

    if not engine.decode.pending:
        return
    with err_console.status("compiling the decode step (--compile: tens of seconds the first time on this "
                            "machine, seconds once cached)"):
        took = compile_decode(engine)
    if took is not None and engine.decode.failure is None:
        err_console.print(f"[dim]decode step compiled in {took:.1f} s[/]")


def _decode_text(engine: Engine) -> str:
    step = engine.decode
    if not step.enabled:
        return "eager (--compile compiles it)"
    if step.failure is not None:
        return f"eager: compiling failed ({step.failure})"
    return f"compiled in {step.compile_s:.1f} s" if step.compile_s is not None else "compiled on the first token"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _numbers(conv: Conversation, last: Response | None, turn: Stats) -> dict[str, Any]:
    """The counted numbers of one answer, as `--json` prints them and the status line shows them."""
    prompt_tps = last.prompt_tokens / last.prompt_s if last and last.prompt_s > 0 else 0.0
    return {
        "tokens": last.generation_tokens if last else 0,
        "tokens_per_s": last.tokens_per_s if last else 0.0,
        "prompt_tokens": last.prompt_tokens if last else 0,
        "prompt_s": last.prompt_s if last else 0.0,
        "prompt_tokens_per_s": prompt_tps,
        "experts_per_token": turn.experts_per_token,
        "hit_rate": turn.hit_rate,
        "hits": turn.hits,
        "misses": turn.misses,
        "prefetch_hits": turn.prefetch_hits,
        "wasted_prefetches": turn.wasted_prefetches,
        "bytes_read": turn.bytes_read,
        "stall_s": turn.stall_s,
        "context_used": conv.context_used,
        "context_max": conv.max_context,
        "peak_rss_bytes": _peak_rss(),
        "finish_reason": last.finish_reason if last else None,
    }


def _turn_line(n: dict[str, Any]) -> str:
    return (
        f"{n['tokens']} tokens · prompt {n['prompt_tokens_per_s']:.0f} tok/s · {n['tokens_per_s']:.1f} tok/s · hit "
        f"rate {n['hit_rate']:.0%} · {n['experts_per_token']:.2f} experts/token · stall {n['stall_s']:.2f} s · read "
        f"{format_bytes(n['bytes_read'])} · ctx {n['context_used']}/{n['context_max']} · RSS "
        f"{format_bytes(n['peak_rss_bytes'])}"
    )


def _one_shot(conv: Conversation, prompt: str, as_json: bool) -> None:
    before = conv.engine.stats.copy()
    last = None
    for resp in conv.send(prompt):
        last = resp
        if not as_json:
            sys.stdout.write(resp.text)
            sys.stdout.flush()
    numbers = _numbers(conv, last, conv.engine.stats.delta(before))
    if as_json:
        text = conv.messages[-1]["content"]
        print(json.dumps({"text": text, "token_ids": last.token_ids if last else [], "stats": numbers}))
    else:
        sys.stdout.write("\n")
        err_console.print(f"[dim]{_turn_line(numbers)}[/]", soft_wrap=True)


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
        ("peak RSS", format_bytes(_peak_rss())),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def budget_text(engine: Engine) -> str:
    b = engine.budget
    return (f"{b.total}/{len(engine.store.experts)} experts cached ({format_bytes(b.bytes)}; "
            f"{escape(b.source)})")


def gate_text(engine: Engine, planned: GatePolicy) -> str:
    g = engine.gate
    if g.thresholds:
        return f"{g.rule}" + (f" c={g.scale:.3g}" if g.scale is not None else "")
    if engine.store.shape.top_k < 2:
        return "off (top-1: nothing to drop)"
    if planned.thresholds:
        return f"off (top-{engine.store.shape.top_k}; /set gate on)"
    return f"off (top-{engine.store.shape.top_k}; `adapmoe profile` then `adapmoe plan-cache` turn it on)"


def _show_table(conv: Conversation, planned_gate: GatePolicy) -> Table:
    eng, gen = conv.engine, conv.gen
    source = eng.store.manifest.get("source", {})
    origin = source.get("repo_id") or source.get("embedded") or source.get("path", "")
    t = Table(title="session", show_header=False, box=None)
    rows: list[tuple[str, str]] = [
        # (what came from a store or the user is text, never markup: escaped)
        ("model", escape(f"{eng.store.family.model_type} ({origin})")),
        ("store", escape(str(eng.store.path))),
        ("budget", budget_text(eng)),
        ("eviction", eng.eviction),
        ("prefetch", (f"on: a prediction is read when its layer and rank were needed ≥ "
                      f"{eng.settings.prefetch_precision:.0%} of the time (prefetch_precision)"
                      if eng.settings.prefetch_precision > 0 else "on: every prediction is read")
         if eng.settings.prefetch else "off"),
        ("decode step", _decode_text(eng)),
        ("adaptive gate", gate_text(eng, planned_gate)),
        ("context", f"{conv.context_used}/{conv.max_context} tokens"),
        ("generation", f"max_tokens {gen.max_new_tokens} · temperature {gen.temperature} · top_p {gen.top_p} · top_k "
                       f"{gen.top_k} · repeat_penalty {gen.repetition_penalty} · seed {gen.seed}"),
        ("system", escape(_visible(conv.system)) if conv.system else "—"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _visible(text: str) -> str:
    """`text` with control characters shown as escapes: a system message must not clear the screen or ring
    the bell when `/show` prints it."""
    return "".join(c if c in "\n\t" or c.isprintable() else ascii(c)[1:-1] for c in text)


#: `/set NAME` → the generation setting it changes, and how its value is read
_GEN_SETTINGS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "temp": ("temperature", float), "top_p": ("top_p", float),
    "top-p": ("top_p", float), "top_k": ("top_k", int), "top-k": ("top_k", int), "seed": ("seed", int),
    "max_tokens": ("max_new_tokens", int), "max-new-tokens": ("max_new_tokens", int), "n": ("max_new_tokens", int),
    "repeat_penalty": ("repetition_penalty", float), "repeat-penalty": ("repetition_penalty", float),
    "ctx": ("context", int), "num_ctx": ("context", int),
}


def _set(conv: Conversation, planned_gate: GatePolicy, args: str) -> str:
    """Apply `/set NAME VALUE`; the line to print."""
    from adapmoe_cli.runtime.gating import GatePolicy

    name, _, value = args.strip().partition(" ")
    name, value = name.lower(), value.strip()
    if name == "system":
        conv.set_system(value)
        return f"system message {'set' if value else 'cleared'}"
    if name in ("gate", "prefetch"):
        if value not in ("on", "off"):
            raise ValueError(f"/set {name} on|off")
        on = value == "on"
        if name == "prefetch":
            conv.engine.use_prefetch(on)
            return f"prefetch {value}"
        if on and not planned_gate.thresholds:
            return "no adaptive gate to turn on: `adapmoe profile` then `adapmoe plan-cache` make one"
        conv.engine.use_gate(planned_gate if on else GatePolicy.off())
        return f"adaptive gate {value}"
    if name not in _GEN_SETTINGS:
        raise ValueError(f"unknown setting {name!r}; /help lists them")
    field, kind = _GEN_SETTINGS[name]
    try:
        parsed = kind(value)
    except ValueError:
        raise ValueError(f"/set {name} needs a {kind.__name__}, got {value!r}") from None
    conv.gen = replace(conv.gen, **{field: parsed})  # validated: a bad value raises a UsageError
    return f"{name} = {parsed}"


def _line_editing() -> None:
    """Arrow keys, history and lines longer than the terminal's 4,095-byte canonical limit at the prompt: GNU
    readline where Python has it (`input` then reads through it), with bracketed paste off so that no escape
    sequence reaches programs reading the session's output."""
    if not sys.stdin.isatty():
        return
    try:
        import readline
    except ImportError:  # (Python built without it: the plain terminal line)
        return
    readline.parse_and_bind("set enable-bracketed-paste off")


def _interactive(conv: Conversation) -> None:
    # Ctrl-C must stop an answer even when a parent started us with SIGINT ignored (background jobs are)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _line_editing()
    eng = conv.engine
    planned_gate = eng.gate
    demo = "embedded" in eng.store.manifest.get("source", {})
    console.print(
        f"[bold]adapmoe chat[/] · {eng.store.family.model_type} from {escape(str(eng.store.path))} · "
        f"{budget_text(eng)} · prefetch {'on' if eng.settings.prefetch else 'off'} · gate "
        f"{gate_text(eng, planned_gate)} · ctx {conv.max_context}" + (f"\n[yellow]{DEMO}[/]" if demo else "") +
        "\n[dim]/help for commands, Ctrl-C stops an answer, /exit quits[/]"
    )
    while True:
        try:
            text = _read_input()
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-C: type /exit to quit)[/]")
            continue
        if text is None or text.strip() in ("/exit", "/quit", "/bye"):
            console.print()
            return
        cmd = text.strip()
        if not cmd:
            continue
        try:
            _command(conv, planned_gate, cmd, text)
        except (AdapmoeError, ValueError) as e:  # the session survives whatever a turn does
            console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        except KeyboardInterrupt:  # (during an answer, `_answer` stops it; this is Ctrl-C before one starts)
            console.print("\n[dim](stopped)[/]")


def _command(conv: Conversation, planned_gate: GatePolicy, cmd: str, text: str) -> None:
    if cmd == "/help":
        console.print(HELP, markup=False)
    elif cmd == "/reset":
        conv.reset()
        console.print("[dim]conversation reset[/]")
    elif cmd == "/stats":
        console.print(_stats_table(conv.engine))
    elif cmd == "/show":
        console.print(_show_table(conv, planned_gate))
    elif cmd == "/set" or cmd.startswith("/set "):
        console.print(f"[dim]{escape(_set(conv, planned_gate, cmd[4:]))}[/]")
    elif cmd.startswith("/save"):
        parts = cmd.split(maxsplit=1)
        if len(parts) < 2:
            raise ValueError("usage: /save FILE")
        path = Path(parts[1]).expanduser()
        try:
            path.write_text(json.dumps({"messages": conv.transcript()}, indent=2))
        except OSError as e:
            raise ValueError(f"cannot write {path}: {e.strerror}") from None
        console.print(f"[dim]saved {len(conv.messages)} messages to {escape(str(path))}[/]")
    elif cmd.startswith("/"):
        raise ValueError(f"unknown command {cmd.split()[0]}; /help lists them")
    else:
        _answer(conv, text)


def _answer(conv: Conversation, text: str) -> None:
    room = conv.make_room(text)
    if room.dropped_turns:
        console.print(f"[dim](context full: dropped the oldest {room.dropped_turns} turn"
                      f"{'s' if room.dropped_turns > 1 else ''})[/]")
    if room.max_new_tokens < conv.gen.max_new_tokens:
        console.print(f"[dim](the answer is limited to {room.max_new_tokens} tokens by the context)[/]")
    before = conv.engine.stats.copy()
    last = None
    interrupted = False
    try:
        for resp in conv.send(text, max_new_tokens=room.max_new_tokens):
            last = resp
            sys.stdout.write(resp.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    sys.stdout.write("\n")
    line = _turn_line(_numbers(conv, last, conv.engine.stats.delta(before)))
    console.print(f"[dim]{line}[/]" + (" · [yellow]stopped[/]" if interrupted else ""))
