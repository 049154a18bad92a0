"""The expert-cache budget, from the user's words to the slots each MoE layer gets, in one place.

`--cache-experts 32`, `--memory 6GiB`, `--budget 24GiB | 25%` and the config's `cache.budget` (default
`auto`: as many experts as fit in the memory available) all become one `BudgetRequest`; `resolve` turns
it into a `Budget` (slots per layer, and the bytes they hold) against a `CacheShape` — a store's or a
simulated model's — checking the range once and capping at the model. The runtime, the planner, the
bench and the simulator take that `Budget` and compute nothing of their own. `check_fits` and `fits`
are the only memory checks. Knows nothing of tensors, files or policies."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from adapmoe_cli.errors import UsageError
from adapmoe_cli.units import format_bytes, parse_size

#: what may be filled with experts and dense weights: an optional all-resident run (the profiler's gradient
#: method, the simulator's calibration, the bench's `resident` policy) is made only when everything fits in
#: this share of the available memory, and the `auto` budget fills this share (the rest is left to the OS,
#: activations and the page cache); the runtime itself refuses only what does not fit at all
RESIDENT_SHARE = 0.8
#: budgets swept by `bench --sweep` and `simulate --sweep`, as shares of all experts
SWEEP_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
_SLOTS = re.compile(r"^\s*\d+\s*$")
_SHARE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


@dataclass(frozen=True)
class CacheShape:
    """What a budget is measured against: the MoE layers, experts per layer, top-k, the bytes of one cache
    slot (what one read moves: `Store.slot_bytes`, `ModelSpec.slot_bytes`) and the dense weights' bytes."""

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    slot_bytes: int
    dense_bytes: int = 0

    @property
    def total_experts(self) -> int:
        return len(self.layers) * self.num_experts


@dataclass(frozen=True)
class BudgetRequest:
    """What the user asked for: a number of slots, a size for all slots together, a share of all experts,
    or (nothing given) `auto`: as many as fit in the memory available. `flag` names where it was given,
    so messages speak of the flag the user typed."""

    slots: int | None = None
    bytes: int | None = None
    fraction: float | None = None
    flag: str = field(default="cache.budget", compare=False)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.slots, self.bytes, self.fraction)) > 1:
            raise UsageError("give the expert budget once: a number of slots, a size or a share")
        if self.slots is not None and self.slots < 1:
            raise UsageError(f"{self.flag} must be at least 1 slot per MoE layer, got {self.slots}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise UsageError(f"{self.flag}: a share of the experts must be above 0% and at most 100%, got "
                             f"{self.fraction:.0%}")

    @staticmethod
    def parse(text: str | int, flag: str = "cache.budget") -> BudgetRequest:
        """`32` → 32 slots; `6GiB` → as many slots as fit in 6 GiB; `50%` → half of all experts; `auto`."""
        t = str(text)
        if t.strip().lower() == "auto":
            return BudgetRequest(flag=flag)
        if _SLOTS.match(t):
            return BudgetRequest(slots=int(t), flag=flag)
        share = _SHARE.match(t)
        if share:
            return BudgetRequest(fraction=float(share.group(1)) / 100, flag=flag)
        if not any(c.isalpha() for c in t):
            raise UsageError(f"cannot read {flag} {t!r}: give expert slots (32), a size (6GiB), a share of all "
                             "experts (50%) or auto")
        return BudgetRequest(bytes=parse_size(t), flag=flag)

    @staticmethod
    def of_size(text: str, flag: str = "--memory") -> BudgetRequest:
        """A size only (a bare number is bytes, as in `parse_size`)."""
        return BudgetRequest(bytes=parse_size(text), flag=flag)

    @property
    def explicit(self) -> bool:
        """True when the user named slots, a size or a share (not `auto`)."""
        return self.slots is not None or self.bytes is not None or self.fraction is not None

    def words(self, slots: int, shape: CacheShape) -> str:
        """`slots` as the user would write them with this request's flag."""
        if self.bytes is not None:
            return f"{self.flag} {format_bytes(slots * shape.slot_bytes).replace(' ', '')}"
        if self.fraction is not None:
            return f"{self.flag} {100 * slots / shape.total_experts:.0f}%"
        return f"{self.flag} {slots}" if self.flag.startswith("-") else f"{slots} slots"


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
    """The request in slots — capped at the model, refused below one slot per layer — and a phrase saying
    how it was counted (shown in banners, with the bytes)."""
    n_layers, size = len(shape.layers), format_bytes(shape.slot_bytes)
    if req.slots is not None:
        total, source = req.slots, f"{req.flag} {req.slots}"
    elif req.bytes is not None:
        total = req.bytes // shape.slot_bytes
        source = f"{req.flag} {format_bytes(req.bytes)} = {total} slots of {size}"
    elif req.fraction is not None:
        total = max(n_layers, round(req.fraction * shape.total_experts))
        source = f"{req.fraction:.0%} of the experts"
    else:
        avail = _available()
        total = max(0, int(RESIDENT_SHARE * avail) - shape.dense_bytes) // shape.slot_bytes
        share = f"{RESIDENT_SHARE:.0%} of the {format_bytes(avail)} available"
        if total >= shape.total_experts:
            total, source = shape.total_experts, f"auto: every expert fits in {share}"
        else:
            source = f"auto: as many as fit in {share}, less the dense weights"
        if total < n_layers:
            raise UsageError(
                f"only {format_bytes(avail)} of memory is available: not enough for the dense weights "
                f"({format_bytes(shape.dense_bytes)}) and one expert slot per MoE layer ({n_layers} × {size}); "
                "free some memory or give a budget with --memory"
            )
    if total < n_layers:
        raise UsageError(
            f"a budget of {total} expert slots ({source}) is below one per MoE layer ({n_layers} layers, {size} "
            f"each); give {req.words(n_layers, shape)} or more"
        )
    if total > shape.total_experts:
        total, source = shape.total_experts, f"{source}, capped at the model's {shape.total_experts} experts"
    return total, source


def check_range(total: int, shape: CacheShape) -> None:
    """For slot counts made by the program (plans, policies): at least one per layer, at most all."""
    if not len(shape.layers) <= total <= shape.total_experts:
        raise UsageError(f"a budget of {total} expert slots is outside 1 per MoE layer ({len(shape.layers)}) "
                         f"… all experts ({shape.total_experts})")


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


def fits(shape: CacheShape) -> bool:
    """Whether every expert and the dense weights fit in `RESIDENT_SHARE` of the available memory."""
    return shape.total_experts * shape.slot_bytes + shape.dense_bytes <= RESIDENT_SHARE * _available()


def sweep_totals(shape: CacheShape) -> list[int]:
    """The slot totals of a budget sweep (`SWEEP_FRACTIONS` of all experts, at least one per layer)."""
    return sorted({max(len(shape.layers), round(f * shape.total_experts)) for f in SWEEP_FRACTIONS})
