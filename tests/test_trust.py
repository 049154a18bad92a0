"""A store, and everything a user hands adapmoe, is untrusted input (issue #19): what is loaded is checked,
what is read stays inside its folder, nothing from a store runs, nothing is written through a link, and
every bad input ends in one typed line. One test per defect found by the hostile-input sweep; each fails on
the code before the fix (see the report of #19) and passes now. Stores are copied before they are spoilt."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapmoe_cli.cli.app import main
from adapmoe_cli.errors import AdapmoeError, CheckpointError, ProfileError, StoreError
from adapmoe_cli.store import Store
from adapmoe_cli.store.verify import verify
from adapmoe_cli.store.writer import shard
from adapmoe_cli.synthetic import TinySpec

# every expert is used by every token: a damaged expert is met by the first forward pass
ALL = TinySpec(num_local_experts=4, num_experts_per_tok=4)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The `adapmoe` entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["adapmoe", *args])
    monkeypatch.setenv("ADAPMOE_DEBUG", "0")
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, ANSI.sub("", out), ANSI.sub("", err)


def run_process(*args: str, input: bytes | None = None, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "adapmoe_cli", *args], capture_output=True, input=input,
                          env={**os.environ, "ADAPMOE_DEBUG": "0", "NO_COLOR": "1", **(env or {})}, timeout=180)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


def copy_store(make_store: Callable[..., Path], tmp_path: Path, spec: TinySpec = TinySpec()) -> Path:
    return Path(shutil.copytree(make_store(spec, dtype=torch.float32), tmp_path / "store"))


def edit_manifest(store: Path, edit: Callable[[dict], object]) -> None:
    """Change the manifest and re-seal it as a writer would (an attacker's store passes every checksum)."""
    m = json.loads((store / "manifest.json").read_text())
    edit(m)
    reseal(store, m)


def reseal(store: Path, m: dict) -> None:
    for f in m.get("dense", []) + m.get("side_files", []):
        p = store / f["file"]
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    try:
        from adapmoe_cli.store.manifest import manifest_digest
    except ImportError:  # the code before the fix has no manifest checksum
        manifest_digest = None
    if manifest_digest is not None and "manifest_sha256" in m:
        m["manifest_sha256"] = manifest_digest(m)
    (store / "manifest.json").write_text(json.dumps(m))


def flip(path: Path, offset: int, keep_mtime: bool = True) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


# --- expert bytes are checked when loaded --------------------------------------------------------------


def test_bit_rot_in_an_expert_with_its_mtime_kept_is_refused_before_the_first_token(make_store, tmp_path):
    store = copy_store(make_store, tmp_path, ALL)
    e = Store.open(store).experts[(1, 2)]
    flip(store / e.file, e.offset + 1000)  # same size, same mtime: `cp -a` of a rotten disk
    r = run_process("chat", str(store), "-p", "hello", "-n", "4", "-c", "8", "--json")
    assert r.returncode == 1 and r.stdout == b""
    line = one_line(r.stderr.decode())
    assert "expert (1, 2) in experts/layer-001.bin is corrupted" in line


def test_bit_rot_in_the_padding_after_an_expert_is_refused(make_store, tmp_path):
    spec = TinySpec(hidden_size=48, intermediate_size=40, num_local_experts=4, num_experts_per_tok=4)
    store = copy_store(make_store, tmp_path, spec)
    e = Store.open(store).experts[(0, 1)]
    assert e.length > e.nbytes
    flip(store / e.file, e.offset + e.nbytes + 7)
    rep = verify(Store.open(store))
    assert rep.problems == ["expert (0, 1) in experts/layer-000.bin is corrupted (non-zero padding)"]


# --- nothing is written in a store, and never through a link ------------------------------------------


def test_a_planted_stamp_link_is_never_written_through(make_store, tmp_path, monkeypatch, capsys):
    store = copy_store(make_store, tmp_path)
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    (store / ".verified.json").unlink(missing_ok=True)
    (store / ".verified.json").symlink_to(precious)
    code, out, err = run_cli(monkeypatch, capsys, "verify", str(store))
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "chat", str(store), "-p", "hi", "-n", "2", "--json")
    assert code == 0, err
    assert precious.read_text() == "mine"


