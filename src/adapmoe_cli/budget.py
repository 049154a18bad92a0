"""The expert-cache budget, from the user's words to the slots each MoE layer gets, in one place.

`--cache-experts 32`, `--memory 6GiB`, `--budget 24GiB` and the settings' default share (`cache.budget:
50%`) all become one `BudgetRequest`; `resolve` turns it into a `Budget` (slots per layer, and the
bytes they hold) against a `CacheShape` — a store's or a simulated model's — checking the range once.
The runtime, the planner, the bench and the simulator take that `Budget` and compute nothing of their
own. `check_fits` and `fits` are the only memory checks. Knows nothing of tensors, files or policies."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from adapmoe_cli.errors import UsageError
from adapmoe_cli.units import format_bytes, parse_size

#: an optional all-resident run (the profiler's gradient method, the simulator's calibration, the bench's
#: `resident` policy) is made only when every expert and the dense weights fit in this share of the
#: available memory; the runtime itself refuses only what does not fit at all
RESIDENT_SHARE = 0.8
#: budgets swept by `bench --sweep` and `simulate --sweep`, as shares of all experts
SWEEP_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
_SLOTS = re.compile(r"^\s*\d+\s*$")
_SHARE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


@dataclass(frozen=True)
class CacheShape:
    """What a budget is measured against: the MoE layers, experts per layer, top-k, and the bytes of one
    cache slot (what one read moves: `Store.slot_bytes`, `ModelSpec.slot_bytes`)."""

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    slot_bytes: int

    @property
    def total_experts(self) -> int:
        return len(self.layers) * self.num_experts


@dataclass(frozen=True)
class BudgetRequest:
    """What the user asked for: a number of slots, a size for all slots together, or a share of all
    experts (the default). Exactly one is used: slots, else bytes, else the share."""

    slots: int | None = None
    bytes: int | None = None
    fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.slots is not None and self.bytes is not None:
            raise UsageError("give the expert budget once: either a number of slots or a size, not both")
        if self.slots is not None and self.slots < 1:
            raise UsageError(f"the expert budget must be at least 1 slot per MoE layer, got {self.slots}")
        if not 0 < self.fraction <= 1:
            raise UsageError(f"a budget share must be above 0% and at most 100%, got {self.fraction:.0%}")

    @staticmethod
    def parse(text: str | int) -> BudgetRequest:
        """`32` → 32 slots; `6GiB` → as many slots as fit in 6 GiB; `50%` → half of all experts."""
        t = str(text)
        if _SLOTS.match(t):
            return BudgetRequest(slots=int(t))
        share = _SHARE.match(t)
        if share:
            return BudgetRequest(fraction=float(share.group(1)) / 100)
        if not any(c.isalpha() for c in t):
            raise UsageError(f"cannot read the budget {t!r}: give expert slots (32), a size (6GiB) or a share of "
                             "all experts (50%)")
        return BudgetRequest(bytes=parse_size(t))

    @staticmethod
    def of_size(text: str) -> BudgetRequest:
        """`--memory SIZE`: a size only (a bare number is bytes, as in `parse_size`)."""
        return BudgetRequest(bytes=parse_size(text))

    @property
    def explicit(self) -> bool:
        """True when the user named slots or a size (not the default share)."""
        return self.slots is not None or self.bytes is not None


@dataclass(frozen=True)
class Budget:
    """Expert slots per MoE layer, each `slot_bytes` big. `source` says how they were chosen."""

    quotas: Mapping[int, int]
    source: str
    slot_bytes: int = 0

    @property
    def total(self) -> int:
        return sum(self.quotas.values())

    @property
    def bytes(self) -> int:
        return self.total * self.slot_bytes


def even_quotas(layers: Collection[int], total_slots: int, num_experts: int) -> dict[int, int]:
    """Split `total_slots` as evenly as possible (earlier layers get the remainder), ≤ num_experts each."""
    layers = sorted(layers)
    base, extra = divmod(total_slots, len(layers))
    return {layer: min(num_experts, base + (1 if i < extra else 0)) for i, layer in enumerate(layers)}


def total_slots(req: BudgetRequest, shape: CacheShape) -> tuple[int, str]:
    """The request in slots, range-checked, and a phrase saying how it was counted."""
    n_layers, size = len(shape.layers), format_bytes(shape.slot_bytes)
    if req.slots is not None:
        total, source = req.slots, f"{req.slots} slots"
    elif req.bytes is not None:
        total = req.bytes // shape.slot_bytes
        source = f"{format_bytes(req.bytes)} = {total} slots of {size}"
    else:
        total = max(n_layers, round(req.fraction * shape.total_experts))
        source = f"{req.fraction:.0%} of the experts"
    check_range(total, shape)
    return total, source


def check_range(total: int, shape: CacheShape) -> None:
    n_layers, size = len(shape.layers), format_bytes(shape.slot_bytes)
    if total < n_layers:
        raise UsageError(
            f"a budget of {total} expert slots is below one per MoE layer ({n_layers} layers, {size} each); "
            f"give at least {n_layers} slots ({format_bytes(n_layers * shape.slot_bytes)})"
        )
    if total > shape.total_experts:
        raise UsageError(f"a budget of {total} expert slots is larger than the model ({shape.total_experts} "
                         f"experts); give at most {shape.total_experts}")


def resolve(req: BudgetRequest, shape: CacheShape) -> Budget:
    """The request as an even split over the layers."""
    total, source = total_slots(req, shape)
    return even(shape, total, source)


def even(shape: CacheShape, total: int, source: str = "even split") -> Budget:
    check_range(total, shape)
    return Budget(even_quotas(shape.layers, total, shape.num_experts), source, shape.slot_bytes)


def all_experts(shape: CacheShape) -> Budget:
    return Budget({layer: shape.num_experts for layer in shape.layers}, "all experts", shape.slot_bytes)


def per_layer(shape: CacheShape, slots: int, source: str) -> Budget:
    """The same number of slots in every layer (the naive policy's top-k)."""
    return Budget({layer: min(slots, shape.num_experts) for layer in shape.layers}, source, shape.slot_bytes)


def planned(shape: CacheShape, quotas: Mapping[int, int], source: str) -> Budget:
    """Slots chosen per layer (a cache plan): every MoE layer, 1 … num_experts slots each."""
    if sorted(quotas) != sorted(shape.layers):
        raise UsageError(f"{source} does not list this model's MoE layers")
    if any(not 1 <= q <= shape.num_experts for q in quotas.values()):
        raise UsageError(f"{source} gives a layer fewer than 1 or more than {shape.num_experts} slots")
    return Budget(dict(quotas), source, shape.slot_bytes)


def _available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(budget: Budget, dense_bytes: int) -> None:
    """Refuse a cache that, with the dense weights, needs more memory than is available."""
    need, avail = budget.bytes + dense_bytes, _available()
    if need > avail:
        raise UsageError(
            f"the expert cache ({budget.total} slots) and dense weights need {format_bytes(need)} but only "
            f"{format_bytes(avail)} of memory is available; lower the budget (--cache-experts, --memory, --budget)"
        )


def fits(shape: CacheShape, dense_bytes: int) -> bool:
    """Whether every expert and the dense weights fit in `RESIDENT_SHARE` of the available memory."""
    return shape.total_experts * shape.slot_bytes + dense_bytes <= RESIDENT_SHARE * _available()


def sweep_totals(shape: CacheShape) -> list[int]:
    """The slot totals of a budget sweep (`SWEEP_FRACTIONS` of all experts, at least one per layer)."""
    return sorted({max(len(shape.layers), round(f * shape.total_experts)) for f in SWEEP_FRACTIONS})
