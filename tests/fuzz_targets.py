"""Fuzz targets: one per parser of a file or text adapmoe reads from outside — the store manifest, a cache
plan, a profile, the hardware and model YAML of the simulator, a settings preset, a checkpoint's index and
safetensors header, and chat input. Each target takes bytes and either returns or raises an `AdapmoeError`
(what the CLI turns into one line); anything else is a crash. Inputs are mutations of real seeds (the
files of a tiny store, built once) drawn by hypothesis: byte edits (flips, inserts, deletions, truncation,
splices, interesting tokens) and, for JSON, structural edits (a value replaced by another type, NaN, a huge
or negative number, a hostile path, a key deleted), re-sealed where the format has a checksum so the
checks behind it are reached. Used by tests/test_fuzz.py (a short seeded run) and scripts/fuzz.py (long)."""

from __future__ import annotations

import copy
import json
import math
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

from adapmoe_cli.errors import AdapmoeError, ProfileError, UsageError

INTERESTING = [b"NaN", b"Infinity", b"-1", b"1e999", b"99999999999999999999", b"null", b"true", b'"../x"',
               b'"/etc/passwd"', b"[]", b"{}", b"\xff", b"\x00", b'"\\ud800"', b"[[[[[[[[", b"0.5", b"-0.0"]
JSON_SPECIAL = [math.nan, math.inf, -math.inf, -1, 0, 1 << 64, -(1 << 63), 10**30, 1.5, True, False, None, "",
                "../x", "/etc/passwd", "experts/../../x", "x" * 300, [], {}, [[[[]]]], "\ud800", "0" * 64]


@dataclass
class Seeds:
    """The seed inputs and the context the targets parse them against."""

    folder: Path
    store: Any
    manifest: bytes
    plan: bytes
    profile: bytes
    hardware: bytes
    model: bytes
    preset: bytes
    index: bytes
    header: bytes
    chat: bytes
    header_size: int = 0  # the size of the file the header seed came from
    tokenizer: Any = None


def build_seeds(folder: Path) -> Seeds:
    """A tiny store and one valid file of each kind."""
    from adapmoe_cli.simulate.hardware import shipped_dir as hw_dir
    from adapmoe_cli.simulate.model_spec import shipped_dir as model_dir
    from adapmoe_cli.store import Store
    from adapmoe_cli.store.writer import shard
    from adapmoe_cli.synthetic import TinySpec, write_checkpoint

    folder = Path(folder)
    ckpt = write_checkpoint(folder / "ckpt", TinySpec(), dtype=torch.float32, num_shards=2)
    shard(ckpt, folder / "store")
    store = Store.open(folder / "store")
    layers = list(store.shape.moe_layers)
    plan = {"format": "adapmoe-plan", "format_version": 1,
            "model": {"model_type": "mixtral", "fingerprint": store.fingerprint}, "budget_slots": 2 * len(layers),
            "gate_rule": "paper", "gate_scale": 0.01, "policy": "lru", "prefetch": True,
            "layers": [{"layer": la, "slots": 2, "threshold": 0.1, "cost_curve": [1.0, 0.5, 0.25, 0.0],
                        "expected_cost": 0.5} for la in layers], "total_expected_cost": 1.0}
    profile = {"format": "adapmoe-profile", "format_version": 1,
               "model": {"model_type": "mixtral", "fingerprint": store.fingerprint, "num_moe_layers": len(layers),
                         "num_experts": store.shape.num_experts, "top_k": store.shape.top_k},
               "method": "gradient", "calibration": {"text": "x", "tokens": 8, "window": 4},
               "layers": [{"layer": la, "sensitivity": 0.5, "predicted_drop_loss": 0.01,
                           "mean_second_weight_sq": 0.04, "second_order_drop_loss": 0.02,
                           "first_order_drop_loss": 0.0} for la in layers],
               "trace": {"file": "profile.trace.safetensors", "sha256": "0" * 64, "tokens": 8}}
    shard_file = sorted(ckpt.glob("model-*.safetensors"))[0]
    raw = shard_file.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    return Seeds(
        folder=folder, store=store,
        manifest=(folder / "store" / "manifest.json").read_bytes(),
        plan=json.dumps(plan, indent=1).encode(), profile=json.dumps(profile, indent=1).encode(),
        hardware=(hw_dir() / "laptop-nvme.yaml").read_bytes(), model=(model_dir() / "mixtral-8x7b.yaml").read_bytes(),
        preset=b"cache:\n  budget: 50%\n  policy: lfu\ngeneration:\n  temperature: 0.7\n  top_p: 0.9\n  seed: 3\n"
               b"gate:\n  scale: 0.01\nprefetch: false\n",
        index=(ckpt / "model.safetensors.index.json").read_bytes(),
        header=raw[: 8 + hlen], header_size=len(raw),
        chat="What does the json module do? café — 東京 🙂\n".encode(),
    )


