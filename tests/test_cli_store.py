"""`adapmoe shard | info | verify` at the CLI edge: exit codes, one-line errors without tracebacks (and
with them under `--debug`), what the files end up being. Most cases call `main()` in-process with
`sys.argv` set, which runs the same error translation as the installed script; a few run
`python -m adapmoe_cli` in a subprocess for what only a real process shows (tracebacks, signals)."""

from __future__ import annotations

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
from safetensors.torch import load_file, save_file

from adapmoe_cli.cli.app import main
from adapmoe_cli.errors import CheckpointError
from adapmoe_cli.store import Store, is_store
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import count_shard_runs

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the `adapmoe` entry point in-process; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["adapmoe", *args])
    monkeypatch.setenv("ADAPMOE_DEBUG", "0")  # `--debug` sets it; monkeypatch restores it afterwards
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, ANSI.sub("", out), ANSI.sub("", err)


def run_subprocess(*args: str, prelude: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m adapmoe_cli ARGS`, or with `prelude` run first in the same interpreter."""
    env = {**os.environ, "ADAPMOE_DEBUG": "0", "NO_COLOR": "1"}
    if prelude:
        code = prelude + "\nimport sys\nfrom adapmoe_cli.cli.app import main\nsys.argv[0] = 'adapmoe'\nmain()\n"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "adapmoe_cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# --- bad checkpoints ------------------------------------------------------------------------------------


def _rewrite_shard(ckpt: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load the last shard, let `edit` change its tensors, write it back and update the index."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    fname = sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(ckpt / fname)
    edit(tensors)
    save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != fname}
    index["weight_map"].update({n: fname for n in tensors})
    index_path.write_text(json.dumps(index))


def _last_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("model-*.safetensors"))[-1]


def _set_config(ckpt: Path, **changes: object) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _drop_expert(ckpt: Path) -> None:
    _rewrite_shard(ckpt, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w3.weight"))


def _add_extra(ckpt: Path) -> None:
    def add(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.1.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(96, 64, dtype=torch.bfloat16)

    _rewrite_shard(ckpt, add)


def _truncate(ckpt: Path) -> None:
    f = _last_shard(ckpt)
    os.truncate(f, f.stat().st_size - 1000)


def _corrupt_header(ckpt: Path) -> None:
    f = _last_shard(ckpt)
    with open(f, "r+b") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + hlen // 2)
        fh.write(b"\xff\xfe{{{")


def _header_not_an_object(ckpt: Path) -> None:
    _last_shard(ckpt).write_bytes(struct.pack("<Q", 2) + b"[]")


def _pickle_only(ckpt: Path) -> None:
    state = {}
    for f in ckpt.glob("model-*.safetensors"):
        state.update(load_file(f))
        f.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")


BAD_CHECKPOINTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "llama": (lambda c: _set_config(c, model_type="llama"),
              r"unsupported model family 'llama': adapmoe supports deepseek_v2, .*mixtral"),
    "missing-tensor": (_drop_expert,
                       r"1 tensor\(s\) missing, e\.g\. model\.layers\.1\.block_sparse_moe\.experts\.3\.w3"),
    "extra-tensor": (_add_extra,
                     r"1 unexpected tensor\(s\), e\.g\. model\.layers\.1\.block_sparse_moe\.experts\.4\.w1"),
    "shape": (lambda c: _set_config(c, intermediate_size=128),
              r"experts\.0\.w1\.weight has shape \[96, 64\] but config\.json implies \[128, 64\]"),
    "truncated": (_truncate, r"model-00002-of-00002\.safetensors is truncated .*re-download"),
    "bad-header": (_corrupt_header, r"model-00002-of-00002\.safetensors is not a valid safetensors file"),
    "header-not-object": (_header_not_an_object,
                          r"model-00002-of-00002\.safetensors is not a valid safetensors file \(header is not a JSON"),
    "no-index": (lambda c: (c / "model.safetensors.index.json").unlink(),
                 r"2 safetensors shards but no model\.safetensors\.index\.json"),
    "pickle-only": (_pickle_only, r"holds only pickle weights"),
}


@pytest.fixture
def bad_checkpoint(
    request: pytest.FixtureRequest, make_checkpoint: Callable[..., Path], tmp_path: Path
) -> tuple[Path, str]:
    spoil, message = BAD_CHECKPOINTS[request.param]
    ckpt = shutil.copytree(make_checkpoint(), tmp_path / "ckpt")
    spoil(ckpt)
    return ckpt, message


@pytest.mark.parametrize("bad_checkpoint", list(BAD_CHECKPOINTS), indirect=True)
def test_bad_checkpoint_is_one_line_error(
    bad_checkpoint: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    ckpt, message = bad_checkpoint
    out = tmp_path / "new" / "store"
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(ckpt), str(out))
    assert code == 1
    assert re.search(message, _one_line_error(err)), err
    assert not out.parent.exists()  # nothing made: no store, no partial copy, not even its folder
    # --debug lets the library's exception through, so Python prints its traceback
    monkeypatch.setattr(sys, "argv", ["adapmoe", "--debug", "shard", str(ckpt), str(out)])
    with pytest.raises(CheckpointError, match=message):
        main()


def test_nonexistent_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(tmp_path / "nope"), str(tmp_path / "store"))
    assert code == 1
    assert _one_line_error(err) == f"error: {tmp_path / 'nope'} does not exist"


def test_markup_like_text_in_a_path_is_printed_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    missing = tmp_path / "[bold]ckpt"
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(missing), str(tmp_path / "store"))
    assert code == 1 and _one_line_error(err) == f"error: {missing} does not exist"


def test_usage_errors_exit_2_with_clicks_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    code, _, err = run_cli(monkeypatch, capsys, "verify")  # (info, like chat, defaults to the embedded model)
    assert code == 2 and "Missing argument 'store'" in err and "unexpected" not in err


def test_a_real_process_prints_one_line_and_a_traceback_only_with_debug(
    make_checkpoint: Callable[..., Path], tmp_path: Path
):
    ckpt = shutil.copytree(make_checkpoint(), tmp_path / "ckpt")
    _truncate(ckpt)
    plain = run_subprocess("shard", str(ckpt), str(tmp_path / "store"))
    assert plain.returncode == 1
    assert "is truncated" in _one_line_error(plain.stderr)
    debug = run_subprocess("--debug", "shard", str(ckpt), str(tmp_path / "store"))
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "adapmoe_cli.errors.CheckpointError" in debug.stderr and "is truncated" in debug.stderr
    assert not (tmp_path / "store").exists()


# --- shard through the CLI --------------------------------------------------------------------------------


def test_shard_existing_store_rules(
    make_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    ckpt, out = str(make_checkpoint()), tmp_path / "store"
    code, stdout, _ = run_cli(monkeypatch, capsys, "shard", ckpt, str(out))
    assert code == 0 and f"wrote {out}" in stdout and is_store(out)
    code, stdout, _ = run_cli(monkeypatch, capsys, "shard", ckpt, str(out))
    assert code == 0 and "already holds this store; nothing to do" in stdout
    code, _, err = run_cli(monkeypatch, capsys, "shard", ckpt, str(out), "--dtype", "float32")
    assert code == 1 and "already holds a different store; pass --force" in _one_line_error(err)
    assert Store.open(out).dtype_name == "bfloat16"
    code, stdout, _ = run_cli(monkeypatch, capsys, "shard", ckpt, str(out), "--dtype", "float32", "--force")
    assert code == 0 and f"wrote {out}" in stdout and Store.open(out).dtype_name == "float32"
    code, _, err = run_cli(monkeypatch, capsys, "shard", ckpt, str(out), "--dtype", "int4")
    assert code == 2 and "unknown --dtype 'int4'" in _one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]



def test_a_store_copied_into_a_folder_of_the_users_is_refused_before_anything_is_exported(
    make_store: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    """`shard STORE OUT` exported the whole store to a checkpoint beside OUT (for a real model, its ~93 GB)
    and only then refused an OUT that is not a store; and said it was "building the variant of NAME ()".
    Now the folder is checked first; a plain copy says so."""
    from adapmoe_cli.store import export

    exports = []
    real = export.export_checkpoint
    monkeypatch.setattr(export, "export_checkpoint", lambda *a, **k: exports.append(a[1]) or real(*a, **k))
    store, mine = make_store(TinySpec(), dtype=torch.float32), tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, _, err = run_cli(monkeypatch, capsys, "shard", str(store), str(mine))
    assert code == 1 and f"{mine} exists and is not an adapmoe store" in _one_line_error(err)
    assert exports == [] and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    code, stdout, _ = run_cli(monkeypatch, capsys, "shard", str(store), str(tmp_path / "copy"))
    said = " ".join(stdout.split())
    assert code == 0 and f"copying {store.name} to {tmp_path / 'copy'}" in said and len(exports) == 1


# Runs before main() in the child: the n-th write into the half-built store fails (or kills the process).
_FAIL_NTH_WRITE = """
import errno, os, signal
_real, _calls = os.write, [0]
def _write(fd, data):
    if "adapmoe-partial-" in os.readlink(f"/proc/self/fd/{fd}"):
        _calls[0] += 1
        if _calls[0] == 3:
            ACTION
    return _real(fd, data)
os.write = _write
"""


def test_disk_full_is_one_line_and_leaves_nothing(make_checkpoint: Callable[..., Path], tmp_path: Path):
    out = tmp_path / "out" / "store"
    prelude = _FAIL_NTH_WRITE.replace("ACTION", "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))")
    res = run_subprocess("shard", str(make_checkpoint()), str(out), prelude=prelude)
    assert res.returncode == 1
    line = _one_line_error(res.stderr)
    assert "No space left on device" in line and "nothing was kept" in line
    assert list(out.parent.iterdir()) == []


def test_killed_shard_leaves_no_store_and_the_next_run_cleans_up(
    make_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    ckpt, out = str(make_checkpoint()), tmp_path / "store"
    prelude = _FAIL_NTH_WRITE.replace("ACTION", "os.kill(os.getpid(), signal.SIGKILL)")
    res = run_subprocess("shard", ckpt, str(out), prelude=prelude)
    assert res.returncode == -9
    assert not out.exists()
    (partial,) = tmp_path.glob(".store.adapmoe-partial-*")  # what a hard kill leaves: hidden, and not a store
    assert any(partial.rglob("*.bin"))
    assert not is_store(partial)
    code, stdout, _ = run_cli(monkeypatch, capsys, "shard", ckpt, str(out))
    assert code == 0 and f"wrote {out}" in stdout
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    code, _, _ = run_cli(monkeypatch, capsys, "verify", str(out))
    assert code == 0


def test_a_checkpoint_folder_is_sharded_into_home_on_first_use_and_reused(
    make_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    """`eval CHECKPOINT_FOLDER`: the first use shards into ADAPMOE_HOME (one shard run), the second uses
    that store (no run); both score the same."""
    runs = count_shard_runs(monkeypatch)
    ckpt = str(make_checkpoint())
    args = ("eval", ckpt, "--tokens", "40", "--window", "16", "--json")
    code, first, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert len(runs) == 1 and runs[0].parent == tmp_path / "adapmoe-home" / "stores" and is_store(runs[0])
    code, second, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert len(runs) == 1 and json.loads(second)["perplexity"] == json.loads(first)["perplexity"]


# --- info ------------------------------------------------------------------------------------------------


def test_info_json_and_table(make_store: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]):
    spec = TinySpec()
    path = make_store(spec, store_dtype="float32")
    code, stdout, _ = run_cli(monkeypatch, capsys, "info", str(path), "--json")
    assert code == 0
    data = json.loads(stdout)
    expert = 3 * spec.hidden_size * spec.intermediate_size * 4  # float32; every part a 4096 multiple
    dense_files = json.loads((path / "manifest.json").read_text())["dense"]
    dense = sum((path / f["file"]).stat().st_size for f in dense_files)
    assert {k: data[k] for k in ("model_type", "num_layers", "num_experts", "experts_per_token",
                                 "expert_payload_bytes", "expert_slot_bytes", "dense_bytes", "total_bytes",
                                 "dtype")} == {
        "model_type": "mixtral", "num_layers": spec.num_hidden_layers, "num_experts": spec.num_local_experts,
        "experts_per_token": spec.num_experts_per_tok, "expert_payload_bytes": expert, "expert_slot_bytes": expert,
        "dense_bytes": dense,
        "total_bytes": dense + spec.num_hidden_layers * spec.num_local_experts * expert, "dtype": "float32",
    }
    code, stdout, _ = run_cli(monkeypatch, capsys, "info", str(path))
    assert code == 0
    assert re.search(r"^\s*model_type\s+mixtral\s*$", stdout, re.M)
    assert re.search(rf"^\s*expert_payload_bytes\s+.*\({expert:,} B\)\s*$", stdout, re.M)
    assert re.search(r"^\s*dtype\s+float32\s*$", stdout, re.M)


def test_info_refuses_a_newer_format(make_store: Callable[..., Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    path = shutil.copytree(make_store(), tmp_path / "store")
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(monkeypatch, capsys, "info", str(path))
    assert code == 1 and "written by a newer adapmoe (store format 99" in _one_line_error(err)


def test_info_on_a_folder_that_is_not_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]):
    code, _, err = run_cli(monkeypatch, capsys, "info", str(tmp_path))  # MODEL, as every command takes it
    assert code == 2 and "is neither an adapmoe store nor a checkpoint folder" in _one_line_error(err)


# --- verify ----------------------------------------------------------------------------------------------


def _flip_expert_byte(store: Path) -> None:
    e = Store.open(store).experts[(1, 3)]
    with open(store / e.file, "r+b") as f:
        f.seek(e.offset + e.nbytes // 2)
        b = f.read(1)
        f.seek(e.offset + e.nbytes // 2)
        f.write(bytes([b[0] ^ 0x01]))


def _truncate_expert_file(store: Path) -> None:
    f = store / "experts" / "layer-001.bin"
    os.truncate(f, f.stat().st_size - 4096)


def _corrupt_tokenizer(store: Path) -> None:
    f = store / "tokenizer.json"
    f.write_text(f.read_text().replace("<unk>", "<UNK>", 1))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "expert-byte": (_flip_expert_byte, r"expert \(1, 3\) in experts/layer-001\.bin is corrupted"),
    "truncated-experts": (_truncate_expert_file, r"experts/layer-001\.bin is truncated"),
    "missing-dense": (lambda s: (s / "dense-00001.safetensors").unlink(), r"dense-00001\.safetensors is missing"),
    "tokenizer": (_corrupt_tokenizer, r"tokenizer\.json is corrupted"),
}


def test_verify_ok(make_store: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]):
    code, stdout, err = run_cli(monkeypatch, capsys, "verify", str(make_store()))
    assert code == 0 and stdout.startswith("ok: 8 experts and 1 dense files") and err == ""


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_names_the_damage(make_store: Callable[..., Path], tmp_path: Path, damage: str,
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    spoil, message = DAMAGE[damage]
    path = shutil.copytree(make_store(), tmp_path / "store")
    spoil(path)
    code, _, err = run_cli(monkeypatch, capsys, "verify", str(path))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and re.search(message, lines[0]) and lines[0].startswith("bad: ")
    assert lines[1].startswith("error: 1 problem(s)") and "Traceback" not in err
