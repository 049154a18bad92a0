"""Resolves the MODEL argument every command takes into an opened store:
nothing or `embedded` → the embedded default model, `embedded-fine` → the embedded fine-grained one (each
sharded into ADAPMOE_HOME on first use, with its shipped profile and cache plan, so the method is on from
the first token);
a store folder → itself; a checkpoint folder → sharded into ADAPMOE_HOME on first use;
a hub id → its store if already made, else downloaded (only here does adapmoe touch the network).
`check_model` tells a MODEL that names none of these from the file system alone, before torch loads."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from adapmoe_cli.catalog import EMBEDDED, EMBEDDED_MODELS, checkpoint_store_dir, touch
from adapmoe_cli.errors import StoreExistsError, UsageError
from adapmoe_cli.hub import looks_like_repo_id
from adapmoe_cli.paths import is_store, store_dir_for_repo, stores_dir
from adapmoe_cli.safe_io import sha256_file

if TYPE_CHECKING:  # (both import torch: only when a store is opened)
    from adapmoe_cli.experts_format import ExpertsFormat
    from adapmoe_cli.store import Store

Progress = Callable[[int, int], None]
#: the embedded model is stored in float32: on CPUs without bf16 matmuls it is the fast dtype
DEFAULT_MODEL_DTYPE = "float32"


def default_model_dir(name: str = EMBEDDED) -> Path:
    """The package folder of an embedded model (`embedded`, `embedded-fine`)."""
    return Path(str(resources.files("adapmoe_cli").joinpath(EMBEDDED_MODELS[name][0])))


def default_text(split: str) -> Path:
    """The embedded models' held-out text: `calibration` (profiling) or `heldout` (evaluation). Both models
    were trained on the same split of the same corpus, so one copy serves both."""
    path = default_model_dir() / f"{split}.txt"
    if not path.exists():
        raise UsageError(f"the embedded model ships no {split} text ({path}); reinstall adapmoe")
    return path


#: made by scripts/ship_default_profile.py and shipped beside the embedded model, so AdapMoE (adaptive gate,
#: DP plan) is on from the first token; the trace and the expert statistics sit beside the profile (written
#: before it); the plan names its own budget
SHIPPED_METHOD = ("profile.trace.safetensors", "profile.experts.safetensors", "profile.json", "plan.json")
#: beside them: name → sha256 of every version of it that adapmoe has shipped, the current one first
SHIPPED_VERSIONS = "shipped.json"


def install_shipped_method(src: Path, store_dir: Path) -> None:
    """Copy the embedded model's profile (with its trace and expert statistics) and plan into its store
    where the store lacks them or holds a version an earlier adapmoe shipped (`SHIPPED_VERSIONS`), so
    upgrading adapmoe upgrades the method; what the user made is never replaced. Each file lands whole
    (temporary name, rename), the profile after its trace and statistics, as `profile_file.write_profile`
    does."""
    listed = src / SHIPPED_VERSIONS
    versions = json.loads(listed.read_text()) if listed.exists() else {}
    held = {name: sha256_file(store_dir / name) if (store_dir / name).exists() else None for name in SHIPPED_METHOD}
    ours = {name: held[name] is None or held[name] in versions.get(name, ()) for name in SHIPPED_METHOD}
    outdated = {name: (src / name).exists() and held[name] != (versions.get(name) or [sha256_file(src / name)])[0]
                for name in SHIPPED_METHOD}
    pair = SHIPPED_METHOD[:3]  # a trace and statistics belong to their profile: they come and go together
    wanted = list(pair) if ours["profile.json"] and any(outdated[n] for n in pair) else []
    if ours["plan.json"] and outdated["plan.json"]:
        wanted.append("plan.json")
    for name in wanted:
        if not (src / name).exists():
            continue
        tmp = store_dir / f".{name}.tmp-{os.getpid()}"
        try:
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, store_dir / name)
        finally:
            tmp.unlink(missing_ok=True)


def open_model(model: str | None, progress: Progress | None = None,
               experts_format: ExpertsFormat | None = None) -> Store:
    """MODEL → an opened store (see the module's docstring). With a
    quantized `experts_format`, the store of MODEL with its experts in that format, kept beside the native
    one (`NAME-int4-g64`): a checkpoint or a hub model is sharded straight into it, a store or the embedded
    model quantized from its store (store/export.py)."""
    fmt = experts_format if experts_format is not None and experts_format.quantized else None
    store = _open(model, progress, fmt)
    if fmt is not None and not store.experts_format.quantized:
        from adapmoe_cli.store.export import variant_store

        store = variant_store(store, fmt=fmt)
    elif fmt is not None and store.experts_format.spec() != fmt.spec():
        raise UsageError(f"{store.path} holds {store.experts_format.label()} experts, not {fmt.label()}; give "
                         "the store they were made from")
    touch(store.path)
    return store


def check_model(model: str | None) -> str:
    """What MODEL names — `embedded`, `store`, `checkpoint` or `hub` — from the file system alone (nothing
    read, nothing imported that loads torch), or a UsageError saying why it names nothing adapmoe can open."""
    path = Path(model).expanduser() if model is not None else None
    if model is None or (model in EMBEDDED_MODELS and not path.exists()):
        return "embedded"
    if path.exists():
        if is_store(path):
            return "store"
        if (path / "config.json").exists():
            return "checkpoint"
        raise UsageError(f"{model} is neither an adapmoe store nor a checkpoint folder (no config.json)")
    if looks_like_repo_id(model):
        return "hub"
    raise UsageError(
        f"{model!r} is not a store, a checkpoint folder or a hub id (ORG/NAME); check the path"
    )


def _suffixed(out: Path, fmt: ExpertsFormat | None) -> Path:
    return out if fmt is None else out.with_name(f"{out.name}-{fmt.label()}")


def _open(model: str | None, progress: Progress | None, fmt: ExpertsFormat | None = None) -> Store:
    from adapmoe_cli.store import Store
    from adapmoe_cli.store.writer import shard

    kind = check_model(model)
    if kind == "embedded":
        name = model or EMBEDDED
        src = default_model_dir(name)
        if not (src / "config.json").exists():
            raise UsageError(f"the embedded model {name!r} is missing from {src}; reinstall adapmoe")
        out = stores_dir() / name
        old = stores_dir() / "default-model"  # its name before adapmoe 0.2: keep the store, rename it
        if name == EMBEDDED and is_store(old) and not out.exists():
            old.rename(out)
        source = {"embedded": EMBEDDED_MODELS[name][1]}
        try:
            shard(src, out, dtype=DEFAULT_MODEL_DTYPE, progress=progress, source=source)
        except StoreExistsError:  # made from an older embedded model: replace it
            shard(src, out, dtype=DEFAULT_MODEL_DTYPE, force=True, progress=progress, source=source)
        install_shipped_method(src, out)
        return Store.open(out)
    assert model is not None
    path = Path(model).expanduser()
    if kind == "store":
        return Store.open(path)
    if kind == "checkpoint":
        out = _suffixed(checkpoint_store_dir(path), fmt)
        try:
            shard(path, out, progress=progress, experts_format=fmt)
        except StoreExistsError:  # the checkpoint changed since: its store under ADAPMOE_HOME is stale
            shard(path, out, force=True, progress=progress, experts_format=fmt)
        return Store.open(out)
    out = _suffixed(store_dir_for_repo(model), fmt)  # a hub id
    if is_store(out):
        return Store.open(out)
    from adapmoe_cli.hub import download_checkpoint

    ckpt = download_checkpoint(model)
    shard(ckpt, out, progress=progress, source={"repo_id": model, "revision": "main"}, experts_format=fmt)
    return Store.open(out)
