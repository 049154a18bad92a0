"""Turns the user's TRACE_OR_MODEL and flags into what `simulate()` takes: the trace (projected onto the
target model), the target model in bytes, and adapmoe's gate, with notes saying where each came from.
Reads files (h39s text, a trace file, a profile, a store, a plan); decides nothing about timing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapmoe_cli.errors import ProfileError, UsageError
from adapmoe_cli.planning import gate_rules
from adapmoe_cli.profiling.profile_file import Profile
from adapmoe_cli.profiling.trace import Trace
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.simulate.model_spec import ModelSpec, from_store, load_model
from adapmoe_cli.simulate.shipped import shipped_trace
from adapmoe_cli.simulate.traces import FORMATS, SimTrace, from_trace, h39s_calls, prefill_lines, project, read_h39s
from adapmoe_cli.store import Store, is_store

H39S_DEFAULT_MODEL = "mixtral-8x7b"  # the h39s/mlsys trace was recorded on Mixtral-8x7B-Instruct


@dataclass(frozen=True)
class Sources:
    trace: SimTrace
    model: ModelSpec
    gate: GatePolicy
    store: Store | None
    notes: tuple[str, ...]


def _gate(store: Store | None, profile: Profile | None, plan: Path | None, gate_scale: float | None,
          rule: str, notes: list[str], top_k: int) -> GatePolicy:
    from adapmoe_cli.planning.plan_file import default_path, read_plan

    if gate_scale is not None:
        if profile is None:
            raise UsageError("--gate-scale needs a profile (give a store or its profile.json)")
        return gate_rules.gate(rule, gate_scale, profile.layers, top_k, profile.expert_stats_for(rule, top_k))
    if plan is not None:
        if store is None:
            raise UsageError("--plan needs the store it was made for as TRACE_OR_MODEL")
        return read_plan(plan, store).gate
    if store is not None and default_path(store).exists():
        try:
            g = read_plan(default_path(store), store).gate
            notes.append(f"adapmoe: gate from {default_path(store)} (rule {g.rule}, scale {g.scale})")
            return g
        except ProfileError as e:
            notes.append(f"adapmoe: not using the store's plan ({e})")
    return GatePolicy.off()


def resolve(target: str | None, trace_format: str = "adapmoe", model_config: str | None = None,
            bits: float | None = None, plan: Path | None = None, gate_scale: float | None = None,
            rule: str = "paper") -> Sources:
    shipped = shipped_trace(target) if target is not None else None
    if shipped is not None:  # a trace that ships with adapmoe, by name
        target, trace_format = str(shipped), "h39s"
    if trace_format not in FORMATS:
        raise UsageError(f"unknown trace format {trace_format!r}: choose one of {', '.join(FORMATS)}")
    if bits is not None and model_config is None and trace_format != "h39s":
        raise UsageError("--bits projects onto a published model: give --model-config too")
    notes: list[str] = []
    store: Store | None = None
    if trace_format == "h39s":
        if target is None:
            raise UsageError("--trace-format h39s needs the trace file as TRACE_OR_MODEL")
        path = Path(target).expanduser()
        if not path.is_file():
            raise UsageError(f"no h39s trace at {path}")
        if model_config is None:
            notes.append(f"h39s trace: assuming it was recorded on {H39S_DEFAULT_MODEL} (override with --model-config)")
        model = load_model(model_config or H39S_DEFAULT_MODEL, bits)
        calls = h39s_calls(path)
        st = read_h39s(path, num_layers=prefill_lines(calls) or model.num_layers, calls=calls)
        gate = GatePolicy.off()
    else:
        st, store, profile = _adapmoe_trace(target)
        model = load_model(model_config, bits) if model_config else None
        if model is None:
            if store is None:
                raise UsageError("a bare trace file does not say its model: give --model-config")
            model = from_store(store)
        gate = _gate(store, profile, plan, gate_scale, rule, notes, int(st.trace.ids.shape[-1]))
    width = int(st.trace.ids.shape[-1])
    if width > model.top_k:
        why = ("a prefill pass alone, or a trace of another model" if trace_format == "h39s"
               else "a trace of another model")
        raise UsageError(f"{st.source}: a layer call of the trace names {width} experts, more than {model.name}'s "
                         f"top-k ({model.top_k}): {why}? (--model-config)")
    st = project(st, model.num_layers, model.num_experts, model.name)
    return Sources(st, model, gate, store, tuple(notes))


def _adapmoe_trace(target: str | None) -> tuple[SimTrace, Store | None, Profile | None]:
    """A `*.trace.safetensors` file, a `profile.json`, or a MODEL (store, checkpoint, hub id; none: the
    embedded model) with a profile."""
    from adapmoe_cli.profiling.profile_file import default_path, read_profile

    path = Path(target or "").expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from adapmoe_cli.profiling.profile_file import check_trace

        try:
            trace = Trace.from_tensors(load_file(str(path)))
        except (KeyError, OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
            raise UsageError(f"{path} is not an adapmoe routing trace ({e})") from None
        store = Store.open(path.parent) if is_store(path.parent) else None
        check_trace(trace, path, experts=store.shape.num_experts if store else 1 << 12)
        if trace.num_tokens == 0 or not bool((trace.ids >= 0).any()):
            raise UsageError(f"{path} holds no tokens" if trace.num_tokens == 0 else f"{path} holds no expert ids")
        n = store.shape.num_experts if store else int(trace.ids.max()) + 1
        return from_trace(trace, n, str(path)), store, None
    if path.is_file() and path.suffix == ".json":
        store = Store.open(path.parent) if is_store(path.parent) else None
        prof = read_profile(path, store)
        n = store.shape.num_experts if store else int(prof.data["model"]["num_experts"])
        return from_trace(prof.trace(), n, str(path)), store, prof
    if path.is_file():
        raise UsageError(f"{path} is neither a *.trace.safetensors nor a profile.json: for an h39s text file add "
                         "--trace-format h39s")
    from adapmoe_cli.model_arg import open_model

    store = open_model(target)
    pp = default_path(store)
    if not pp.exists():
        raise ProfileError(f"{store.path} has no routing trace yet: run `adapmoe profile {target or ''}` first")
    prof = read_profile(pp, store)
    return from_trace(prof.trace(), store.shape.num_experts, str(pp)), store, prof
