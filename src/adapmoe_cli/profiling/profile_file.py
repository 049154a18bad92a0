"""The profile on disk (format version 1): `profile.json` (statistics, human-readable) and, beside it,
`profile.trace.safetensors` (the routing trace). Both are written to temporary names and renamed, the
JSON last, so an interrupted run never replaces a complete profile. The schema is in docs/profile.md."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapmoe_cli import __version__
from adapmoe_cli.errors import ProfileError
from adapmoe_cli.profiling.trace import Trace
from adapmoe_cli.store import Store
from adapmoe_cli.versioned import read_versioned

FORMAT = "adapmoe-profile"
FORMAT_VERSION = 1
DEFAULT_NAME = "profile.json"


def default_path(store: Store) -> Path:
    return store.path / DEFAULT_NAME


def trace_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + ".trace.safetensors")


def model_identity(store: Store) -> dict[str, Any]:
    s = store.shape
    return {"model_type": store.family.model_type, "fingerprint": store.fingerprint,
            "num_moe_layers": len(s.moe_layers), "num_experts": s.num_experts, "top_k": s.top_k}


def write_profile(path: Path, data: dict[str, Any], trace: Trace) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tpath = trace_path(path)
    tmp_trace = tpath.with_name(f".{tpath.name}.tmp-{os.getpid()}")
    tmp_json = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(trace.tensors(), str(tmp_trace), metadata={"format": FORMAT})
        digest = hashlib.sha256(tmp_trace.read_bytes()).hexdigest()
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"adapmoe {__version__}",
               **data, "trace": {"file": tpath.name, "sha256": digest, "tokens": trace.num_tokens}}
        tmp_json.write_text(json.dumps(doc, indent=1))
        os.replace(tmp_trace, tpath)
        os.replace(tmp_json, path)
    finally:
        for p in (tmp_trace, tmp_json):
            p.unlink(missing_ok=True)
    return path


@dataclass
class Profile:
    path: Path
    data: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.data["layers"]

    def trace(self) -> Trace:
        from safetensors.torch import load_file

        tpath = self.path.with_name(self.data["trace"]["file"])
        if not tpath.exists():
            raise ProfileError(f"the trace {tpath} of profile {self.path} is missing; re-run `adapmoe profile`")
        if hashlib.sha256(tpath.read_bytes()).hexdigest() != self.data["trace"]["sha256"]:
            raise ProfileError(f"the trace {tpath} does not match {self.path}; re-run `adapmoe profile`")
        return Trace.from_tensors(load_file(str(tpath)))


def read_profile(path: Path, store: Store | None = None) -> Profile:
    """Load a profile; refuse one of another format version or (when `store` is given) another model."""
    path = Path(path)
    data = read_versioned(path, FORMAT, FORMAT_VERSION, ProfileError, "profile", "adapmoe profile")
    if store is not None and data.get("model", {}).get("fingerprint") != store.fingerprint:
        raise ProfileError(
            f"{path} was made for another model ({data.get('model', {}).get('model_type')}, different weights); "
            f"run `adapmoe profile` on {store.path}"
        )
    return Profile(path, data)
