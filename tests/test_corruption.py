"""Bit rot anywhere in a store is refused before the first token (issue #19). One bit is flipped at a
time in every class of byte position of a small store — the manifest, the dense file's length field and
header, every dense tensor, every side file, every part of every expert, the padding between an expert's
parts and after its last — and a chat turn is started: each must end in an AdapmoeError before a token
comes out. Every token of this model uses every expert, so a damaged expert is met by the first forward;
the shapes are odd so that experts have padding between their parts."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapmoe_cli import budget as budgets
from adapmoe_cli.conversation import Conversation, load_tokenizer
from adapmoe_cli.errors import AdapmoeError
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.settings import load_settings
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec

SPEC = TinySpec(hidden_size=48, intermediate_size=40, num_local_experts=4, num_experts_per_tok=4,
                num_attention_heads=4, num_key_value_heads=2)


def first_token(path: Path) -> int:
    """Open the store and produce one token of a chat answer, as `adapmoe chat` does."""
    store = Store.open(path)
    settings = load_settings(overrides={"generation.max_new_tokens": 1, "prefetch": False})
    budget = budgets.resolve(budgets.BudgetRequest(slots=8), store.cache_shape)
    with Engine(store, settings, budget) as engine:
        conv = Conversation(engine, load_tokenizer(store), settings.generation)
        return next(iter(conv.send("hello"))).token


def positions(store: Store) -> list[tuple[str, str, int]]:
    """(class, file, offset) of one byte in each class of position (three in the larger ones)."""
    out: list[tuple[str, str, int]] = []
    root = store.path

    def spread(cls: str, file: str, start: int, end: int, n: int = 1) -> None:
        for i in range(n):
            out.append((cls, file, start + (end - start) * (2 * i + 1) // (2 * n)))

    size = (root / "manifest.json").stat().st_size
    spread("manifest", "manifest.json", 0, size, 12)
    for f in store.dense_files:
        raw = (root / f.file).read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        spread("dense length field", f.file, 0, 8, 2)
        spread("dense header", f.file, 8, 8 + hlen, 3)
        for name, meta in json.loads(raw[8 : 8 + hlen]).items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                spread(f"dense tensor {name}", f.file, 8 + hlen + start, 8 + hlen + end)
    for f in store.side_files:
        spread(f"side file {f.file}", f.file, 0, f.bytes)
    for _, e in sorted(store.experts.items()):
        parts = list(e.tensors)
        for i, part in enumerate(parts):
            spread(f"expert part {part.name}", e.file, e.offset + part.offset, e.offset + part.offset + part.nbytes)
            end = e.offset + part.offset + part.nbytes
            gap_end = e.offset + (parts[i + 1].offset if i + 1 < len(parts) else e.length)
            if gap_end > end:
                kind = "padding between parts" if i + 1 < len(parts) else "padding after the last part"
                spread(f"expert {kind}", e.file, end, gap_end)
    return out


def test_every_class_of_flipped_bit_is_refused_before_the_first_token(
    make_store: Callable[..., Path], tmp_path: Path
):
    import shutil

    path = Path(shutil.copytree(make_store(SPEC, dtype=torch.float32), tmp_path / "store"))
    first_token(path)  # the clean store answers
    store = Store.open(path)
    spots = positions(store)
    classes = {c for c, _, _ in spots}
    assert {"expert padding between parts", "expert padding after the last part", "dense header"} <= classes
    accepted = []
    for cls, file, offset in spots:
        target = path / file
        st = target.stat()
        data = bytearray(target.read_bytes())
        data[offset] ^= 0x01
        target.write_bytes(bytes(data))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: size and mtime as they were
        try:
            first_token(path)
            accepted.append((cls, file, offset))
        except AdapmoeError:
            pass
        finally:
            data[offset] ^= 0x01
            target.write_bytes(bytes(data))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert accepted == [], f"{len(accepted)} of {len(spots)} flips were not refused: {accepted[:5]}"
    assert len(spots) >= 80 and len(classes) >= 25
    first_token(path)  # and the store, restored, answers again


@pytest.mark.parametrize("flip_at", ["start", "end"])
def test_a_flipped_bit_at_either_end_of_the_manifest_is_refused(make_store, tmp_path, flip_at):
    import shutil

    path = Path(shutil.copytree(make_store(SPEC, dtype=torch.float32), tmp_path / "store"))
    target = path / "manifest.json"
    data = bytearray(target.read_bytes())
    data[0 if flip_at == "start" else -2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(AdapmoeError):
        first_token(path)
