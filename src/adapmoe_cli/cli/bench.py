"""`adapmoe bench [MODEL] --budget (N | SIZE | SHARE)`: the designs side by side, measured in one run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from adapmoe_cli.cli.common import (
    BudgetOpt,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    ExpertsFormatOpt,
    GroupSizeOpt,
    JsonFlag,
    ModelArg,
    OutOpt,
    PlotOpt,
    QualityBudgetOpt,
    console,
    emit,
    err_console,
    format_named,
    not_an_input,
    note,
    open_store,
    runtime_settings,
    steps_progress,
)
from adapmoe_cli.planning import HELDOUT_TOKENS
from adapmoe_cli.policies import BENCH_DEFAULT, PEERS, POLICIES, get, is_policy, parse_policies
from adapmoe_cli.units import parse_cap, parse_fraction, parse_size


def register(app: typer.Typer) -> None:
    app.command("bench", help="Compare offloading policies on one model and budget, in one run.")(bench_cmd)


def bench_cmd(
    model: ModelArg = None,
    budget: BudgetOpt = None,
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated, from: "
                                          f"{', '.join(n for n, p in POLICIES.items() if not p.is_limit)}; "
                                          f"and other programs on the same model: {', '.join(PEERS)}; ROW:EVICTION "
                                          "runs a row with another eviction policy (adapmoe:markov).")
                        ] = ",".join(BENCH_DEFAULT),
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Prompt file, one per line.",
                                                 show_default=False)] = None,
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Tokens to decode per prompt.")] = 32,
    repeat: Annotated[int, typer.Option("--repeat", "-r", help="Repeats per policy (interleaved).")] = 3,
    quality_budget: Annotated[str, QualityBudgetOpt("adapmoe's gate budget (default 1%).")] = "1%",
    as_json: JsonFlag = False,
    out: OutOpt = None,
    plot: PlotOpt = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Also run budgets from 10% to 100% of the experts.")] = False,
    simulate: Annotated[bool, typer.Option("--simulate", help="Also replay this run's own routing in the simulator, "
                                           "calibrated from this run, and show simulated next to measured.")
                        ] = False,
    text: Annotated[Path | None, typer.Option("--text", help="Held-out text for perplexity (default: the embedded "
                                              "held-out split).", show_default=False)] = None,
    heldout_tokens: Annotated[int, typer.Option(
        "--heldout-tokens", help="Tokens of the held-out text each gate's perplexity is measured on (fewer: a "
        "quicker, noisier quality column).")] = HELDOUT_TOKENS,
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Text for profiling and the gate's "
                                                     "quality search (default: the embedded calibration split).",
                                                     show_default=False)] = None,
    expert_size: Annotated[str | None, typer.Option(
        "--expert-size", help="Benchmark the full-size variant of MODEL: experts zero-padded to about this size "
        "(e.g. 16MiB), built once in ADAPMOE_HOME; same outputs, the bytes and FLOPs of a larger model.",
        show_default=False)] = None,
    memory_cap: Annotated[str | None, typer.Option(
        "--memory-cap", help="Run every policy in its own process under this memory cap, page cache included "
        "(a cgroup; needs root): sizes or shares of the model's size on disk, comma-separated (e.g. 60%,90%). "
        "The expert slots are what the cap leaves.", show_default=False)] = None,
    gguf: Annotated[str | None, typer.Option(
        "--gguf", help="The weights llama.cpp runs: f32, bf16, f16, q8_0 or q4_0 (default: the store's width).",
        show_default=False)] = None,
    experts_format: ExpertsFormatOpt = "native",
    group_size: GroupSizeOpt = None,
    fallback_format: Annotated[str, typer.Option(
        "--fallback-format", callback=format_named, help="The resident low-bit copy of every expert the "
        "*+fallback policies compute misses with (paid out of the same budget): int8 | int4 | int2.")] = "int4",
    endpoint: Annotated[list[str] | None, typer.Option(
        "--endpoint", help="Time an OpenAI-compatible server instead (its /v1 URL; repeat to compare several, "
        "interleaved): adapmoe serve, llama-server, ollama, vLLM. Uses --prompts, --tokens, --repeat.",
        show_default=False)] = None,
    endpoint_model: Annotated[str | None, typer.Option(
        "--model", help="With --endpoint: the model name to ask for (default: the first the server lists).",
        show_default=False)] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="OPENAI_API_KEY", help="With --endpoint: the key to send.", show_default=False)] = None,
    device: DeviceOpt = None,
    compile: CompileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe bench --out bench.json --plot bench.png

      adapmoe bench --endpoint http://127.0.0.1:8000/v1 --endpoint http://127.0.0.1:8080/v1 --tokens 64

      adapmoe bench --expert-size 16MiB --memory-cap 60%,90% --policies lru+prefetch,adapmoe,llama.cpp

      adapmoe bench --expert-size 16MiB --experts-format int4 --budget 150MiB

      adapmoe bench --expert-size 16MiB --budget 256MiB --policies adapmoe,adapmoe+fallback --fallback-format int2

      adapmoe bench ./mixtral-store --budget 24GiB --policies lru+prefetch,adapmoe --tokens 64 --repeat 5

      adapmoe bench --simulate --repeat 5 --json > bench.json
    """
    caps = tuple(c for c in (memory_cap or "").split(",") if c.strip())
    not_an_input({"--out": out, "--plot": plot}, [prompts, text, calibration, config])
    if not endpoint:
        names = tuple(parse_policies(policies, peers=True))  # a misspelt row is said before torch is imported
        for cap in caps:
            parse_cap(cap, 1)  # (likewise a cap that is neither a size nor a share)
    from adapmoe_cli.bench import BenchRequest, bench_stores, read_prompts
    from adapmoe_cli.bench import run as run_bench
    from adapmoe_cli.experts_format import parse_format

    if endpoint:
        if plot is not None:
            raise typer.BadParameter("draws the policies' chart; with --endpoint use --out or --json",
                                     param_hint="--plot")
        _bench_endpoints(model, endpoint, endpoint_model, api_key, prompts, tokens, repeat, as_json, out)
        return
    settings = runtime_settings(config, budget=budget, device=device, compile=compile)
    texts = tuple(read_prompts(prompts)) if prompts else ()
    req = BenchRequest(policies=names, prompts=texts, tokens=tokens,
                       repeat=repeat,
                       quality_budget=parse_fraction(quality_budget), sweep=sweep,
                       simulate=simulate, text=text, heldout_tokens=heldout_tokens, calibration=calibration,
                       memory_caps=caps, peer_width=gguf)
    fmt = parse_format(experts_format, group_size)
    fallback = parse_format(fallback_format) if any(get(n).fallback for n in req.policies if is_policy(n)) \
        else None
    with steps_progress("bench") as progress:
        stores = bench_stores(open_store(model), parse_size(expert_size) if expert_size is not None else None, fmt,
                              settings, calibration, note=note, progress=progress, fallback=fallback)
        result = run_bench(stores.store, settings, req, progress, quality_store=stores.quality,
                           native_store=stores.native, fallback=stores.fallback)
    result["command"] = "adapmoe bench " + " ".join(_argv())
    emit(result, as_json, render, out, plot, draw)


