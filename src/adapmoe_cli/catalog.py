"""The stores adapmoe keeps in `ADAPMOE_HOME/stores`: their readable names, what each holds (`list_stores`),
when each was last used, and removing one (`remove_store`). Knows nothing of tensors or terminals."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapmoe_cli.errors import UsageError
from adapmoe_cli.paths import MANIFEST, home, stores_dir

EMBEDDED = "embedded"  # the embedded default model's store, and the MODEL word that names it
#: MODEL word → (its folder in the package, the `source.embedded` its store's manifest records)
EMBEDDED_MODELS = {EMBEDDED: ("default_model", "adapmoe default model"),
                   "embedded-fine": ("fine_model", "adapmoe fine-grained model")}
_LAST_USED = "last-used.json"


@dataclass(frozen=True)
class StoreEntry:
    name: str
    path: Path
    source: str  # hub id, checkpoint folder or "embedded"
    bytes: int
    dtype: str
    format_version: int | None
    profile: bool
    plan: bool
    last_used: float | None  # seconds since the epoch

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "source": self.source, "bytes": self.bytes,
                "dtype": self.dtype, "format_version": self.format_version, "profile": self.profile,
                "plan": self.plan, "last_used": self.last_used}


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_source(source: dict[str, Any]) -> str:
    if source.get("embedded"):
        return next((name for name, (_, label) in EMBEDDED_MODELS.items() if label == source["embedded"]), EMBEDDED)
    return str(source.get("repo_id") or source.get("path") or "?")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _last_used() -> dict[str, float]:
    try:
        data = json.loads((home() / _LAST_USED).read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def touch(store_dir: Path) -> None:
    """Record that a store under ADAPMOE_HOME was used now (other stores are not tracked). Best effort: a
    read-only home only loses the date."""
    if store_dir.parent.resolve() != stores_dir().resolve():
        return
    used = _last_used()
    used[store_dir.name] = time.time()
    target = home() / _LAST_USED
    tmp = target.with_name(f".{_LAST_USED}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(used, indent=1))
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)


def _dtype(manifest: dict) -> str:
    """The store's dtype, and its experts' format when they are quantized (`float32, int4 experts`)."""
    fmt = manifest.get("experts_format")
    name = fmt.get("name") if isinstance(fmt, dict) else None
    return str(manifest.get("dtype", "?")) + (f", {name} experts" if isinstance(name, str) else "")


def list_stores() -> list[StoreEntry]:
    """Every folder of ADAPMOE_HOME/stores that is a complete store, by name."""
    root, used = stores_dir(), _last_used()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = _manifest(path)
        if m is None:
            continue
        out.append(StoreEntry(
            name=path.name, path=path, source=describe_source(m.get("source", {})), bytes=_size(path),
            dtype=_dtype(m), format_version=m.get("format_version"),
            profile=(path / "profile.json").exists(), plan=(path / "plan.json").exists(), last_used=used.get(path.name),
        ))
    return out


def find_store(name_or_source: str) -> StoreEntry:
    """A store by its name, or by its source (hub id, checkpoint folder, `embedded`)."""
    stores = list_stores()
    for entry in stores:
        if name_or_source == entry.name:
            return entry
    target = name_or_source
    if Path(target).expanduser().exists():
        target = str(Path(target).expanduser().resolve())
    matches = [e for e in stores if e.source == target or (
        e.source not in EMBEDDED_MODELS and Path(e.source).is_absolute() and str(Path(e.source).resolve()) == target)]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(e.name for e in stores) or "none"
    raise UsageError(f"no store named {name_or_source!r} in {stores_dir()} (stores: {names}); `adapmoe list` shows "
                     "them")


def remove_store(entry: StoreEntry) -> int:
    """Delete a store under ADAPMOE_HOME/stores; the bytes freed. Never anything outside that folder."""
    root = stores_dir().resolve()
    path = entry.path
    if path.is_symlink() or path.resolve().parent != root:
        raise UsageError(f"{path} is not a store folder of {root}; remove it yourself if you mean it")
    freed = entry.bytes
    shutil.rmtree(path)
    used = _last_used()
    if used.pop(entry.name, None) is not None:
        try:
            (home() / _LAST_USED).write_text(json.dumps(used, indent=1))
        except OSError:
            pass
    return freed


def checkpoint_store_dir(src: Path) -> Path:
    """The store folder for a local checkpoint: named after the checkpoint's folder (`Mixtral-8x7B-v0.1`),
    the one that already holds this checkpoint's store if any, else the first free `NAME`, `NAME-2`, …"""
    src = src.resolve()
    root = stores_dir()
    n = 1
    while True:
        candidate = root / (src.name if n == 1 else f"{src.name}-{n}")
        m = _manifest(candidate)
        if not candidate.exists():
            return candidate
        recorded = (m or {}).get("source", {}).get("path")
        if recorded and Path(recorded).resolve() == src:
            return candidate
        n += 1