def test_a_store_is_used_and_verified_without_writing_to_it(make_store, tmp_path, monkeypatch, capsys):
    """What a read-only store (a mount, a share) needs: no stamp, no temporary file, nothing."""
    store = copy_store(make_store, tmp_path)
    (store / ".verified.json").unlink(missing_ok=True)
    before = snapshot(store)
    code, _, err = run_cli(monkeypatch, capsys, "verify", str(store))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "chat", str(store), "-p", "hi", "-n", "2", "--json")
    assert code == 0, err
    assert snapshot(store) == before


def test_a_store_on_a_read_only_file_system_works(make_store, tmp_path, monkeypatch, capsys):
    store = copy_store(make_store, tmp_path)
    (store / ".verified.json").unlink(missing_ok=True)
    real_open = os.open

    def read_only(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
        if str(path).startswith(str(store)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    import builtins
    import io

    real_builtin_open = builtins.open

    def ro_builtin(file, mode="r", *args, **kw):  # type: ignore[no-untyped-def]
        if str(file).startswith(str(store)) and any(c in mode for c in "wax+"):
            raise OSError(30, "Read-only file system", str(file))
        return real_builtin_open(file, mode, *args, **kw)

    monkeypatch.setattr(builtins, "open", ro_builtin)
    monkeypatch.setattr(io, "open", ro_builtin)  # what pathlib's write_text calls
    code, _, err = run_cli(monkeypatch, capsys, "verify", str(store))
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "chat", str(store), "-p", "hi", "-n", "2", "--json")
    assert code == 0, err


def test_writing_a_plan_never_follows_a_planted_link(make_store, tmp_path):
    from adapmoe_cli.planning.plan_file import write_plan

    folder = tmp_path / "shared"
    folder.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    # the temporary names the old writer used, planted as links; and the target itself a link
    (folder / f".plan.json.tmp-{os.getpid()}").symlink_to(precious)
    (folder / "plan.json").symlink_to(tmp_path / "other.txt")
    write_plan(folder / "plan.json", {"budget_slots": 4})
    assert precious.read_text() == "mine" and not (tmp_path / "other.txt").exists()
    assert not (folder / "plan.json").is_symlink()
    assert json.loads((folder / "plan.json").read_text())["budget_slots"] == 4


# --- no code from a store ever runs -------------------------------------------------------------------


def test_a_tokenizer_asking_for_its_own_code_is_refused_and_the_code_never_runs(make_store, tmp_path):
    store = copy_store(make_store, tmp_path)
    marker = tmp_path / "ran.txt"
    (store / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    cfg = json.loads((store / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    (store / "tokenizer_config.json").write_text(json.dumps(cfg))
    edit_manifest(store, lambda m: None)
    r = run_process("chat", str(store), "-p", "hi", "-n", "2", "--json", input=b"y\n")  # a "yes" waiting on stdin
    assert not marker.exists()
    assert r.returncode == 1 and r.stdout == b""  # no [y/N] prompt in --json's stdout
    assert "never runs code from a store" in one_line(r.stderr.decode())


def test_files_the_manifest_does_not_list_are_not_used(make_store, tmp_path):
    from adapmoe_cli.conversation import load_tokenizer

    store = copy_store(make_store, tmp_path)
    (store / "chat_template.jinja").write_text("EVIL {{ messages }}")
    edit_manifest(store, lambda m: m.update(side_files=[f for f in m["side_files"]
                                                         if f["file"] != "chat_template.jinja"]))
    tok = load_tokenizer(Store.open(store))
    assert "EVIL" not in str(getattr(tok, "chat_template", None))


def test_a_side_file_the_format_does_not_know_is_refused(make_store, tmp_path):
    store = copy_store(make_store, tmp_path)
    (store / "tokenization_evil.py").write_text("raise SystemExit('ran')\n")
    edit_manifest(store, lambda m: m["side_files"].append({"file": "tokenization_evil.py", "bytes": 0, "sha256": ""}))
    with pytest.raises(StoreError, match="side files can only be"):
        Store.open(store)


# --- the manifest is checked whole --------------------------------------------------------------------


@pytest.mark.parametrize("spoil,needle", [
    (lambda m: m["experts"].pop(13), r"lists 15 experts, the config implies 2 MoE layers × 8 = 16"),
    (lambda m: m["experts"].__setitem__(13, dict(m["experts"][12])), r"expert \(1, 4\) is listed twice"),
    (lambda m: m["experts"][13]["tensors"][0]["shape"].reverse(), r"expert \(1, 5\): its tensors differ"),
    (lambda m: m["experts"][13].update(offset=m["experts"][13]["offset"] + 512), r"not 4096-aligned"),
    (lambda m: m["experts"][13].update(layer=7), r"expert \(7, 5\) is not one of this model's experts"),
    (lambda m: m.update(experts=[]), r"lists 0 experts"),
    (lambda m: m["config"].update(num_local_experts="8"), r"num_local_experts must be an integer"),
], ids=["dropped", "twice", "layout", "offset", "layer", "empty", "config-type"])
def test_an_incomplete_or_inconsistent_manifest_is_refused_by_verify_and_info(
    make_store, tmp_path, monkeypatch, capsys, spoil, needle
):
    store = copy_store(make_store, tmp_path, TinySpec(num_local_experts=8))
    edit_manifest(store, spoil)
    for cmd in ("verify", "info"):
        code, out, err = run_cli(monkeypatch, capsys, cmd, str(store))
        assert code == 1 and out == ""
        assert re.search(needle, one_line(err)), err


def test_bit_rot_in_the_manifest_is_refused(make_store, tmp_path):
    store = copy_store(make_store, tmp_path)
    text = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-04', 1))
    with pytest.raises(StoreError, match=r"manifest.json is damaged: its checksum does not match"):
        Store.open(store)


# --- paths stay inside the store; sizes and nesting are capped ----------------------------------------


def test_manifest_paths_that_leave_the_store_are_refused_without_a_look(make_store, tmp_path, monkeypatch, capsys):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 12345)
    for name in ("../outside.bin", str(outside)):
        store = copy_store(make_store, tmp_path)
        edit_manifest(store, lambda m, name=name: m["experts"][0].update(file=name))
        code, _, err = run_cli(monkeypatch, capsys, "verify", str(store))
        line = one_line(err)
        assert code == 1 and "a path outside its folder" in line and "12345" not in line
        shutil.rmtree(store)


def test_a_link_that_leads_out_of_the_store_is_refused(make_store, tmp_path, monkeypatch, capsys):
    store = copy_store(make_store, tmp_path)
    target = store / "experts" / "layer-001.bin"
    outside = tmp_path / "elsewhere.bin"
    shutil.move(target, outside)
    target.symlink_to(outside)
    code, _, err = run_cli(monkeypatch, capsys, "chat", str(store), "-p", "hi", "-n", "2", "--json")
    assert code == 1 and "is a link that leads outside" in one_line(err)


def test_index_entries_that_leave_the_checkpoint_are_refused(make_checkpoint, tmp_path):
    ckpt = Path(shutil.copytree(make_checkpoint(), tmp_path / "ckpt"))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    shutil.copy(ckpt / index["weight_map"][name], tmp_path / "stolen.safetensors")
    index["weight_map"][name] = "../stolen.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="a path outside its folder"):
        shard(ckpt, tmp_path / "out")


def test_an_oversized_manifest_is_refused_unread(make_store, tmp_path, monkeypatch, capsys):
    store = copy_store(make_store, tmp_path)
    edit_manifest(store, lambda m: m.update(created_by="x" * (70 << 20)))
    code, out, err = run_cli(monkeypatch, capsys, "info", str(store))
    assert code == 1 and "more than the 67,108,864 adapmoe reads" in one_line(err)


def test_deeply_nested_json_is_one_line(make_store, tmp_path, monkeypatch, capsys):
    store = copy_store(make_store, tmp_path)
    m = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(m[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, _, err = run_cli(monkeypatch, capsys, "info", str(store))
    assert code == 1 and "nests deeper than" in one_line(err)


# --- plans and profiles: contents checked in their readers ---------------------------------------------


def _plan(store: Store, **over: object) -> dict:
    layers = [{"layer": la, "slots": 2, "threshold": 0.1, "cost_curve": [1.0, 0.5, 0.2, 0.0], "expected_cost": 0.5}
              for la in store.shape.moe_layers]
    return {"format": "adapmoe-plan", "format_version": 1, "model": {"fingerprint": store.fingerprint},
            "budget_slots": 2 * len(layers), "gate_rule": "paper", "gate_scale": 0.01, "layers": layers,
            "total_expected_cost": 1.0, **over}


@pytest.mark.parametrize("spoil,needle", [
    (lambda p: p["layers"][0].update(slots=99), r"slots = 99 is outside 1…4"),
    (lambda p: p["layers"][0].update(slots="2"), r"slots must be an integer"),
    (lambda p: p["layers"][0].update(slots=True), r"slots must be an integer"),
    (lambda p: p["layers"][0].update(threshold=float("nan")), r"threshold must be a finite number"),
    (lambda p: p["layers"][0].update(threshold=float("inf")), r"threshold must be a finite number"),
    (lambda p: p["layers"][0].update(threshold=-0.5), r"threshold = -0.5 is outside"),
    (lambda p: p["layers"][0].update(threshold="0.1"), r"threshold must be a finite number"),
    (lambda p: p["layers"].pop(), r"does not list this model's MoE layers"),
    (lambda p: p["layers"].append(dict(p["layers"][0])), r"does not list this model's MoE layers"),
    (lambda p: p.update(budget_slots=3), r"slots add up to 4, not its budget_slots 3"),
    (lambda p: p.update(gate_scale=float("nan")), r"gate_scale must be a finite number"),
    (lambda p: p.update(format_version=0), r"no valid format_version"),
], ids=["slots-big", "slots-str", "slots-bool", "nan", "inf", "negative", "threshold-str", "layer-missing",
        "layer-twice", "sum", "scale-nan", "version-0"])
def test_a_malformed_plan_is_refused_with_the_field_named(make_store, tmp_path, spoil, needle):
    from adapmoe_cli.planning.plan_file import read_plan

    store = Store.open(make_store(TinySpec(), dtype=torch.float32))
    plan = _plan(store)
    spoil(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(ProfileError, match=needle):
        read_plan(path, store)


def _profile(store: Store) -> dict:
    layers = [{"layer": la, "sensitivity": 0.5, "predicted_drop_loss": 0.01, "mean_second_weight_sq": 0.04}
              for la in store.shape.moe_layers]
    return {"format": "adapmoe-profile", "format_version": 1,
            "model": {"model_type": "mixtral", "fingerprint": store.fingerprint, "num_moe_layers": len(layers),
                      "num_experts": store.shape.num_experts, "top_k": store.shape.top_k},
            "method": "forward", "layers": layers,
            "trace": {"file": "profile.trace.safetensors", "sha256": "0" * 64, "tokens": 0}}


@pytest.mark.parametrize("spoil,needle", [
    (lambda p: p["layers"][1].update(sensitivity=float("nan")), r"layer 1 sensitivity must be a finite number"),
    (lambda p: p["layers"][1].update(sensitivity="high"), r"layer 1 sensitivity must be a finite number"),
    (lambda p: p["layers"][0].update(mean_second_weight_sq=-1), r"mean_second_weight_sq = -1 is outside"),
    (lambda p: p["layers"].reverse(), r"listed once each, in order"),
    (lambda p: p["layers"].pop(), r"does not list this model's MoE layers"),
    (lambda p: p.update(layers="all"), r"layers must be a non-empty list"),
    (lambda p: p["trace"].update(file="../../etc/passwd"), r"a path outside its folder"),
    (lambda p: p["model"].update(top_k=9), r"top_k = 9 is outside"),
], ids=["nan", "string", "negative", "order", "missing", "not-a-list", "trace-path", "top-k"])
def test_a_malformed_profile_is_refused_with_the_field_named(make_store, tmp_path, spoil, needle):
    from adapmoe_cli.profiling.profile_file import read_profile

    store = Store.open(make_store(TinySpec(), dtype=torch.float32))
    prof = _profile(store)
    spoil(prof)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    with pytest.raises(ProfileError, match=needle):
        read_profile(path, store)


# --- text that is not UTF-8 -------------------------------------------------------------------------------


def test_a_prompt_on_stdin_that_is_not_utf8_is_answered(make_store):
    store = make_store(TinySpec(), dtype=torch.float32)
    r = run_process("chat", str(store), "-n", "3", "--json", input=b"\xff\xfehello caf\xe9\n")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 3


def test_clean_text_replaces_what_is_not_utf8():
    from adapmoe_cli.conversation import clean_text

    assert clean_text("plain é") == "plain é"
    assert clean_text("caf\udce9") == "caf\ufffd"  # a Latin-1 byte as Python's surrogateescape keeps it
    assert clean_text("a\ud800b").encode("utf-8")  # any lone surrogate


# --- a changed checkpoint is never mistaken for the store already made ----------------------------------


BIG = TinySpec(num_hidden_layers=2, num_local_experts=8, hidden_size=256, intermediate_size=512)


def _middle_byte(ckpt: Path) -> tuple[Path, int]:
    """A byte of an expert tensor more than 1 MiB from both ends of its file."""
    from adapmoe_cli.checkpoint import open_checkpoint

    c = open_checkpoint(ckpt)
    for t in c.tensors.values():
        size = t.file.stat().st_size
        if ".experts." in t.name and t.offset > 1 << 20 and t.offset + t.nbytes < size - (1 << 20):
            return t.file, t.offset + t.nbytes // 2
    raise AssertionError("no tensor in the middle of a file")


def test_a_checkpoint_resaved_with_different_middle_bytes_is_not_reused(make_checkpoint, tmp_path):
    from adapmoe_cli.errors import StoreExistsError

    ckpt = Path(shutil.copytree(make_checkpoint(BIG, dtype=torch.float32, shards=1), tmp_path / "ckpt"))
    out = tmp_path / "store"
    shard(ckpt, out)
    assert shard(ckpt, out).reused
    path, offset = _middle_byte(ckpt)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))  # re-saved: same shapes, same size, one weight changed
    with pytest.raises(StoreExistsError, match="already holds a different store"):
        shard(ckpt, out)


def test_the_reuse_check_is_cheap_when_nothing_changed_and_exact_when_something_did(
    make_checkpoint, tmp_path, monkeypatch
):
    from adapmoe_cli.checkpoint import Checkpoint

    ckpt = Path(shutil.copytree(make_checkpoint(), tmp_path / "ckpt"))
    out = tmp_path / "store"
    shard(ckpt, out)
    real = Checkpoint.digests
    reads: list[int] = []
    monkeypatch.setattr(Checkpoint, "digests", lambda self: (reads.append(1), real(self))[1])
    assert shard(ckpt, out).reused and reads == []  # stat + sampled blocks only
    shard_file = sorted(ckpt.glob("model-*.safetensors"))[0]
    os.utime(shard_file)  # touched, same bytes: read in full once, then the new stat is recorded
    assert shard(ckpt, out).reused and reads == [1]
    assert shard(ckpt, out).reused and reads == [1]


def test_a_changed_checkpoint_folder_gets_a_fresh_store_under_adapmoe_home(make_checkpoint, tmp_path):
    from adapmoe_cli.model_arg import open_model

    ckpt = Path(shutil.copytree(make_checkpoint(BIG, dtype=torch.float32, shards=1), tmp_path / "ckpt"))
    first = open_model(str(ckpt))
    path, offset = _middle_byte(ckpt)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    second = open_model(str(ckpt))
    assert second.path == first.path and second.fingerprint != first.fingerprint


# --- checkpoints -------------------------------------------------------------------------------------------


def _safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry,needle", [
    ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "unreadable header entry"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "ends before it starts"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "unreadable header entry"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, "unreadable header entry"),
], ids=["negative-offset", "backwards", "negative-shape", "float-offset"])
def test_bad_safetensors_header_entries_are_refused(tmp_path, entry, needle):
    from adapmoe_cli.checkpoint import read_safetensors_header

    path = tmp_path / "model.safetensors"
    _safetensors(path, {"w": entry}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=needle):
        read_safetensors_header(path)


def test_overlapping_tensors_are_refused(tmp_path):
    from adapmoe_cli.checkpoint import read_safetensors_header

    path = tmp_path / "model.safetensors"
    _safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match="overlap"):
        read_safetensors_header(path)


