"""Small helpers shared by test modules."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from adapmoe_cli import budget as budgets
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import load_settings
from adapmoe_cli.store import Store


def runtime_engine(store: Store, overrides: dict[str, Any] | None = None, gate: GatePolicy | None = None,
                   quotas: Mapping[int, int] | None = None) -> Engine:
    """An engine with the settings' budget (`cache.budget`) split evenly, as `budget.resolve` makes it, or
    with these slots per layer."""
    settings = load_settings(overrides=overrides)
    budget = (budgets.Budget(quotas, "test", store.slot_bytes) if quotas is not None
              else budgets.resolve(settings.cache.budget, store.cache_shape))
    return Engine(store, settings, budget, gate=gate)


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


def reference_models(make_checkpoint: Callable[..., Path], shapes: Mapping[str, Any],
                     experts_implementation: str | None = None) -> Callable[[str], Any]:
    """name → transformers' own model for `shapes[name]` (float32, loaded once): the reference the
    runtime is compared with. `experts_implementation="eager"` where the router may send a token to the
    skip index (num_experts): transformers' CPU default leaves those rows uninitialised."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, Any] = {}
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}

    def get(name: str) -> Any:
        if name not in cache:
            path = make_checkpoint(shapes[name], dtype=torch.float32)
            cache[name] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()
        return cache[name]

    return get


def o_direct_allowed(folder: Path) -> bool:
    """Whether the file system under `folder` lets a file be opened with O_DIRECT (probed here)."""
    probe = folder / ".o-direct-probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def open_fds_under(folder: Path) -> dict[int, int]:
    """This process's open file descriptors on files under `folder` → their status flags, as the kernel
    lists them in /proc/self/fdinfo (independent of any bookkeeping of ours)."""
    root, out = str(folder.resolve()) + os.sep, {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{entry}")
            info = Path(f"/proc/self/fdinfo/{entry}").read_text()
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, among others)
        if target.startswith(root):
            flags = next(line for line in info.splitlines() if line.startswith("flags:"))
            out[int(entry)] = int(flags.split()[1], 8)
    return out


# Run before the CLI in a child process: every `shard` that writes a store (not one that finds it already
# made) appends the store's path to the file named by $ADAPMOE_TEST_SHARD_RUNS.
SHARD_RUN_COUNTER = """
import os
import adapmoe_cli.store.writer as _writer
_real_shard = _writer.shard
def _counted_shard(*args, **kwargs):
    result = _real_shard(*args, **kwargs)
    if not result.reused:
        with open(os.environ["ADAPMOE_TEST_SHARD_RUNS"], "a") as f:
            f.write(str(result.store) + "\\n")
    return result
_writer.shard = _counted_shard
"""


def count_shard_runs(monkeypatch: Any) -> list[Path]:
    """In this process: the stores `shard` writes from now on (a store found already made is not a run)."""
    import adapmoe_cli.store.writer as writer

    runs: list[Path] = []
    real = writer.shard

    def counted(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if not result.reused:
            runs.append(Path(result.store))
        return result

    monkeypatch.setattr(writer, "shard", counted)
    return runs


def greedy(engine: Engine, prompt: list[int], n: int, after: Callable[[int], None] | None = None) -> list[int]:
    """n greedy tokens from the offloading runtime (no stopping, no repetition penalty); `after(i)` runs once
    the i-th token is out, before the next step."""
    from adapmoe_cli.runtime.generate import generate_step, new_kv_cache
    from adapmoe_cli.settings import GenerationSettings

    settings = GenerationSettings(max_new_tokens=n, temperature=0.0, repetition_penalty=1.0)
    out = []
    for tok, _ in generate_step(engine, prompt, new_kv_cache(engine), settings):  # the caller stops it
        out.append(tok)
        if len(out) == n:
            return out
        if after is not None:
            after(len(out))
    raise AssertionError("generate_step ended early")


def ref_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """n raw greedy tokens from transformers' own model (no stopping at eos, no eos suppression)."""
    model.generation_config.eos_token_id = None
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return ids[0, len(prompt):].tolist()
