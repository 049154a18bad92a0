"""`adapmoe bench [MODEL] --budget (N | SIZE | SHARE)`: the designs side by side, measured in one run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adapmoe_cli.bench import BenchRequest, read_prompts
from adapmoe_cli.bench import run as run_bench
from adapmoe_cli.cli.common import (
    BudgetOpt,
    ConfigOpt,
    DeviceOpt,
    JsonFlag,
    ModelArg,
    QualityBudgetOpt,
    console,
    emit,
    err_console,
    open_store,
    runtime_settings,
)
from adapmoe_cli.policies import BENCH_DEFAULT, POLICIES, parse_policies
from adapmoe_cli.units import parse_fraction


def register(app: typer.Typer) -> None:
    app.command("bench", help="Compare offloading policies on one model and budget, in one run.")(bench_cmd)


def bench_cmd(
    model: ModelArg = None,
    budget: BudgetOpt = None,
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated, from: "
                                          f"{', '.join(n for n, p in POLICIES.items() if not p.is_limit)}.")
                        ] = ",".join(BENCH_DEFAULT),
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Prompt file, one per line.",
                                                 show_default=False)] = None,
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Tokens to decode per prompt.")] = 32,
    repeat: Annotated[int, typer.Option("--repeat", "-r", help="Repeats per policy (interleaved).")] = 3,
    quality_budget: Annotated[str, QualityBudgetOpt("adapmoe's gate budget (default 1%).")] = "1%",
    as_json: JsonFlag = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write the results as JSON to this file.",
                                             show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG chart here.", show_default=False)] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Also run budgets from 10% to 100% of the experts.")] = False,
    simulate: Annotated[bool, typer.Option("--simulate", help="Also replay this run's own routing in the simulator, "
                                           "calibrated from this run, and show simulated next to measured.")
                        ] = False,
    text: Annotated[Path | None, typer.Option("--text", help="Held-out text for perplexity (default: the embedded "
                                              "held-out split).", show_default=False)] = None,
    calibration: Annotated[Path | None, typer.Option("--calibration", help="Text for profiling and the gate's "
                                                     "quality search (default: the embedded calibration split).",
                                                     show_default=False)] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe bench --out bench.json --plot bench.png

      adapmoe bench ./mixtral-store --budget 24GiB --policies lru+prefetch,adapmoe --tokens 64 --repeat 5

      adapmoe bench --simulate --repeat 5 --json > bench.json
    """
    settings = runtime_settings(config, budget=budget, device=device)
    texts = tuple(read_prompts(prompts)) if prompts else ()
    req = BenchRequest(policies=tuple(parse_policies(policies)), prompts=texts, tokens=tokens, repeat=repeat,
                       quality_budget=parse_fraction(quality_budget), sweep=sweep,
                       simulate=simulate, text=text, calibration=calibration)
    store = open_store(model)
    with Progress(TextColumn("bench {task.fields[what]:>14}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("bench", total=None, what="")

        def progress(what: str, done: int, total: int) -> None:
            if total:
                bar.update(task, completed=done, total=total, what=what[:14])
            else:
                bar.update(task, what=what[:14])

        result = run_bench(store, settings, req, progress)
    result["command"] = "adapmoe bench " + " ".join(_argv())
    emit(result, as_json, render, out, plot, draw)


def _argv() -> list[str]:
    args = sys.argv[1:]
    return args[args.index("bench") + 1:] if "bench" in args else args


def _pm(p: dict, key: str) -> str:
    med, lo, hi = p[key], p[key + "_min"], p[key + "_max"]
    return f"{med:.2f} ± {max(hi - med, med - lo):.2f}"


def render(r: dict[str, Any]) -> None:
    t = Table(title=f"adapmoe bench · {r['budget_slots']}/{r['total_experts']} expert slots · {r['tokens']} tokens × "
                    f"{r['prompts']} prompts × {r['repeats']} repeats")
    cols = ("policy", "decode tok/s", "prefill tok/s", "experts/tok", "hit rate", "pf prec/rec", "KiB read/tok",
            "stall ms/tok", "I/O floor tok/s", "perplexity")
    for c in cols:
        t.add_column(c, justify="left" if c == "policy" else "right")
    for name, p in r["policies"].items():
        prec, rec = p["prefetch_precision"], p["prefetch_recall"]
        pf = "—" if prec is None else f"{prec:.0%}/{rec:.0%}"
        floor = p["io_floor_tokens_per_s"]
        t.add_row(name, _pm(p, "decode_tokens_per_s"), _pm(p, "prefill_tokens_per_s"), f"{p['experts_per_token']:.2f}",
                  f"{p['hit_rate']:.1%}", pf, f"{p['bytes_read_per_token'] / 1024:.0f}",
                  f"{p['stall_s_per_token'] * 1e3:.2f}", "∞" if floor is None else f"{floor:.0f}",
                  f"{p['perplexity']:.3f}")
    console.print(t, width=max(console.width, 150))
    console.print(f"disk: {r['disk_read_bytes_per_s'] / 1e6:.0f} MB/s raw ({r['bandwidth_measured_with']}); "
                  f"page cache {r['page_cache']}")
    for name, why in r.get("skipped", {}).items():
        console.print(f"[yellow]skipped {name}:[/] {why}")
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
    console.print(t, width=max(console.width, 120))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = r["policies"]
    names = list(pol)
    fig, axes = plt.subplots(1, 2 if "sweep" in r else 1, figsize=(12 if "sweep" in r else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    med = [pol[n]["decode_tokens_per_s"] for n in names]
    err = [[m - pol[n]["decode_tokens_per_s_min"] for n, m in zip(names, med, strict=True)],
           [pol[n]["decode_tokens_per_s_max"] - m for n, m in zip(names, med, strict=True)]]
    ax.bar(names, med, yerr=err, capsize=4, color="#4c72b0")
    for i, n in enumerate(names):
        floor = pol[n]["io_floor_tokens_per_s"]
        if floor is not None and floor < 3 * max(med):
            ax.plot([i - 0.4, i + 0.4], [floor, floor], color="#c44e52", lw=2,
                    label="I/O floor" if i == 0 or "I/O floor" not in ax.get_legend_handles_labels()[1] else None)
    ax.set_ylabel("decode tokens/s (median, min–max)")
    ax.set_title(f"{r['budget_slots']}/{r['total_experts']} expert slots")
    ax.tick_params(axis="x", rotation=20)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if "sweep" in r:
        ax2 = axes[0][1]
        pts = r["sweep"]
        for name in sorted({n for p in pts for n in p["policies"]}):
            xs = [p["budget_slots"] / r["total_experts"] for p in pts if name in p["policies"]]
            ys = [p["policies"][name] for p in pts if name in p["policies"]]
            ax2.plot(xs, ys, marker="o", label=name)
        ax2.set_xlabel("cache budget (share of all experts)")
        ax2.set_ylabel("decode tokens/s")
        ax2.legend()
        ax2.set_title("budget sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
