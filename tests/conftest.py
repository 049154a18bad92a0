"""Shared fixtures: every test gets its own ADAPMOE_HOME and HF_HOME, and checkpoints are written once
per session in the hub's layout by `adapmoe_cli.synthetic` (random weights; the trained default model
is used where numbers must mean something)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapmoe_cli.store.writer import shard
from adapmoe_cli.synthetic import TinySpec, write_checkpoint


def pytest_configure(config: pytest.Config) -> None:
    """The suite runs in two worker processes (pyproject: `-n 2`, pytest-xdist), each computing on one core:
    torch here and every process a test starts get one thread. (Two workers with torch's default of a thread
    per core oversubscribe the machine and gain nothing; one thread each took the suite from 9.5 to 5.1
    minutes on the project's 2-core machine.)"""
    if hasattr(config, "workerinput"):  # an xdist worker
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPMOE_HOME", str(tmp_path / "adapmoe-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("ADAPMOE_DEBUG", raising=False)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_checkpoint(spec, dtype=..., shards=...)` → folder, written once per distinct arguments."""
    cache: dict[tuple, Path] = {}

    def make(spec: TinySpec = TinySpec(), dtype: torch.dtype = torch.bfloat16, shards: int = 2,
             seed: int = 0) -> Path:
        key = (spec, dtype, shards, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp("ckpt")
            cache[key] = write_checkpoint(out, spec, dtype=dtype, num_shards=shards, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_store(tmp_path_factory: pytest.TempPathFactory, make_checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """`make_store(spec, dtype=...)` → a store sharded from `make_checkpoint(spec, ...)`. Read-only: tests
    that damage a store copy it first."""
    cache: dict[tuple, Path] = {}

    def make(spec: TinySpec = TinySpec(), dtype: torch.dtype = torch.bfloat16, store_dtype: str = "keep",
             seed: int = 0) -> Path:
        key = (spec, dtype, store_dtype, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp("store") / "store"
            shard(make_checkpoint(spec, dtype=dtype, seed=seed), out, dtype=store_dtype)
            cache[key] = out
        return cache[key]

    return make