# --- targets ----------------------------------------------------------------------------------------------


def target_manifest(seeds: Seeds, data: bytes) -> None:
    from adapmoe_cli.store import Store

    store = Store.from_bytes(seeds.folder / "fuzz-store", data)
    store.info()
    _ = store.cache_shape, store.slot_bytes


def target_plan(seeds: Seeds, data: bytes) -> None:
    from adapmoe_cli.planning.plan_file import FORMAT, FORMAT_VERSION, parse_plan
    from adapmoe_cli.versioned import parse_versioned

    path = seeds.folder / "plan.json"
    doc = parse_versioned(data, path, FORMAT, FORMAT_VERSION, ProfileError, "cache plan", "adapmoe plan-cache")
    plan = parse_plan(doc, seeds.store, path)
    _ = plan.quotas, plan.gate, plan.public()


def target_profile(seeds: Seeds, data: bytes) -> None:
    from adapmoe_cli.planning import gate_rules
    from adapmoe_cli.profiling.profile_file import FORMAT, FORMAT_VERSION, parse_profile
    from adapmoe_cli.versioned import parse_versioned

    path = seeds.folder / "profile.json"
    doc = parse_versioned(data, path, FORMAT, FORMAT_VERSION, ProfileError, "profile", "adapmoe profile")
    prof = parse_profile(doc, path, seeds.store)
    for rule in ("paper", "global", "weighted"):
        gate_rules.gate(rule, 0.01, prof.layers)


def target_hardware(seeds: Seeds, data: bytes) -> None:
    from adapmoe_cli.settings import parse_yaml
    from adapmoe_cli.simulate.hardware import from_dict

    d = parse_yaml(data, "hardware file")
    if not isinstance(d, dict):
        raise UsageError("not a mapping")
    hw = from_dict(d, "fuzz.yaml")
    hw.transfer_s(1 << 20)


def target_model(seeds: Seeds, data: bytes) -> None:
    from adapmoe_cli.settings import parse_yaml
    from adapmoe_cli.simulate.model_spec import from_config

    d = parse_yaml(data, "model config")
    if not isinstance(d, dict):
        raise UsageError("not a mapping")
    spec = from_config(d, None, "fuzz.yaml")
    _ = spec.cache_shape, spec.total_experts


def target_preset(seeds: Seeds, data: bytes) -> None:
    from adapmoe_cli.budget import resolve
    from adapmoe_cli.settings import build_settings, parse_yaml

    d = parse_yaml(data, "config file")
    if not isinstance(d, dict):
        raise UsageError("not a mapping")
    settings = build_settings(d)
    resolve(settings.cache.budget, seeds.store.cache_shape)


def target_index(seeds: Seeds, data: bytes) -> None:
    from adapmoe_cli.checkpoint import parse_index

    parse_index(data, seeds.folder / "model.safetensors.index.json")


def target_header(seeds: Seeds, data: bytes) -> None:
    from adapmoe_cli.checkpoint import parse_safetensors_header

    parse_safetensors_header(data, seeds.header_size, seeds.folder / "model.safetensors")


def target_chat(seeds: Seeds, data: bytes) -> None:
    """Bytes as Python hands them over from stdin or a terminal (undecodable bytes kept as surrogates)."""
    from adapmoe_cli.conversation import chat_ids, clean_text, load_tokenizer

    if seeds.tokenizer is None:
        seeds.tokenizer = load_tokenizer(seeds.store)
    text = clean_text(data.decode("utf-8", "surrogateescape"))
    text.encode("utf-8")  # what reaches the tokenizer is valid UTF-8
    seeds.tokenizer.encode(text)
    chat_ids(seeds.tokenizer, [{"role": "user", "content": text}])


