"""`adapmoe bench [MODEL] --budget (N | SIZE)`: the designs side by side, measured in one run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adapmoe_cli.bench import (
    DEFAULT_POLICIES,
    POLICIES,
    default_prompts,
    parse_policies,
    read_prompts,
    run_bench,
    setups,
)
from adapmoe_cli.cli.common import ConfigOpt, DeviceOpt, ModelArg, console, err_console, open_store, runtime_settings
from adapmoe_cli.models import default_text
from adapmoe_cli.planning.plan_file import Plan
from adapmoe_cli.planning.run import PlanRequest, gate_perplexity, make_plan, parse_budget, parse_fraction
from adapmoe_cli.profiling.profile_file import default_path as default_profile
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import Settings
from adapmoe_cli.store import Store


def register(app: typer.Typer) -> None:
    app.command("bench", help="Compare offloading policies on one model and budget, in one run.")(bench_cmd)


def bench_cmd(
    model: ModelArg = None,
    budget: Annotated[str, typer.Option("--budget", "-b", help="Expert slots (e.g. 32) or memory (e.g. 6GiB); "
                                        "default: half the experts.", show_default=False)] = "",
    policies: Annotated[str, typer.Option("--policies", help=f"Comma-separated, from: {', '.join(POLICIES)}.")
                        ] = ",".join(DEFAULT_POLICIES),
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Prompt file, one per line.",
                                                 show_default=False)] = None,
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Tokens to decode per prompt.")] = 32,
    repeat: Annotated[int, typer.Option("--repeat", "-r", help="Repeats per policy (interleaved).")] = 3,
    quality_budget: Annotated[str, typer.Option("--quality-budget", "-q", help="adapmoe's gate budget.")] = "1%",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.",
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

      adapmoe bench --json bench.json --plot bench.png

      adapmoe bench ./mixtral-store --budget 24GiB --policies lru+prefetch,adapmoe --tokens 64 --repeat 5

      adapmoe bench --simulate --repeat 5
    """
    if tokens < 2 or repeat < 1:
        raise typer.BadParameter("--tokens must be ≥ 2 and --repeat ≥ 1")
    names = parse_policies(policies)
    if simulate:  # the runtime's two ends calibrate the simulator
        names += [n for n in ("naive", "resident") if n not in names]
    qb = parse_fraction(quality_budget)
    settings = runtime_settings(config, None, None, None, device)
    texts = read_prompts(prompts) if prompts else default_prompts()
    store = open_store(model)
    slots = parse_budget(budget, store) if budget else len(store.experts) // 2
    calib_text = calibration or default_text("calibration")
    ensure_profile(store, settings, calib_text)
    with contextlib.ExitStack() as stack:
        from adapmoe_cli.conversation import Conversation, load_tokenizer
        from adapmoe_cli.runtime.engine import Engine

        with Engine(store, settings) as eng:
            tok = load_tokenizer(eng)
            prompt_ids = [Conversation(eng, tok, settings.generation)._prompt_ids(t) for t in texts]
        calib = stack.enter_context(gate_perplexity(store, settings, calib_text, 4096))
        held = stack.enter_context(gate_perplexity(store, settings, text or default_text("heldout"), 8192))
        results = [_one_budget(store, settings, names, slots, prompt_ids, tokens, repeat, qb, calib, held, simulate)]
        if sweep:
            total = len(store.experts)
            for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
                s = max(len(store.shape.moe_layers), round(frac * total))
                if s != slots:
                    swept = [n for n in names if n not in ("resident", "naive")]
                    results.append(_one_budget(store, settings, swept, s, prompt_ids, tokens, repeat, qb, calib, held))
    main = results[0]
    main["command"] = "adapmoe bench " + " ".join(_argv())
    if sweep:
        points = [{"budget_slots": r["budget_slots"],
                   "policies": {n: p["decode_tokens_per_s"] for n, p in r["policies"].items()}} for r in results]
        main["sweep"] = sorted(points, key=lambda r: r["budget_slots"])
    render(main)
    if json_out:
        json_out.write_text(json.dumps(main, indent=2))
        console.print(f"wrote {json_out}")
    if plot:
        draw(main, plot)
        console.print(f"wrote {plot}")


def _argv() -> list[str]:
    import sys

    args = sys.argv[1:]
    return args[args.index("bench") + 1:] if "bench" in args else args


def ensure_profile(store: Store, settings: Settings, text: Path) -> None:
    if default_profile(store).exists():
        return
    from adapmoe_cli.conversation import load_tokenizer
    from adapmoe_cli.profiling.run import ProfileRequest, profile
    from adapmoe_cli.runtime.engine import Engine

    err_console.print("[dim]no profile in the store yet: running `adapmoe profile` first …[/]")
    with Engine(store, settings) as eng:  # profile as many tokens as the text holds, up to 8192
        n = min(8192, len(load_tokenizer(eng)(text.read_text())["input_ids"]))
    profile(store, settings, ProfileRequest(text, str(text), n, 256))


def _one_budget(store: Store, settings: Settings, names: list[str], slots: int, prompt_ids: list[list[int]],
                tokens: int, repeat: int, qb: float, calib: Any, held: Any, simulate: bool = False) -> dict[str, Any]:
    plans: dict[bool, tuple[dict[int, int], GatePolicy]] = {}

    def plan_for(gated: bool) -> tuple[dict[int, int], GatePolicy]:
        if gated not in plans:
            out = store.path / "bench" / f"plan-{slots}-{'gated' if gated else 'topk'}.json"
            req = PlanRequest(budget_slots=slots, gate_mode="quality" if gated else "off", quality_budget=qb,
                              rule=settings.gate.rule, out=out)
            path, data = make_plan(store, settings, req, calib if gated else None)
            plan = Plan(path, data)
            plans[gated] = (plan.quotas, plan.gate)
        return plans[gated]

    with Progress(TextColumn("bench {task.fields[policy]:>14}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("bench", total=None, policy="")
        plan, skipped = setups(store, settings, names, slots, plan_for)
        result = run_bench(store, plan, skipped, slots, prompt_ids, tokens, repeat, held,
                           progress=lambda name, d, t: bar.update(task, completed=d, total=t, policy=name))
        if simulate:
            from adapmoe_cli.simulate.check import simulate_bench

            result["simulated"] = simulate_bench(store, plan, prompt_ids, tokens, result,
                                                 progress=lambda m: bar.update(task, policy=m[:14]))
        return result


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