def _bench_endpoints(model: str | None, urls: list[str], name: str | None, api_key: str | None, prompts: Path | None,
                     tokens: int, repeat: int, as_json: bool, out: Path | None) -> None:
    from adapmoe_cli.bench import default_prompts, read_prompts
    from adapmoe_cli.bench_endpoint import run as run_endpoints
    from adapmoe_cli.errors import UsageError

    if model is not None:
        raise UsageError("--endpoint times a server, which already has its model: drop MODEL (use --model NAME for "
                         "the name to ask the server for)")
    if repeat < 1:
        raise UsageError("--repeat must be at least 1")
    texts = read_prompts(prompts) if prompts else default_prompts()
    with steps_progress("bench") as progress:
        result = run_endpoints(urls, name, texts, tokens, repeat, api_key, progress)
    result["command"] = "adapmoe bench " + " ".join(_argv())
    emit(result, as_json, render_endpoints, out, None, None)


def render_endpoints(r: dict[str, Any]) -> None:
    t = Table(title=f"adapmoe bench · endpoints · {r['tokens']} tokens × {r['prompts']} prompts × {r['repeats']} "
              "repeats (greedy, streamed)", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 2))
    for c in ("endpoint", "model", "decode tok/s", "first token ms", "tokens /answer", "hit rate", "experts /token",
              "stall ms /token", "KiB read /token"):
        width = max(len(u) for u in r["endpoints"]) if c == "endpoint" else None
        t.add_column(c, justify="left" if c in ("endpoint", "model") else "right", min_width=width)
    for url, p in r["endpoints"].items():
        a = p["adapmoe"] or {}
        t.add_row(url, p["model"], _spread(p, "decode_tokens_per_s", r["repeats"]),
                  _spread({k: v * 1e3 for k, v in p.items() if k.startswith("time_to_first")},
                          "time_to_first_token_s", r["repeats"], ".0f"),
                  f"{p['completion_tokens_per_request']:.1f}", _fmt(a.get("hit_rate"), ".1%"),
                  _fmt(a.get("experts_per_token"), ".2f"), _fmt(a.get("stall_s_per_token"), ".2f", 1e3),
                  _fmt(a.get("bytes_read_per_token"), ".0f", 1 / 1024))
    console.print(t)
    console.print("[dim]hit rate … KiB read: adapmoe's own counters, shown where the server is adapmoe serve "
                  "(per generated token, the prompt's share included)[/]")


