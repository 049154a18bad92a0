"""`--device` and `--config FILE` at the command line (`eval`, in-process): CUDA is refused with its
message whether it comes from the flag or from a config file, a config file's settings take effect, flags
win over them, and a bad or missing file is one line naming the problem (usage errors: exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapmoe_cli.synthetic import TinySpec
from tests.test_cli_store import _one_line_error, run_cli

CUDA = "error: the CUDA path is not in this build yet (it has not been verified on a GPU); use --device cpu"


@pytest.fixture
def evaluate(make_store, monkeypatch, capsys):
    store = str(make_store(TinySpec(), dtype=torch.float32))

    def run(*args: str) -> tuple[int, str, str]:
        return run_cli(monkeypatch, capsys, "eval", store, "--tokens", "24", "--window", "16", "--json", *args)

    return run


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return str(path)


def test_cuda_is_refused_from_the_flag_and_from_a_config_file(evaluate, tmp_path):
    code, out, err = evaluate("--device", "cuda")
    assert code == 2 and out == "" and _one_line_error(err) == CUDA
    preset = _config(tmp_path, "device: cuda\n")
    code, out, err = evaluate("--config", preset)
    assert code == 2 and out == "" and _one_line_error(err) == CUDA
    code, out, err = evaluate("--config", preset, "--device", "cpu")  # the flag wins over the file
    assert code == 0, err
    assert json.loads(out)["tokens"] == 23


def test_a_config_files_settings_take_effect_and_flags_win(evaluate, tmp_path):
    preset = _config(tmp_path, "cache:\n  budget: 1\n")  # below one slot per layer: the file was read
    code, _, err = evaluate("--config", preset)
    message = "a budget of 1 expert slots (cache.budget 1) is below one per MoE layer"
    assert code == 2 and message in _one_line_error(err)
    code, out, err = evaluate("--config", preset, "--cache-experts", "4")
    assert code == 0, err
    plain = evaluate()  # the same model, whatever the budget (to float rounding: with two threads, matrix
    assert plain[0] == 0  # products of different shapes may sum in different orders)
    assert json.loads(plain[1])["perplexity"] == pytest.approx(json.loads(out)["perplexity"], rel=1e-6)


@pytest.mark.parametrize("text,message", [
    ("cache:\n  slots: 3\n", "unknown setting cache.slots; known: budget, policy"),
    ("cache: [1, 2\n", "is not valid YAML"),
    ("- a list\n", "must hold a mapping of settings"),
    ("generation:\n  temperature: -1\n", "temperature"),
])
def test_a_bad_config_file_is_one_line(evaluate, tmp_path, text, message):
    code, out, err = evaluate("--config", _config(tmp_path, text))
    assert code == 2 and out == "" and message in _one_line_error(err), err


def test_a_missing_config_file_is_one_line(evaluate, tmp_path):
    missing = tmp_path / "nope.yaml"
    code, _, err = evaluate("--config", str(missing))
    assert code == 2 and _one_line_error(err) == f"error: config file {missing} does not exist"
