"""`adapmoe simulate TRACE_OR_MODEL --hardware NAME|FILE --budget (N | SIZE)`: replay a routing trace
through the runtime's policies on simulated hardware, with the limits (Belady, oracle prefetch, I/O
floor) beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from adapmoe_cli.budget import BudgetRequest, total_slots
from adapmoe_cli.cli.common import (
    BudgetOpt,
    ConfigOpt,
    JsonFlag,
    OutOpt,
    PlotOpt,
    bits_in_range,
    console,
    emit,
    err_console,
    not_an_input,
    scale_in_range,
)
from adapmoe_cli.policies import LIMITS, POLICIES, SIMULATE_DEFAULT, parse_policies
from adapmoe_cli.simulate.model_spec import known as known_models
from adapmoe_cli.simulate.shipped import SHIPPED
from adapmoe_cli.units import format_bytes

MODEL_CONFIGS = known_models()


def register(app: typer.Typer) -> None:
    app.command("simulate", help="Replay a routing trace on simulated hardware, with the limits drawn in.")(
        simulate_cmd)


def simulate_cmd(
    target: Annotated[str | None, typer.Argument(
        metavar="[TRACE_OR_MODEL]", show_default=False,
        help="A store / checkpoint / hub id with a profile (default: the embedded model), a profile.json, a "
        f"*.trace.safetensors, an h39s text file, or a trace shipped with adapmoe ({', '.join(SHIPPED)}).")] = None,
    hardware: Annotated[str, typer.Option("--hardware", help="A name from configs/hardware (this-machine, "
                                          "laptop-nvme, rtx4090-pcie4, a6000-pcie4, apple-m2-max) or a YAML file."
                                          )] = "this-machine",
    budget: BudgetOpt = None,
    model_config: Annotated[str | None, typer.Option("--model-config", help="Project onto a published model "
                                                     f"({', '.join(MODEL_CONFIGS)}) or a YAML file.",
                                                     show_default=False)] = None,
    bits: Annotated[float | None, typer.Option("--bits", callback=bits_in_range, show_default=False,
                                               help="Expert quantisation of the --model-config (2, 4, 16).")] = None,
    policies: Annotated[str, typer.Option("--policies", help="Comma-separated, from: "
                                          f"{', '.join(n for n, p in POLICIES.items() if not p.fallback)} "
                                          f"({' and '.join(LIMITS)} are always added); ROW:EVICTION runs a row "
                                          "with another eviction policy (adapmoe:markov).")
                        ] = ",".join(SIMULATE_DEFAULT),
    holdout: Annotated[float, typer.Option("--holdout", help="Measure on the last share of the trace's steps; the "
                                           "DP plans and the markov/learned eviction are fitted on the rest.")
                       ] = 0.0,
    as_json: JsonFlag = False,
    out: OutOpt = None,
    plot: PlotOpt = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Also simulate budgets from 10% to 100% of the experts.")
                     ] = False,
    trace_format: Annotated[str, typer.Option("--trace-format", help="adapmoe | h39s.")] = "adapmoe",
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Measure this machine on the given store first "
                                            "(writes this-machine under ADAPMOE_HOME).")] = False,
    plan: Annotated[Path | None, typer.Option("--plan", help="Plan file whose adaptive gate adapmoe uses.",
                                              show_default=False)] = None,
    gate_scale: Annotated[float | None, typer.Option("--gate-scale", callback=scale_in_range, show_default=False,
                                                     help="adapmoe's gate scale c, thresholds from the profile.")
                          ] = None,
    rule: Annotated[str, typer.Option("--rule", help="Threshold rule for --gate-scale.")] = "paper",
    config: ConfigOpt = None,
) -> None:
    """Examples:

      adapmoe simulate mixtral-8x7b-instruct-h39s --bits 4 --hardware rtx4090-pcie4 --budget 64 --plot mixtral.png

      adapmoe simulate ./my-store --calibrate --budget 12 --json sim.json
    """
    from adapmoe_cli.simulate.hardware import load_hardware

    # a misspelt policy or hardware is said before the imports below (calibrating writes this machine's first)
    names = parse_policies(policies, limits=True)
    not_an_input({"--out": out, "--plot": plot}, [target, model_config, hardware, plan, config])
    hw = None if calibrate else load_hardware(hardware)
    from adapmoe_cli.simulate.inputs import resolve
    from adapmoe_cli.simulate.simulator import SimRequest, simulate

    if calibrate:
        _calibrate(target, trace_format, config)
        if not _has_trace(target, trace_format):
            console.print("calibration written; no profile in the store yet, so nothing to simulate "
                          f"(run `adapmoe profile {target}` first)")
            return
    src = resolve(target, trace_format, model_config, bits, plan, gate_scale, rule)
    if hw is None:  # (calibrated above)
        hw = load_hardware(hardware)
    request = BudgetRequest.parse(budget, "--budget") if budget else BudgetRequest(fraction=0.5, flag="--budget")
    slots, _ = total_slots(request, src.model.cache_shape)
    req = SimRequest(budget_slots=slots, policies=names, gate=src.gate, sweep=sweep, holdout=holdout)
    with err_console.status("simulating") as status:
        result = simulate(src.trace, hw, src.model, req, progress=lambda n: status.update(f"simulating {n}"))
    result["notes"] = [*src.notes, *result["notes"]]
    if hw.calibrated is False:
        result["notes"].append("hardware this-machine is the uncalibrated template: run with --calibrate on a store")
    emit(result, as_json, render, out, plot, draw)


def _calibrate(target: str | None, trace_format: str, config: Path | None) -> None:
    from adapmoe_cli.cli.common import open_store, runtime_settings
    from adapmoe_cli.simulate.calibrate import calibrate as run_calibration

    if trace_format != "adapmoe" or (target is not None and Path(target).is_file()):
        raise typer.BadParameter("--calibrate times the engine on a store: give a MODEL (store, checkpoint or hub id)",
                                 param_hint="--calibrate")
    store = open_store(target)
    with err_console.status("calibrating") as status:
        hw, path = run_calibration(store, runtime_settings(config),
                                   progress=lambda m: status.update(f"calibrating: {m}"))
    m = hw.measured
    err_console.print(f"wrote {path}: disk {m['disk_bytes_per_s'] / 1e9:.2f} GB/s, one load {m['load_s'] * 1e3:.2f} ms "
                      f"(+{hw.link_wakeup_s * 1e6:.0f} us after idle) + {hw.load_overhead_s * 1e6:.0f} us of compute, "
                      f"a read beside the compute {hw.interference_s * 1e6:.0f} us, memory "
                      f"{hw.memory_bandwidth / 1e9:.1f} GB/s")


def _has_trace(target: str | None, trace_format: str) -> bool:
    from adapmoe_cli.model_arg import open_model
    from adapmoe_cli.profiling.profile_file import default_path

    if trace_format != "adapmoe" or (target is not None and Path(target).is_file()):
        return True
    return default_path(open_model(target)).exists()


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def render(r: dict[str, Any]) -> None:
    m, hw = r["model"], r["hardware"]
    t = Table(title=f"adapmoe simulate · {m['name']} on {hw['name']} · {r['budget_slots']}/{r['total_experts']} "
                    f"expert slots ({format_bytes(r['budget_slots'] * m['slot_bytes'])}) · "
                    f"{r['trace']['decode_tokens']} decode tokens")
    for c in ("policy", "decode tok/s", "stall ms/tok", "hit rate", "hits", "prefetch hits", "misses",
              "experts/tok", "read/tok"):
        t.add_column(c, justify="left" if c == "policy" else "right")
    for name, p in r["policies"].items():
        label = f"[italic]{name} (limit)[/]" if name in ("belady", "oracle") else name
        t.add_row(label, f"{p['decode_tokens_per_s']:.2f}", f"{p['stall_s_per_token'] * 1e3:.1f}",
                  f"{p['hit_rate']:.1%}", str(p["hits"]), str(p["prefetch_hits"]), str(p["misses"]),
                  f"{p['experts_per_token']:.2f}", format_bytes(p["bytes_read_per_token"]))
    console.print(t)
    lim = r["limits"]
    console.print(f"limits: I/O floor {_f(lim['io_floor_tokens_per_s'], '.2f')} tok/s (bytes Belady must read / "
                  f"{hw['link_bandwidth'] / 1e9:.1f} GB/s), compute floor "
                  f"{lim['compute_floor_tokens_per_s']:.1f} tok/s (every expert resident)")
    c = r["compute"]
    console.print(f"per token: expert {c['expert_s'] * 1e3:.3f} ms, dense/layer {c['dense_layer_s'] * 1e3:.3f} ms, "
                  f"transfer of one expert {c['transfer_s'] * 1e3:.2f} ms")
    for point in r.get("sweep", []):
        row = ", ".join(f"{n} {v:.2f}" for n, v in point["policies"].items())
        console.print(f"sweep {point['budget_slots']:>5} slots ({point['fraction']:.0%}): {row}")
    for note in r.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)


def draw(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol, lim = r["policies"], r["limits"]
    names = list(pol)
    wide = "sweep" in r
    fig, axes = plt.subplots(1, 2 if wide else 1, figsize=(13 if wide else 7.5, 4.5), squeeze=False)
    ax = axes[0][0]
    vals = [pol[n]["decode_tokens_per_s"] for n in names]
    colors = ["#999999" if n in ("belady", "oracle") else "#4c72b0" for n in names]
    ax.bar(names, vals, color=colors)
    if lim["io_floor_tokens_per_s"]:
        ax.axhline(lim["io_floor_tokens_per_s"], color="#c44e52", ls="--",
                   label="I/O limit: bytes Belady must read / link")
    ax.axhline(lim["compute_floor_tokens_per_s"], color="#55a868", ls=":", label="compute limit: every expert resident")
    ax.set_yscale("log")
    ax.set_ylabel("simulated decode tokens/s")
    ax.set_title(f"{r['model']['name']} · {r['hardware']['name']} · {r['budget_slots']}/{r['total_experts']} slots",
                 fontsize=9)
    ax.tick_params(axis="x", rotation=25)
    ax.legend(fontsize=8)
    if wide:
        ax2 = axes[0][1]
        pts = r["sweep"]
        for name in pts[0]["policies"]:
            ax2.plot([p["fraction"] for p in pts], [p["policies"][name] for p in pts], marker="o", label=name,
                     ls="--" if name in ("belady", "oracle") else "-")
        ax2.axhline(lim["compute_floor_tokens_per_s"], color="#55a868", ls=":", label="compute limit")
        ax2.set_xlabel("cache budget (share of all experts)")
        ax2.set_ylabel("simulated decode tokens/s")
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
        ax2.set_title("budget sweep", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
