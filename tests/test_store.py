"""The expert store as a library: what `shard()` writes (manifest, aligned expert ranges, dense weights,
side files), that it is atomic and idempotent, that `ExpertReader` gives back the source tensors, and that
verification and format versions are enforced."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapmoe_cli.errors import StoreError, StoreExistsError
from adapmoe_cli.store import FORMAT_VERSION, Store, is_store, writer
from adapmoe_cli.store.manifest import ALIGNMENT, NATIVE_FORMAT_VERSION
from adapmoe_cli.store.reader import ExpertReader, aligned_buffer, expert_views
from adapmoe_cli.store.verify import ensure_files, verify
from adapmoe_cli.store.writer import shard
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import o_direct_allowed

ODD = TinySpec(num_hidden_layers=3, num_local_experts=5, hidden_size=48, intermediate_size=80,
               num_attention_heads=4, num_key_value_heads=1)
PARTS = {"w1", "w2", "w3"}


def _source(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def _expert_name(layer: int, expert: int, part: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".adapmoe-partial-" in p.name or ".adapmoe-replaced-" in p.name]


def _leftover(parent: Path, out: Path, kind: str, pid: int) -> Path:
    """What a killed shard of `out` leaves: a folder with our word in its name and our owner mark."""
    p = parent / f".{out.name}.adapmoe-{kind}-{pid}-0123abcd"
    p.mkdir()
    (p / ".adapmoe-owner").write_text(json.dumps({"pid": pid, "out": str(out)}))
    return p


# --- what shard writes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "store_dtype", "want"),
    [(TinySpec(), "keep", torch.bfloat16), (TinySpec(), "float32", torch.float32), (ODD, "keep", torch.bfloat16)],
    ids=["keep", "float32", "odd-shapes"],
)
def test_manifest_and_expert_bytes_match_the_source(
    make_checkpoint: Callable[..., Path], make_store: Callable[..., Path], spec: TinySpec, store_dtype: str,
    want: torch.dtype,
):
    store_path = make_store(spec, store_dtype=store_dtype)
    src = _source(make_checkpoint(spec))
    m = json.loads((store_path / "manifest.json").read_text())
    dname = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[want]
    assert m["format"] == "adapmoe-store" and m["format_version"] == NATIVE_FORMAT_VERSION  # older adapmoe reads it
    assert m["model_type"] == "mixtral" and m["dtype"] == dname
    assert m["config"]["num_local_experts"] == spec.num_local_experts
    assert m["config"]["num_hidden_layers"] == spec.num_hidden_layers
    assert m["config"]["num_key_value_heads"] == spec.num_key_value_heads
    assert m["config"]["torch_dtype"] == dname

    entries = m["experts"]
    keys = [(e["layer"], e["expert"]) for e in entries]
    assert sorted(keys) == [(la, e) for la in range(spec.num_hidden_layers) for e in range(spec.num_local_experts)]
    h, i = spec.hidden_size, spec.intermediate_size
    want_shapes = {"w1": [i, h], "w3": [i, h], "w2": [h, i]}
    ranges: dict[str, list[tuple[int, int]]] = {}
    for e in entries:
        assert e["offset"] % ALIGNMENT == 0 and e["length"] % ALIGNMENT == 0
        assert e["nbytes"] <= e["length"] < e["nbytes"] + ALIGNMENT
        ranges.setdefault(e["file"], []).append((e["offset"], e["offset"] + e["length"]))
        assert {t["name"] for t in e["tensors"]} == PARTS
        raw = (store_path / e["file"]).read_bytes()[e["offset"] : e["offset"] + e["length"]]
        assert len(raw) == e["length"]
        assert hashlib.sha256(raw[: e["nbytes"]]).hexdigest() == e["sha256"]
        for t in e["tensors"]:
            assert t["shape"] == want_shapes[t["name"]] and t["dtype"] == dname
            assert t["offset"] + t["nbytes"] <= e["nbytes"]
            got = torch.frombuffer(bytearray(raw[t["offset"] : t["offset"] + t["nbytes"]]), dtype=want)
            ref = src.pop(_expert_name(e["layer"], e["expert"], t["name"])).to(want)
            assert torch.equal(got.view(t["shape"]), ref)  # exact, after the same conversion
    for spans in ranges.values():  # no two experts share bytes
        spans.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))

    # what is left of the source is exactly the dense part, stored in the store's dtype
    dense: dict[str, torch.Tensor] = {}
    for f in m["dense"]:
        dense.update(load_file(store_path / f["file"]))
        assert (store_path / f["file"]).stat().st_size == f["bytes"]
    assert set(dense) == set(src) and not any(".experts." in n for n in dense)
    for name, t in src.items():
        assert dense[name].dtype == want and torch.equal(dense[name], t.to(want)), name


def test_side_files_are_copied_and_the_tokenizer_loads_from_the_store(
    make_checkpoint: Callable[..., Path], make_store: Callable[..., Path]
):
    from transformers import AutoTokenizer

    ckpt, store_path = make_checkpoint(), make_store()
    names = {f["file"] for f in json.loads((store_path / "manifest.json").read_text())["side_files"]}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    for n in names:
        assert (store_path / n).read_bytes() == (ckpt / n).read_bytes()
    tok = AutoTokenizer.from_pretrained(str(store_path))
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|user|>\nhello<|end|>\n"


def test_dense_file_is_a_plain_safetensors_file(make_store: Callable[..., Path]):
    store = Store.open(make_store())
    for f in store.dense_files:
        with safe_open(str(store.path / f.file), framework="pt") as st:
            assert "model.embed_tokens.weight" in st.keys()


# --- atomicity and idempotence ------------------------------------------------------------------------


def _fail_nth_write(monkeypatch: pytest.MonkeyPatch, n: int, exc: BaseException) -> list[int]:
    """Make the n-th os.write into a store being built raise `exc`; returns the call counter."""
    real = os.write
    calls = [0]

    def write(fd: int, data: bytes) -> int:
        if "adapmoe-partial-" in os.readlink(f"/proc/self/fd/{fd}"):
            calls[0] += 1
            if calls[0] == n:
                raise exc
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return calls


@pytest.mark.parametrize(
    "exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))], ids=["ctrl-c", "enospc"]
)
def test_interrupted_shard_leaves_nothing_and_can_be_rerun(
    make_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
):
    ckpt, out = make_checkpoint(), tmp_path / "store"
    calls = _fail_nth_write(monkeypatch, 3, exc)
    expected = KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else StoreError
    with pytest.raises(expected) as ei:
        shard(ckpt, out)
    assert calls[0] == 3  # it really stopped in the middle of the experts
    if expected is StoreError:
        assert "No space left on device" in str(ei.value) and "nothing was kept" in str(ei.value)
    assert not out.exists() and not is_store(out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    res = shard(ckpt, out)
    assert not res.reused and verify(Store.open(out)).ok


def test_stale_partial_of_a_dead_run_is_removed_and_a_live_ones_kept(
    make_checkpoint: Callable[..., Path], tmp_path: Path
):
    out = tmp_path / "store"
    dead = _leftover(tmp_path, out, "partial", _dead_pid())
    (dead / "experts").mkdir(parents=True)
    (dead / "experts" / "layer-000.bin").write_bytes(b"\0" * 4096)
    assert not is_store(dead)
    replaced = _leftover(tmp_path, out, "replaced", _dead_pid())  # killed between its two renames
    live = _leftover(tmp_path, out, "partial", 1)  # pid 1 always runs: another shard of the same target
    shard(make_checkpoint(), out)
    assert not dead.exists() and not replaced.exists() and live.exists() and is_store(out)


def test_same_store_is_a_noop_different_needs_force(make_checkpoint: Callable[..., Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    validated = []  # checkpoint.validate builds the model's skeleton (transformers' import: seconds a start)
    real = writer.validate

    def counted(ckpt) -> None:
        validated.append(ckpt.path)
        real(ckpt)

    monkeypatch.setattr(writer, "validate", counted)
    ckpt, out = make_checkpoint(), tmp_path / "store"
    first = shard(ckpt, out)
    assert not first.reused and first.bytes_written > 0 and len(validated) == 1
    manifest = (out / "manifest.json").read_bytes()
    again = shard(ckpt, out)
    assert again.reused and again.bytes_written == 0
    assert (out / "manifest.json").read_bytes() == manifest
    assert len(validated) == 1  # the store made from these unchanged files: not validated again

    with pytest.raises(StoreExistsError, match="already holds a different store; pass --force"):
        shard(ckpt, out, dtype="float32")
    assert len(validated) == 2
    assert Store.open(out).dtype_name == "bfloat16"
    res = shard(ckpt, out, dtype="float32", force=True)
    assert not res.reused and Store.open(out).dtype_name == "float32" and verify(Store.open(out)).ok
    assert _partials(tmp_path) == []


def test_failed_final_rename_keeps_the_previous_store(
    make_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    ckpt, out = make_checkpoint(), tmp_path / "store"
    shard(ckpt, out)
    real = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if "adapmoe-partial-" in str(src):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(StoreError, match="nothing was kept"):
        shard(ckpt, out, dtype="float32", force=True)
    monkeypatch.undo()
    store = Store.open(out)
    assert store.dtype_name == "bfloat16" and verify(store).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_output_folder_holding_something_else_is_refused(make_checkpoint: Callable[..., Path], tmp_path: Path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an adapmoe store"):
        shard(make_checkpoint(), out)
    assert (out / "notes.txt").read_text() == "mine"


# --- reader -------------------------------------------------------------------------------------------


def _record_opens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    real, opened = os.open, []

    def record(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
        opened.append((str(path), flags))
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", record)
    return opened


def _read_all_and_compare(reader: ExpertReader, store: Store, src: dict[str, torch.Tensor]) -> None:
    buf = aligned_buffer(store.slot_bytes)
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    for (layer, expert), entry in sorted(store.experts.items()):
        assert reader.read_into(layer, expert, buf) == entry
        views = expert_views(buf, entry)
        assert set(views) == PARTS
        for part, view in views.items():
            assert base <= view.data_ptr() < base + len(buf)  # a view of the one buffer, not a copy
            assert torch.equal(view, src[_expert_name(layer, expert, part)].to(store.dtype))
    del views, view
    buf.close()


def test_reader_with_o_direct_returns_the_source_tensors(
    make_checkpoint: Callable[..., Path], make_store: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
):
    store = Store.open(make_store(ODD))
    if not o_direct_allowed(store.path):
        pytest.skip("this file system refuses O_DIRECT")
    opened = _record_opens(monkeypatch)
    with ExpertReader(store, direct=True) as reader:
        _read_all_and_compare(reader, store, _source(make_checkpoint(ODD)))
        assert reader.direct
        for fd in reader._fds.values():
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        assert reader.reads == len(store.experts)
        assert reader.bytes_read == sum(e.length for e in store.experts.values())
    expert_opens = [flags for path, flags in opened if "/experts/" in path]
    assert len(expert_opens) == ODD.num_hidden_layers  # one fd per layer file, reused
    assert all(flags & os.O_DIRECT for flags in expert_opens)


def test_reader_without_o_direct_reads_through_the_page_cache_and_drops_it(
    make_checkpoint: Callable[..., Path], make_store: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
):
    store = Store.open(make_store())
    opened = _record_opens(monkeypatch)
    advice: list[int] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, adv: int) -> None:
        advice.append(adv)
        real_fadvise(fd, offset, length, adv)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    with ExpertReader(store, direct=False) as reader:
        _read_all_and_compare(reader, store, _source(make_checkpoint()))
        assert not reader.direct and reader.reads == len(store.experts)
        assert reader.bytes_read == sum(e.length for e in store.experts.values())
    assert all(not flags & os.O_DIRECT for path, flags in opened if "/experts/" in path)
    assert advice == [os.POSIX_FADV_DONTNEED] * len(store.experts)


def test_reader_falls_back_when_the_file_system_refuses_o_direct(
    make_checkpoint: Callable[..., Path], make_store: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
):
    store = Store.open(make_store())
    real = os.open

    def no_direct(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    with ExpertReader(store, direct=True) as reader:
        _read_all_and_compare(reader, store, _source(make_checkpoint()))
        assert not reader.direct and reader.reads == len(store.experts)


def test_reader_reports_a_missing_expert_file(make_store: Callable[..., Path], tmp_path: Path):
    path = shutil.copytree(make_store(), tmp_path / "store")
    (path / "experts" / "layer-001.bin").unlink()
    store = Store.open(path)
    buf = aligned_buffer(store.slot_bytes)
    with ExpertReader(store) as reader, pytest.raises(StoreError, match="layer-001.bin is missing"):
        reader.read_into(1, 0, buf)


# --- verification and format versions ------------------------------------------------------------------


def test_verify_passes_on_a_fresh_store(make_store: Callable[..., Path]):
    store = Store.open(make_store())
    rep = verify(store)
    assert rep.ok and rep.problems == []
    assert rep.bytes_checked == sum(e.nbytes for e in store.experts.values()) + sum(
        f.bytes for f in store.dense_files + store.side_files
    )


def test_the_runtime_checks_expert_bytes_when_it_reads_them_not_a_stamp(
    make_store: Callable[..., Path], tmp_path: Path
):
    path = shutil.copytree(make_store(), tmp_path / "store")
    store = Store.open(path)
    entry = store.experts[(1, 2)]
    target = path / entry.file
    st = target.stat()
    with open(target, "r+b") as f:  # flip one byte inside the payload, same size, same mtime (bit rot)
        f.seek(entry.offset + 5)
        b = f.read(1)
        f.seek(entry.offset + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    ensure_files(store)  # sizes are all right: that is all a start checks
    buf = aligned_buffer(store.slot_bytes)
    with ExpertReader(store) as reader:
        reader.read_into(1, 1, buf)
        assert (1, 1) in store.checked_experts
        with pytest.raises(StoreError, match=r"expert \(1, 2\) in experts/layer-001\.bin is corrupted"):
            reader.read_into(1, 2, buf)
        assert (1, 2) not in store.checked_experts
    buf.close()


def test_newer_format_version_is_refused(make_store: Callable[..., Path], tmp_path: Path):
    path = shutil.copytree(make_store(), tmp_path / "store")
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=rf"newer adapmoe \(store format {FORMAT_VERSION + 1}, .* up to "
                                         rf"{FORMAT_VERSION}\); upgrade adapmoe"):
        Store.open(path)


def test_info_numbers(make_store: Callable[..., Path]):
    spec = TinySpec()
    store = Store.open(make_store(spec))
    info = store.info()
    weight_bytes = 3 * spec.hidden_size * spec.intermediate_size * 2  # bf16; parts are 4096-multiples here
    assert info["expert_payload_bytes"] == info["expert_slot_bytes"] == weight_bytes
    # parts that are not 4096-multiples: each starts aligned; the payload ends with the last part, a slot
    # (one read) is rounded up to the alignment
    odd = Store.open(make_store(TinySpec(hidden_size=48, intermediate_size=40))).info()
    part = 48 * 40 * 2
    assert odd["expert_payload_bytes"] == 2 * 4096 + part and odd["expert_slot_bytes"] == 3 * 4096
    dense = sum((store.path / f.file).stat().st_size for f in store.dense_files)
    assert info["dense_bytes"] == dense
    assert info["total_bytes"] == dense + spec.num_hidden_layers * spec.num_local_experts * weight_bytes


def test_same_shapes_different_weights_is_a_different_store(make_checkpoint, tmp_path):
    """A re-trained checkpoint with identical shapes must not be taken for the store already there."""
    from adapmoe_cli.errors import StoreExistsError
    from adapmoe_cli.store.writer import shard as shard_fn

    out = tmp_path / "store"
    shard_fn(make_checkpoint(TinySpec(), seed=0), out)
    with pytest.raises(StoreExistsError):
        shard_fn(make_checkpoint(TinySpec(), seed=1), out)
    assert shard_fn(make_checkpoint(TinySpec(), seed=0), out).reused
