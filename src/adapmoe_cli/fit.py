"""`fit()`: the library function behind `adapmoe fit` — will a model run here, and how fast — from its
config alone, before any weight is downloaded: disk and memory at each expert budget, whether each fits
in the memory available, and the simulator's decode tok/s on a hardware description (this machine when
calibrated), with the routing it assumed stated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapmoe_cli import budget as budgets
from adapmoe_cli.simulate.hardware import Hardware
from adapmoe_cli.simulate.model_spec import ModelSpec
from adapmoe_cli.simulate.shipped import shipped_trace
from adapmoe_cli.simulate.simulator import SimRequest, simulate
from adapmoe_cli.simulate.traces import project, read_h39s, uniform_trace

#: what the runtime holds besides dense weights and expert slots (Python, torch, transformers, buffers);
#: the README's measured peak RSS stays within dense + cache + this
RUNTIME_OVERHEAD = 300 << 20
MIXTRAL_TRACE = "mixtral-8x7b-instruct-h39s"


def _trace(model: ModelSpec) -> Any:
    if model.num_experts == 8 and model.top_k == 2:  # the recorded Mixtral routing fits this model's shape
        st = read_h39s(shipped_trace(MIXTRAL_TRACE), num_layers=32)
        return project(st, model.num_layers, model.num_experts, model.name), (
            "the recorded Mixtral-8x7B-Instruct routing (shipped trace), tiled onto the model's layers")
    return uniform_trace(model.num_layers, model.num_experts, model.top_k), (
        "uniform random top-k routing: a pessimistic bound, real routing reuses experts across tokens")


def fit(model: ModelSpec, hw: Hardware, available: int | None = None,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Rows per budget (the sweep's shares of all experts): expert and total memory, whether it fits in
    `available` bytes (default: this machine's available memory), and simulated decode tok/s (LRU, even
    split; and with every expert resident). `progress(what)`: each simulated run as it starts."""
    shape = model.cache_shape
    available = budgets._available() if available is None else available
    st, routing = _trace(model)
    half = shape.total_experts // 2 or len(shape.layers)
    # the limits once (the I/O floor is Belady's), then only LRU across the budgets: what the table shows
    # (LRU at half the experts is a point of the sweep: run once)
    sim = simulate(st, hw, model, SimRequest(budget_slots=half, policies=["resident", "belady"]), progress)
    sim["sweep"] = simulate(st, hw, model, SimRequest(budget_slots=half, policies=["lru"], sweep=True),
                            progress)["sweep"]
    disk = shape.total_experts * shape.slot_bytes + shape.dense_bytes
    # the `auto` budget here: as many experts as fit in the memory available (budget.py's rule)
    auto = min(shape.total_experts, max(0, int(budgets.RESIDENT_SHARE * available) - shape.dense_bytes
                                        - RUNTIME_OVERHEAD) // shape.slot_bytes)
    points = list(sim["sweep"])
    if len(shape.layers) <= auto and auto not in {p["budget_slots"] for p in points}:
        at_auto = simulate(st, hw, model, SimRequest(budget_slots=auto, policies=["lru"]), progress)
        points.append({"budget_slots": auto, "fraction": auto / shape.total_experts,
                       "policies": {"lru": at_auto["policies"]["lru"]["decode_tokens_per_s"]}})
    rows = []
    for point in sorted(points, key=lambda p: p["budget_slots"]):
        slots = point["budget_slots"]
        memory = slots * shape.slot_bytes + shape.dense_bytes + RUNTIME_OVERHEAD
        rows.append({"budget_slots": slots, "fraction": point["fraction"], "expert_bytes": slots * shape.slot_bytes,
                     "memory_bytes": memory, "fits": memory <= available, "auto": slots == auto,
                     "decode_tokens_per_s": point["policies"]["lru"]})
    return {
        "model": model.public(), "hardware": hw.name, "hardware_calibrated": hw.calibrated,
        "disk_bytes": disk, "dense_bytes": shape.dense_bytes, "expert_slot_bytes": shape.slot_bytes,
        "min_memory_bytes": len(shape.layers) * shape.slot_bytes + shape.dense_bytes + RUNTIME_OVERHEAD,
        "available_bytes": available, "runtime_overhead_bytes": RUNTIME_OVERHEAD, "routing": routing,
        "resident_decode_tokens_per_s": sim["policies"]["resident"]["decode_tokens_per_s"],
        "io_floor_tokens_per_s": sim["limits"]["io_floor_tokens_per_s"], "budgets": rows,
        "notes": [n for n in sim["notes"] if "prefetch" not in n],
    }
