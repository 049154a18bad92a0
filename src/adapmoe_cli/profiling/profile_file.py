"""The profile on disk (format version 1): `profile.json` (statistics, human-readable) and, beside it,
`profile.trace.safetensors` (the routing trace) and `profile.experts.safetensors` (each expert's mean output
and spread, expert_stats.py; optional: profiles made before the compensating gate rules lack it). All are written to
temporary names and renamed, the JSON last, so an interrupted run never replaces a complete profile. The
schema is in docs/profile.md."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapmoe_cli import __version__
from adapmoe_cli.errors import ProfileError
from adapmoe_cli.profiling import expert_stats
from adapmoe_cli.profiling.trace import Trace
from adapmoe_cli.runtime.gating import ExpertStats
from adapmoe_cli.safe_io import read_capped, relative_name, write_atomic
from adapmoe_cli.store import Store
from adapmoe_cli.versioned import integer, number, read_versioned

METHODS = ("gradient", "forward")
#: per-layer numbers the gate rules and reports read: required, and optional (gradient profiles only)
LAYER_NUMBERS = ("sensitivity", "predicted_drop_loss", "mean_second_weight_sq")
GRADIENT_NUMBERS = ("second_order_drop_loss", "first_order_drop_loss")
MAX_TRACE_BYTES = 4 << 30

FORMAT = "adapmoe-profile"
FORMAT_VERSION = 1
DEFAULT_NAME = "profile.json"


def default_path(store: Store) -> Path:
    return store.path / DEFAULT_NAME


def trace_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + ".trace.safetensors")


def model_identity(store: Store) -> dict[str, Any]:
    s = store.shape
    return {"model_type": store.family.model_type, "fingerprint": store.fingerprint,
            "num_moe_layers": len(s.moe_layers), "num_experts": s.num_experts, "top_k": s.top_k}


def experts_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + ".experts.safetensors")


def write_profile(path: Path, data: dict[str, Any], trace: Trace, experts: ExpertStats | None = None) -> Path:
    """The trace (and the expert statistics), then the JSON that names them (with their sha256), each
    replaced atomically."""
    from safetensors.torch import save

    path = Path(path)
    tpath = trace_path(path)
    blob = save(trace.tensors(), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"adapmoe {__version__}",
           **data, "trace": {"file": tpath.name, "sha256": hashlib.sha256(blob).hexdigest(),
                             "tokens": trace.num_tokens}}
    write_atomic(tpath, blob)
    if experts is not None:
        epath = experts_path(path)
        doc["experts"] = {"file": epath.name, "sha256": expert_stats.write(epath, experts)}
    write_atomic(path, json.dumps(doc, indent=1))
    return path


@dataclass
class Profile:
    path: Path
    data: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.data["layers"]

    @property
    def has_expert_stats(self) -> bool:
        return isinstance(self.data.get("experts"), dict)

    def expert_stats_for(self, rule: str, top_k: int) -> ExpertStats | None:
        """The statistics when `rule` (resolved as `auto` would) compensates and the profile has them."""
        from adapmoe_cli.planning import gate_rules

        resolved = gate_rules.resolve_rule(rule, self.layers, top_k, self.has_expert_stats)
        return self.expert_stats() if gate_rules.compensates(resolved) and self.has_expert_stats else None

    def expert_stats(self) -> ExpertStats:
        """Each expert's mean output and spread, from the file the profile names (checked as `trace` is);
        ProfileError when the profile has none (made before the compensating rules)."""
        entry = self.data.get("experts")
        if not isinstance(entry, dict):
            raise ProfileError(f"the profile {self.path} has no expert statistics (it predates them); "
                               "re-run `adapmoe profile`")
        model = self.data["model"]
        return expert_stats.read(self.path.with_name(entry["file"]), entry["sha256"],
                                 [int(x["layer"]) for x in self.layers], model["num_experts"])

    def trace(self) -> Trace:
        """The routing trace beside the profile: read once, checked against the recorded sha256, its
        arrays checked against the profile's layers and the model's experts."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        tpath = self.path.with_name(self.data["trace"]["file"])
        if not tpath.exists():
            raise ProfileError(f"the trace {tpath} of profile {self.path} is missing; re-run `adapmoe profile`")
        blob = read_capped(tpath, MAX_TRACE_BYTES, str(tpath), ProfileError, follow=True)
        if hashlib.sha256(blob).hexdigest() != self.data["trace"]["sha256"]:
            raise ProfileError(f"the trace {tpath} does not match {self.path}; re-run `adapmoe profile`")
        try:
            trace = Trace.from_tensors(load(bytes(blob)))
        except (SafetensorError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ProfileError(f"the trace {tpath} is not an adapmoe routing trace ({e}); re-run `adapmoe profile`"
                               ) from None
        model = self.data["model"]
        check_trace(trace, tpath, [int(x["layer"]) for x in self.layers], model["top_k"], model["num_experts"])
        return trace


def check_trace(trace: Trace, where: Path, layers: list[int] | None = None, top_k: int | None = None,
                experts: int | None = None) -> None:
    """Shapes, dtypes and ranges of a trace's arrays (against the layers, top-k and expert count when
    known), so replay, statistics and the simulator can index with them. ProfileError otherwise."""
    def bad(why: str) -> ProfileError:
        return ProfileError(f"the trace {where} {why}; re-run `adapmoe profile`")

    if trace.ids.dim() != 3:
        raise bad(f"has ids of shape {list(trace.ids.shape)}, not [tokens, layers, k]")
    n, num_layers, k = trace.ids.shape
    want = (n, len(layers) if layers is not None else num_layers, top_k if top_k is not None else k)
    for name in ("ids", "weights", "pred_ids", "pred_weights"):
        t = getattr(trace, name)
        if tuple(t.shape) != want:
            raise bad(f"has {name} of shape {list(t.shape)}, expected {list(want)}")
    if trace.ids.is_floating_point() or trace.pred_ids.is_floating_point() or trace.ids.dtype == torch.bool:
        raise bad("has ids that are not integers")
    if not (trace.weights.is_floating_point() and trace.pred_weights.is_floating_point()):
        raise bad("has weights that are not floating point")
    if (layers is not None and trace.layers != layers) or len(trace.layers) != num_layers \
            or tuple(trace.tokens.shape) != (n,):
        raise bad("does not match its profile's layers and tokens")
    if len(set(trace.layers)) != len(trace.layers) or any(layer < 0 for layer in trace.layers):
        raise bad(f"names its layers {trace.layers[:8]}{'…' if len(trace.layers) > 8 else ''}, not distinct layer "
                  "numbers")
    for name in ("ids", "pred_ids"):
        t = getattr(trace, name)
        if t.numel() and (int(t.min()) < -1 or (experts is not None and int(t.max()) >= experts)):
            raise bad(f"holds {name} outside -1 … {experts - 1 if experts is not None else '…'}")
    for name in ("weights", "pred_weights"):
        t = getattr(trace, name)
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise bad(f"holds {name} that are NaN or infinite")


def read_profile(path: Path, store: Store | None = None) -> Profile:
    """Load a profile; refuse one of another format version or (when `store` is given) another model."""
    path = Path(path)
    data = read_versioned(path, FORMAT, FORMAT_VERSION, ProfileError, "profile", "adapmoe profile")
    return parse_profile(data, path, store)


def parse_profile(data: dict[str, Any], path: Path, store: Store | None = None) -> Profile:
    """Check a profile's content: the model it names (and, with `store`, that it is this one); per-layer
    numbers finite; layers the model's MoE layers, each once, in order; the trace entry a plain file name
    beside the profile with a sha256. Everything wrong is a ProfileError naming the field."""
    model = data.get("model")
    if not isinstance(model, dict):
        raise ProfileError(f"{path}: model must be an object")
    if store is not None and model.get("fingerprint") != store.fingerprint:
        raise ProfileError(
            f"{path} was made for another model ({model.get('model_type')}, different weights); "
            f"run `adapmoe profile` on {store.path}"
        )
    experts = integer(model.get("num_experts"), f"{path}: model.num_experts", ProfileError, 1, 1 << 12)
    integer(model.get("top_k"), f"{path}: model.top_k", ProfileError, 1, experts)
    if store is not None and (experts, model["top_k"]) != (store.shape.num_experts, store.shape.top_k):
        raise ProfileError(f"{path}: num_experts/top_k differ from the store's; run `adapmoe profile` on {store.path}")
    if data.get("method") not in METHODS:
        raise ProfileError(f"{path}: method must be one of {', '.join(METHODS)}, got {data.get('method')!r}")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, dict) for x in layers):
        raise ProfileError(f"{path}: layers must be a non-empty list of objects")
    gradient = GRADIENT_NUMBERS[0] in layers[0]
    for x in layers:
        layer = integer(x.get("layer"), f"{path}: a layer number", ProfileError, 0)
        for key in LAYER_NUMBERS + (GRADIENT_NUMBERS if gradient else ()):
            number(x.get(key), f"{path}: layer {layer} {key}", ProfileError)
        if (GRADIENT_NUMBERS[0] in x) != gradient:
            raise ProfileError(f"{path}: some layers have {GRADIENT_NUMBERS[0]} and some do not")
        number(x["mean_second_weight_sq"], f"{path}: layer {layer} mean_second_weight_sq", ProfileError, 0.0)
    numbers = [x["layer"] for x in layers]
    if len(set(numbers)) != len(numbers) or numbers != sorted(numbers):
        raise ProfileError(f"{path}: layers must be listed once each, in order")
    if store is not None and numbers != list(store.shape.moe_layers):
        raise ProfileError(f"{path} does not list this model's MoE layers; run `adapmoe profile` on {store.path}")
    trace = data.get("trace")
    if not isinstance(trace, dict) or not isinstance(trace.get("sha256"), str):
        raise ProfileError(f"{path}: trace must name a file and its sha256")
    name = relative_name(trace.get("file"), f"{path}: trace.file", ProfileError)
    if "/" in name:
        raise ProfileError(f"{path}: trace.file must be a file beside the profile, got {name!r}")
    integer(trace.get("tokens"), f"{path}: trace.tokens", ProfileError, 0)
    experts = data.get("experts")
    if experts is not None:
        if not isinstance(experts, dict) or not isinstance(experts.get("sha256"), str):
            raise ProfileError(f"{path}: experts must name a file and its sha256")
        name = relative_name(experts.get("file"), f"{path}: experts.file", ProfileError)
        if "/" in name:
            raise ProfileError(f"{path}: experts.file must be a file beside the profile, got {name!r}")
    return Profile(path, data)