# --- shard owns what it deletes -----------------------------------------------------------------------------


def test_shard_leaves_sibling_folders_it_did_not_make(make_checkpoint, tmp_path):
    out = tmp_path / "store"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = [tmp_path / f".store.old-{dead.pid}", tmp_path / f".store.partial-{dead.pid}",
            tmp_path / f".store.adapmoe-partial-{dead.pid}-beef"]  # the last: our word, but no owner mark
    for p in mine:
        p.mkdir()
        (p / "notes.txt").write_text("mine")
    shard(make_checkpoint(), out)
    assert all((p / "notes.txt").read_text() == "mine" for p in mine)


# --- every bad input is one typed line -------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--seed", str(10**23)], "--seed must be between 0 and 2**63 - 1"),
    (["--top-p", "nan"], "top_p must be a finite number"),
], ids=["nan-temperature", "inf-temperature", "huge-seed", "nan-top-p"])
def test_bad_generation_flags_are_one_line(make_store, monkeypatch, capsys, args, needle):
    store = make_store(TinySpec(), dtype=torch.float32)
    code, out, err = run_cli(monkeypatch, capsys, "chat", str(store), "-p", "hi", "-n", "2", *args)
    assert code != 0 and out == ""
    assert needle in one_line(err)


@pytest.mark.parametrize("preset,needle", [
    ("generation: {top_k: many}", "top_k must be int"),
    ("generation: {seed: 1e23}", "seed must be int"),
    ("generation: {temperature: .nan}", "temperature must be a finite number"),
    ("prefetch: 'no'", "prefetch must be bool"),
    ("cache: 5", "cache must be a mapping"),
    ("generation: [1, 2]", "generation must be a mapping"),
    ("gate: {scale: -.inf}", "scale must be a finite number or null"),
    ("a: " + "[" * 5000 + "]" * 5000, "nests too deeply"),
], ids=["string-int", "float-seed", "nan", "string-bool", "int-section", "list-section", "inf", "deep"])
def test_bad_presets_are_one_line(make_store, tmp_path, monkeypatch, capsys, preset, needle):
    store = make_store(TinySpec(), dtype=torch.float32)
    cfg = tmp_path / "preset.yaml"
    cfg.write_text(preset)
    code, out, err = run_cli(monkeypatch, capsys, "chat", str(store), "-p", "hi", "-n", "2", "--config", str(cfg))
    assert code != 0 and out == ""
    assert needle in one_line(err)


