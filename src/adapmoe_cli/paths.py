"""Where adapmoe keeps its files: `ADAPMOE_HOME` (default `$XDG_CACHE_HOME/adapmoe`, i.e.
`~/.cache/adapmoe`). Stores of hub models and of local checkpoints live under `stores/`; a folder is a store
when it holds a manifest (`MANIFEST`, read by store/manifest.py). Imports nothing heavy: the CLI answers a
wrong path from here before torch loads."""

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


#: the file that makes a folder a store (its format: store/manifest.py)
MANIFEST = "manifest.json"


def is_store(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def not_a_store(path: Path) -> str | None:
    """Why `path` cannot be opened as a store, in words, from the file system alone; None: it holds a manifest
    (which `Store.open` then reads and checks)."""
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is not a folder; give the store's folder"
    if not is_store(path):
        return f"{path} is not an adapmoe store (no {MANIFEST}); make one with `adapmoe shard`"
    return None