def _argv() -> list[str]:
    args = sys.argv[1:]
    return args[args.index("bench") + 1:] if "bench" in args else args


def _spread(p: dict, key: str, repeats: int, fmt: str = ".1f") -> str:
    """`median ±spread` with repeats, the value alone without."""
    med = p[key]
    if repeats < 2:
        return format(med, fmt)
    return f"{med:{fmt}} ±{max(p[key + '_max'] - med, med - p[key + '_min']):{fmt}}"


def _fmt(value: Any, fmt: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, fmt)


def render(r: dict[str, Any]) -> None:
    for point in r.get("caps", [r]):
        render_table(point)
    render_notes(r)
    for text, why in r.get("caps_refused", {}).items():
        console.print(f"[yellow]cap {text} not run:[/] {why}")
    cap = r.get("memory_cap")
    if cap is not None and not cap["applied"]:
        err_console.print(f"[yellow]warning:[/] {cap['why']}")
    elif cap is not None:
        console.print(f"memory caps hold the whole process, page cache included (a cgroup per run); the runtime's "
                      f"measured baseline {cap['baseline_bytes'] / 2**20:.0f} MiB (the peak working set of Python, "
                      f"torch, the dense weights) and {cap['margin_bytes'] / 2**20:.0f} MiB of margin come off each "
                      "cap before the expert slots")


