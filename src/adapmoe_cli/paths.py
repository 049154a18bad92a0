"""Where adapmoe keeps its files: `ADAPMOE_HOME` (default `$XDG_CACHE_HOME/adapmoe`, i.e.
`~/.cache/adapmoe`). Stores of hub models and of local checkpoints live under `stores/`."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    env = os.environ.get("ADAPMOE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "adapmoe"


def stores_dir() -> Path:
    return home() / "stores"


def store_dir_for_repo(repo_id: str, revision: str | None = None) -> Path:
    """Per-model folder for a hub id: `org--name` (`@revision` when not main)."""
    name = repo_id.replace("/", "--")
    if revision and revision != "main":
        name += "@" + revision.replace("/", "--")
    return stores_dir() / name
