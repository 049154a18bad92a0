"""Small helpers shared by test modules."""

from __future__ import annotations

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