def render_table(r: dict[str, Any]) -> None:
    cols = ["policy", "decode tok/s", "prefill tok/s", "experts /token", "hit rate", "stall ms /token",
            "KiB read /token", "I/O floor tok/s", "held-out ppl"]
    capped = r.get("memory_cap", {}).get("applied", False)
    if capped:
        cols.append("peak MiB")
    rows = []
    for name, p in r["policies"].items():
        floor = p["io_floor_tokens_per_s"]
        row = [name, _spread(p, "decode_tokens_per_s", r["repeats"]),
               _spread(p, "prefill_tokens_per_s", r["repeats"], ".0f"), _fmt(p["experts_per_token"], ".2f"),
               _fmt(p["hit_rate"], ".1%"), _fmt(p["stall_s_per_token"], ".2f", 1e3),
               _fmt(p["bytes_read_per_token"], ".0f", 1 / 1024),
               "—" if p.get("peer") else "∞" if floor is None else f"{floor:.0f}",
               _fmt(p["perplexity"], ".3f")]
        if capped:
            row.append(_fmt(p.get("peak_bytes"), ".0f", 2**-20))
        rows.append(row)
    for name, f in r.get("failed", {}).items():
        row = [name, "killed" if f["why"].startswith("killed") else "failed"] + ["—"] * (len(cols) - 2)
        if capped:
            row[-1] = _fmt(f.get("peak_bytes"), ".0f", 2**-20)
        rows.append(row)
    size = f" ({r['budget_bytes'] / 2**20:.0f} MiB)" if "budget_bytes" in r else ""
    title = (f"adapmoe bench · {r['budget_slots']}/{r['total_experts']} expert slots{size} · {r['tokens']} tokens × "
             f"{r['prompts']} prompts × {r['repeats']} repeats")
    if capped:
        c = r["memory_cap"]
        title += f" · memory cap {c['text']} = {c['cap_bytes'] / 2**20:.0f} MiB"
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 2))
    for i, c in enumerate(cols):  # values never cut: each column as wide as its widest value, headers wrap
        width = max([len(row[i]) for row in rows] + [len(w) for w in c.split()])
        t.add_column(c, justify="left" if i == 0 else "right", width=width)
    for row in rows:
        t.add_row(*row)
    console.print(t)
    for name, f in r.get("failed", {}).items():
        peak = f" at a peak of {f['peak_bytes'] / 2**20:.0f} MiB" if f.get("peak_bytes") else ""
        console.print(f"[yellow]{name}:[/] {f['why']}{peak}")
    for name, why in r.get("skipped", {}).items():
        console.print(f"[yellow]skipped {name}:[/] {why}")
    compiled = {n: p["compile_s"] for n, p in r["policies"].items() if p.get("compile_s") is not None}
    if compiled:
        console.print("decode step compiled (--compile), outside the timing: " + ", ".join(
            f"{n} {s:.1f} s" for n, s in compiled.items()) + " per run (median)", soft_wrap=True)
    loops = sorted({shape for p in r["policies"].values() for shape, way in (p.get("row_products") or {}).items()
                    if way == "multiply-and-sum"})
    if loops:
        console.print("eagerly, one row's product by a multiply-and-sum (measured faster than BLAS here) for weights "
                      + ", ".join(loops), soft_wrap=True)


def render_notes(r: dict[str, Any]) -> None:
    console.print(f"disk: {r['disk_read_bytes_per_s'] / 1e6:.0f} MB/s raw ({r['bandwidth_measured_with']}); "
                  f"page cache {r['page_cache']}")
    fq = r.get("format_quality")
    if fq is not None:
        console.print(f"experts {r['experts_format']}: held-out perplexity {fq['perplexity']:.3f} ungated against "
                      f"{fq['native_perplexity']:.3f} native ({fq['increase']:+.2%}); the gate's quality budget is "
                      f"what the format leaves of {fq['quality_budget']:.1%}: {fq['gate_quality_budget']:.2%}",
                      soft_wrap=True)
    for warning in r.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {warning}")
    if "simulated" in r:
        render_simulated(r["simulated"])


