"""Small helpers shared by test modules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from adapmoe_cli import budget as budgets
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import load_settings
from adapmoe_cli.store import Store


def runtime_engine(store: Store, overrides: dict[str, Any] | None = None, gate: GatePolicy | None = None) -> Engine:
    """An engine with the settings' budget (`cache.budget`) split evenly, as `budget.resolve` makes it."""
    settings = load_settings(overrides=overrides)
    return Engine(store, settings, budgets.resolve(settings.cache.budget, store.cache_shape), gate=gate)


def textbook_lru(calls: Iterable[Iterable[int]], slots: int) -> tuple[int, int, list[int]]:
    """Least-recently-used eviction over one layer's calls, written out independently of the runtime:
    each call's experts (at most `slots`) are used in ascending order; a miss evicts the least recently
    used expert the call does not need. Returns (hits, misses, residents from least to most recent)."""
    order: list[int] = []  # least recent first
    hits = misses = 0
    for call in calls:
        needed = sorted(set(call))
        assert len(needed) <= slots, "a call needs more experts than the layer has slots"
        for e in needed:
            if e in order:
                hits += 1
                order.remove(e)
            else:
                misses += 1
                if len(order) == slots:
                    order.remove(next(x for x in order if x not in needed))
            order.append(e)
    return hits, misses, order