TARGETS: dict[str, tuple[Callable[[Seeds, bytes], None], str, str]] = {
    # name → (target, seed attribute, kind of structure: json | yaml | bytes)
    "manifest": (target_manifest, "manifest", "json"),
    "plan": (target_plan, "plan", "json"),
    "profile": (target_profile, "profile", "json"),
    "hardware-yaml": (target_hardware, "hardware", "yaml"),
    "model-yaml": (target_model, "model", "yaml"),
    "preset-yaml": (target_preset, "preset", "yaml"),
    "checkpoint-index": (target_index, "index", "json"),
    "safetensors-header": (target_header, "header", "header"),
    "chat-input": (target_chat, "chat", "bytes"),
}


def run_one(name: str, seeds: Seeds, data: bytes) -> None:
    """Run a target: an AdapmoeError is a clean refusal; any other exception propagates (a crash)."""
    fn = TARGETS[name][0]
    try:
        fn(seeds, data)
    except AdapmoeError:
        pass


# --- inputs ----------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(JSON_SPECIAL),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def byte_mutations(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice", "token"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            a = draw(st.integers(0, max(len(seed) - 1, 0)))
            data[pos:pos] = seed[a : a + draw(st.integers(1, 256))]
        elif op == "token":
            data[pos : pos + draw(st.integers(0, 4))] = draw(st.sampled_from(INTERESTING))
    return bytes(data)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def json_mutations(draw: st.DrawFn, seed: bytes, reseal: bool) -> bytes:
    doc = json.loads(seed)
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]))
        if op == "replace":
            parent[path[-1]] = copy.deepcopy(draw(json_values))  # JSON_SPECIAL's lists must stay empty
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
    if reseal and isinstance(doc, dict) and draw(st.booleans()):
        from adapmoe_cli.store.manifest import manifest_digest

        doc["manifest_sha256"] = manifest_digest(doc)
    return json.dumps(doc, allow_nan=True, indent=draw(st.sampled_from([None, 1]))).encode()


@st.composite
def yaml_mutations(draw: st.DrawFn, seed: bytes) -> bytes:
    import yaml

    doc = yaml.safe_load(seed)
    key = draw(st.sampled_from(sorted(_paths(doc)[1:], key=str)))
    parent = doc
    for k in key[:-1]:
        parent = parent[k]
    parent[key[-1]] = copy.deepcopy(draw(json_values))
    return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass")


def inputs(name: str, seeds: Seeds) -> st.SearchStrategy[bytes]:
    """The inputs of one target: seed byte mutations, structural mutations, and raw bytes."""
    _, attr, kind = TARGETS[name]
    seed = getattr(seeds, attr)
    parts = [byte_mutations(seed), st.binary(max_size=512)]
    if kind == "json":
        parts.append(json_mutations(seed, reseal=name == "manifest"))
        parts.append(json_mutations(seed, reseal=name == "manifest"))
    elif kind == "yaml":
        parts.append(yaml_mutations(seed))
        parts.append(yaml_mutations(seed))
    elif kind == "header":
        parts.append(st.builds(_header_from_json, json_mutations(_header_json(seed), reseal=False), st.just(seed)))
    elif kind == "bytes":
        parts.append(st.text().map(lambda t: t.encode("utf-8", "surrogatepass")))
    return st.one_of(*parts)


def _header_json(raw: bytes) -> bytes:
    (hlen,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + hlen]


def _header_from_json(header: bytes, raw: bytes) -> bytes:
    (hlen,) = struct.unpack("<Q", raw[:8])
    return struct.pack("<Q", len(header)) + header + raw[8 + hlen :]


def seeds_in_tempdir() -> tuple[tempfile.TemporaryDirectory, Seeds]:
    tmp = tempfile.TemporaryDirectory(prefix="adapmoe-fuzz-")
    return tmp, build_seeds(Path(tmp.name))


__all__ = ["TARGETS", "Seeds", "build_seeds", "inputs", "run_one", "seeds_in_tempdir"]
