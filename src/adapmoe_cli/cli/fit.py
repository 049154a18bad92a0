"""`adapmoe fit [MODEL] [--hardware NAME]`: disk, memory and predicted speed per expert budget, from the
model's config alone (a hub id's config.json is the only file fetched)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from adapmoe_cli.cli.common import JsonFlag, bits_in_range, console, emit, err_console
from adapmoe_cli.errors import UsageError
from adapmoe_cli.safe_io import MAX_DOC_BYTES, MAX_MANIFEST_BYTES, parse_json, read_capped
from adapmoe_cli.units import format_bytes


def register(app: typer.Typer) -> None:
    app.command("fit", help="Will a model run here, and how fast? From its config, before downloading it.")(fit_cmd)


def _config(model: str | None) -> tuple[dict[str, Any], str]:
    """MODEL → (config, name) without reading any weight."""
    from adapmoe_cli.catalog import EMBEDDED, EMBEDDED_MODELS
    from adapmoe_cli.hub import download_config, looks_like_repo_id
    from adapmoe_cli.model_arg import default_model_dir
    from adapmoe_cli.paths import MANIFEST, is_store

    if model is None or (model in EMBEDDED_MODELS and not Path(model).exists()):
        name = model or EMBEDDED
        return _json_object(default_model_dir(name) / "config.json"), name
    path = Path(model).expanduser()
    if is_store(path):
        config = _json_object(path / MANIFEST, MAX_MANIFEST_BYTES).get("config")
        if not isinstance(config, dict):
            raise UsageError(f"{path / MANIFEST} holds no model config; re-shard the store")
        return config, path.name
    if (path / "config.json").is_file():
        return _json_object(path / "config.json"), path.name
    if path.is_file():
        raise UsageError(f"{model} is a file: give a store, a checkpoint folder, a hub id, a shipped model name "
                         "or a model YAML (*.yaml)")
    if path.exists():
        raise UsageError(f"{model} holds no config.json")
    if looks_like_repo_id(model):
        return download_config(model), model
    raise UsageError(f"{model!r} is not a store, a checkpoint folder, a hub id (ORG/NAME) or a shipped model "
                     "config (configs/models)")


def _json_object(path: Path, limit: int = MAX_DOC_BYTES) -> dict[str, Any]:
    """A JSON object from a file of the user's: size and nesting capped, anything else one line."""
    doc = parse_json(read_capped(path, limit, str(path), UsageError, follow=True), str(path), UsageError)
    if not isinstance(doc, dict):
        raise UsageError(f"{path} is not a JSON object")
    return doc


def fit_cmd(
    model: Annotated[str | None, typer.Argument(
        help="Store folder, checkpoint folder, hub id, a shipped model config (configs/models) or a YAML file in "
             "that format (default: the embedded model).", show_default=False)] = None,
    hardware: Annotated[str, typer.Option("--hardware", help="A name from configs/hardware or a YAML file; "
                                          "this-machine is what `adapmoe simulate --calibrate` measured.")
                        ] = "this-machine",
    bits: Annotated[float | None, typer.Option("--bits", callback=bits_in_range, show_default="the checkpoint's dtype",
                                               help="Project the experts quantised to this many bits.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Examples:

      adapmoe fit mistralai/Mixtral-8x7B-Instruct-v0.1

      adapmoe fit Qwen/Qwen3-30B-A3B --bits 4 --hardware rtx4090-pcie4

      adapmoe fit deepseek-v3    (a shipped model config, configs/models; no network)
    """
    from adapmoe_cli.simulate.hardware import load_hardware

    hw = load_hardware(hardware)  # (before the imports below: an unknown name is said at once)
    from adapmoe_cli.fit import fit
    from adapmoe_cli.simulate.model_spec import from_hf_config, known, load_model

    if (model in known() and not Path(model).expanduser().exists()) or (
            model is not None and Path(model).suffix in (".yaml", ".yml")):
        spec = load_model(model, bits)  # a shipped model config, or one of the user's in that format
    else:
        cfg, name = _config(model)
        spec = from_hf_config(cfg, name, bits)
    name = escape(spec.name)
    with err_console.status(f"simulating {name}") as status:
        result = fit(spec, hw, progress=lambda what: status.update(f"simulating {name}: {what}"))
    emit(result, as_json, render)


def render(r: dict[str, Any]) -> None:
    m = r["model"]
    hw = r["hardware"] + ("" if r["hardware_calibrated"] is not False else " (uncalibrated template: run "
                          "`adapmoe simulate --calibrate`)")
    console.print(f"[bold]{escape(m['name'])}[/]: {m['num_layers']} MoE layers × {m['num_experts']} experts "
                  f"(top-{m['top_k']}) of {format_bytes(r['expert_slot_bytes'])}; dense weights "
                  f"{format_bytes(r['dense_bytes'])}; on disk ≈ {format_bytes(r['disk_bytes'])}")
    t = Table(title=f"per expert budget · {escape(hw)} · {format_bytes(r['available_bytes'])} available here")
    for c in ("experts cached", "share", "expert memory", "total memory", "fits here", "decode tok/s (simulated)"):
        t.add_column(c, justify="right")
    for row in r["budgets"]:
        t.add_row(f"{row['budget_slots']}" + (" (auto)" if row["auto"] else ""), f"{row['fraction']:.0%}",
                  format_bytes(row["expert_bytes"]), format_bytes(row["memory_bytes"]),
                  "yes" if row["fits"] else "[red]no[/]", f"{row['decode_tokens_per_s']:.2f}")
    console.print(t)
    console.print(f"needs at least {format_bytes(r['min_memory_bytes'])} (one expert per layer, dense weights and "
                  f"{format_bytes(r['runtime_overhead_bytes'])} for the runtime); every expert resident: "
                  f"{r['resident_decode_tokens_per_s']:.2f} tok/s simulated")
    console.print(f"[dim]routing assumed: {escape(r['routing'])}; LRU, even split, no prefetch[/]", soft_wrap=True)