def render_simulated(sim: dict[str, Any]) -> None:
    t = Table(title="simulated (this run's routing, this machine calibrated from this run) vs measured")
    for c in ("policy", "measured tok/s: fastest (median)", "simulated tok/s", "error vs fastest (median)",
              "stall ms/tok meas./sim.", "counts equal"):
        t.add_column(c, justify="left" if c == "policy" else "right")
    for name, p in sim["policies"].items():
        err = f"{p['error']:+.1%} ({p['error_vs_median']:+.1%})"
        t.add_row(name, f"{p['measured_decode_tokens_per_s']:.1f} ({p['measured_median']:.1f})",
                  f"{p['decode_tokens_per_s']:.1f}", err + (" calibration" if p["calibration_point"] else ""),
                  f"{p['measured_stall_s_per_token'] * 1e3:.2f} / {p['stall_s_per_token'] * 1e3:.2f}",
                  "yes" if p["counts_match"] else "[red]no[/]")
    console.print(t)
    hw = sim["hardware"]
    worst = sim["max_error"]
    verdict = ("—" if worst is None else
               f"largest error {worst:.1%} ({'within' if sim['within_tolerance'] else 'outside'} "
               f"{sim['tolerance']:.0%})")
    console.print(f"calibrated with {' and '.join(sim['calibrated_with'])} (fastest repeats): one load "
                  f"{hw['measured']['load_s'] * 1e3:.2f} ms (+{hw['link_wakeup_s'] * 1e6:.0f} us after idle) + "
                  f"{hw['load_overhead_s'] * 1e6:.0f} us of compute-thread time, a read beside the compute "
                  f"{hw['interference_s'] * 1e6:.0f} us, prediction "
                  f"{hw['predict_overhead_s'] * 1e6:.0f} us/layer, dense {hw['measured']['dense_layer_s'] * 1e3:.2f} "
                  f"ms/layer; the other policies are predicted: {verdict}")


def draw(r: dict[str, Any], path: Path) -> None:
    """Small multiples of what the policies change: decode tok/s (median, min–max), experts per token,
    stall per token, hit rate and perplexity; and tok/s against the budget when swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = r["policies"]
    names = list(pol)
    panels = [("decode tok/s (median, min–max)", "decode_tokens_per_s", 1),
              ("experts per token", "experts_per_token", 1),
              ("stall ms per token", "stall_s_per_token", 1e3), ("hit rate (%)", "hit_rate", 100),
              ("held-out perplexity", "perplexity", 1)]
    ncol = len(panels) + (1 if "sweep" in r else 0)
    fig, axes = plt.subplots(1, ncol, figsize=(3.2 * ncol, 3.6), squeeze=False)
    colors = ["#c44e52" if n == "adapmoe" else "#4c72b0" for n in names]
    for ax, (title, key, scale) in zip(axes[0], panels, strict=False):
        shown = [n for n in names if pol[n][key] is not None]  # peers have no counts of ours
        vals = [pol[n][key] * scale for n in shown]
        err = None
        if key == "decode_tokens_per_s" and r["repeats"] > 1:
            err = [[v - pol[n][key + "_min"] for n, v in zip(shown, vals, strict=True)],
                   [pol[n][key + "_max"] - v for n, v in zip(shown, vals, strict=True)]]
        ax.bar(shown, vals, yerr=err, capsize=3, color=[colors[names.index(n)] for n in shown])
        if key == "perplexity":
            lo = min(vals)
            ax.set_ylim(lo * 0.98, max(vals) * 1.01)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    if "sweep" in r:
        ax2 = axes[0][-1]
        pts = r["sweep"]
        for name in sorted({n for p in pts for n in p["policies"]}):
            xs = [p["budget_slots"] / r["total_experts"] for p in pts if name in p["policies"]]
            ys = [p["policies"][name] for p in pts if name in p["policies"]]
            ax2.plot(xs, ys, marker="o", label=name)
        ax2.set_xlabel("cache budget (share of all experts)", fontsize=8)
        ax2.set_title("decode tok/s by budget", fontsize=9)
        ax2.legend(fontsize=7)
    fig.suptitle(f"adapmoe bench · {r['budget_slots']}/{r['total_experts']} expert slots · {r['repeats']} repeats",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