def test_a_preset_that_is_not_utf8_is_one_line(make_store, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "preset.yaml"
    cfg.write_bytes(b"generation: {seed: \xff}\n")
    code, _, err = run_cli(monkeypatch, capsys, "chat", str(make_store()), "-p", "hi", "--config", str(cfg))
    assert code != 0 and "is not UTF-8 text" in one_line(err)


@pytest.mark.parametrize("content,needle", [
    ("name: x\nlink_GBps: .nan\nmemory_GBps: 10\n", "must be finite numbers"),
    ("name: x\nlink_GBps: 1\nmemory_GBps: 10\nchannels: 1e30\n", "channels must be an integer"),
    (b"name: \xff\n", "is not UTF-8 text"),
], ids=["nan", "huge-channels", "latin1"])
def test_bad_hardware_files_are_one_line(tmp_path, content, needle):
    from adapmoe_cli.simulate.hardware import load_hardware

    path = tmp_path / "hw.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AdapmoeError, match=needle):
        load_hardware(str(path))


def test_adapmoe_home_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("ADAPMOE_HOME", str(home))
    code, _, err = run_cli(monkeypatch, capsys, "chat", "-p", "hi", "-n", "2")
    assert code == 1 and "ADAPMOE_HOME" in one_line(err)


def test_store_config_values_of_the_wrong_type_are_one_line(make_store, tmp_path, monkeypatch, capsys):
    store = copy_store(make_store, tmp_path)
    edit_manifest(store, lambda m: m["config"].update(rms_norm_eps="tiny", hidden_act=7))
    code, out, err = run_cli(monkeypatch, capsys, "chat", str(store), "-p", "hi", "-n", "2", "--json")
    assert code == 1 and out == ""
    one_line(err)


def test_a_damaged_dense_file_is_refused_when_loaded(make_store, tmp_path):
    store = copy_store(make_store, tmp_path)
    s = Store.open(store)
    flip(store / s.dense_files[0].file, 100)
    with pytest.raises(StoreError, match=r"dense-00001.safetensors is corrupted"):
        s.load_dense()


def test_a_truncated_store_file_replaced_by_a_fifo_does_not_hang(make_store, tmp_path, monkeypatch, capsys):
    store = copy_store(make_store, tmp_path)
    (store / "experts" / "layer-001.bin").unlink()
    os.mkfifo(store / "experts" / "layer-001.bin")
    code, _, err = run_cli(monkeypatch, capsys, "chat", str(store), "-p", "hi", "-n", "2", "--json")
    assert code == 1 and "not a regular file" in one_line(err)


def test_a_system_message_that_is_not_utf8_is_used(make_store, monkeypatch, capsys):
    store = make_store(TinySpec(), dtype=torch.float32)
    code, out, err = run_cli(monkeypatch, capsys, "chat", str(store), "-p", "hi", "-n", "2", "--json",
                             "--system", "sys\udcff")  # how Python passes a non-UTF-8 argv byte
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 2


def test_a_text_file_that_is_a_folder_is_one_line(make_store, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(make_store()), "--text", str(tmp_path))
    assert code != 0 and "cannot be read" in one_line(err)


def test_a_preset_key_yaml_reads_as_a_boolean_is_one_line(make_store, tmp_path, monkeypatch, capsys):
    """Found by the fuzzer: YAML 1.1 reads the key `on:` as True, beside string keys."""
    cfg = tmp_path / "preset.yaml"
    cfg.write_text("prefetch: false\non:\n  temperature: 0.7\n")
    code, _, err = run_cli(monkeypatch, capsys, "chat", str(make_store()), "-p", "hi", "--config", str(cfg))
    assert code != 0 and "unknown setting True" in one_line(err)
