"""What a user meets around the runtime: `fit` from a config alone (a hub id fetches only config.json),
`list` / `rm` and readable store names, `--version` / `--debug` anywhere, and the bench's warnings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapmoe_cli.simulate.model_spec import from_hf_config
from adapmoe_cli.synthetic import TinySpec
from tests.hub_server import HubServer


def _run(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapmoe_cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=input, timeout=300)


def test_fit_from_a_hub_config_fetches_nothing_else(make_checkpoint: Callable[..., Path]):
    with HubServer() as hub:
        hub.add("org/tiny-moe", make_checkpoint())
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
                   HF_HOME=os.environ["HF_HOME"])
        r = subprocess.run([sys.executable, "-m", "adapmoe_cli", "fit", "org/tiny-moe", "--hardware", "laptop-nvme",
                            "--json"], capture_output=True, text=True, env=env, timeout=300)
        fetched = {p.rsplit("/", 1)[-1] for p in hub.state.files("org/tiny-moe")}
    assert r.returncode == 0, r.stderr
    assert fetched == {"config.json"}  # sizes from the config alone: no weights, no tokenizer
    out = json.loads(r.stdout)
    spec = TinySpec()
    assert (out["model"]["num_layers"], out["model"]["num_experts"]) == (spec.num_hidden_layers, spec.num_local_experts)
    assert out["expert_slot_bytes"] == 3 * spec.hidden_size * spec.intermediate_size * 2  # bf16 checkpoint
    rows = out["budgets"]
    assert [r_["budget_slots"] for r_ in rows] == sorted(r_["budget_slots"] for r_ in rows)
    assert all(r_["decode_tokens_per_s"] > 0 for r_ in rows) and sum(r_["auto"] for r_ in rows) == 1
    assert rows[-1]["memory_bytes"] > rows[0]["memory_bytes"] and "routing" in out


def test_fit_reads_the_configs_of_other_families():
    qwen = {"model_type": "qwen3_moe", "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
            "hidden_size": 2048, "moe_intermediate_size": 768, "intermediate_size": 6144, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "mlp_only_layers": [],
            "decoder_sparse_step": 1, "torch_dtype": "bfloat16"}
    m = from_hf_config(qwen, "qwen")
    assert (m.num_layers, m.num_experts, m.top_k, m.slot_bytes) == (48, 128, 8, 3 * 2048 * 768 * 2)
    deepseek = {"num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 256, "num_experts_per_tok": 8,
                "hidden_size": 7168, "moe_intermediate_size": 2048, "num_attention_heads": 128, "vocab_size": 129280}
    d = from_hf_config(deepseek, "deepseek", bits=4)
    assert (d.num_layers, d.num_experts) == (58, 256) and d.slot_bytes < 3 * 7168 * 2048  # 4 bits: under a byte each
    from adapmoe_cli.errors import UsageError

    with pytest.raises(UsageError, match="Mixture-of-Experts"):
        from_hf_config({"num_hidden_layers": 2, "hidden_size": 8}, "dense")


def test_readable_store_names_list_and_rm(make_checkpoint: Callable[..., Path], tmp_path: Path):
    from adapmoe_cli import catalog
    from adapmoe_cli.model_arg import open_model

    a = tmp_path / "a" / "ckpt"
    b = tmp_path / "b" / "ckpt"
    shutil.copytree(make_checkpoint(), a)
    shutil.copytree(make_checkpoint(seed=1), b)
    first = open_model(str(a))
    assert first.path.name == "ckpt"  # named after the checkpoint's folder
    assert open_model(str(b)).path.name == "ckpt-2"  # another checkpoint with the same folder name
    before = (first.path / "manifest.json").stat().st_mtime_ns
    assert open_model(str(a)).path == first.path  # the same checkpoint again: its store, not sharded anew
    assert (first.path / "manifest.json").stat().st_mtime_ns == before
    names = {e.name: e for e in catalog.list_stores()}
    assert set(names) == {"ckpt", "ckpt-2"} and names["ckpt"].source == str(a.absolute())
    assert names["ckpt"].last_used is not None and names["ckpt"].bytes > 0

    r = _run("list", "--json")
    assert r.returncode == 0 and {e["name"] for e in json.loads(r.stdout)} == {"ckpt", "ckpt-2"}
    r = _run("rm", "ckpt-2", input="")  # not a terminal: confirmation needs --yes
    assert r.returncode != 0 and "add --yes" in r.stderr and (first.path.parent / "ckpt-2").exists()
    r = _run("rm", "../../etc", "--yes")
    assert r.returncode != 0 and "no store named" in r.stderr
    r = _run("rm", str(b), "--yes")  # by its source
    assert r.returncode == 0, r.stderr
    assert not (first.path.parent / "ckpt-2").exists() and first.path.exists()


def test_version_and_debug_after_the_command():
    assert _run("-V").stdout.strip().startswith("adapmoe ")
    quiet = _run("info", "no/such/store")
    loud = _run("info", "no/such/store", "--debug")  # accepted after the command name too
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr and len(quiet.stderr.strip().splitlines()) == 1
    assert loud.returncode != 0 and "Traceback" in loud.stderr



#: run in one process: each argv through the CLI's main, then whether torch (or transformers) was loaded
_LIGHT = """
import contextlib, io, json, sys
from adapmoe_cli.cli.app import app, main
runs = [["--help"], ["--version"], ["list"]] + [[c.name, "--help"] for c in app.registered_commands]
seen = []
for argv in runs:
    sys.argv = ["adapmoe", *argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main()
    seen.append([argv, len(out.getvalue()), sorted(m for m in ("torch", "transformers") if m in sys.modules)])
print(json.dumps(seen))
"""


def test_help_version_and_list_answer_without_loading_torch(tmp_path: Path):
    """`--help` (tab completion runs the program too), `--version` and `list` answer in a fraction of a
    second: the command modules import the library, and with it torch and transformers, only when a
    command runs (2–3 s before, most of it importing torch)."""
    r = subprocess.run([sys.executable, "-c", _LIGHT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "ADAPMOE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert len(seen) >= 3 + 13 and all(printed > 0 for _, printed, _ in seen), seen
    assert [(argv, loaded) for argv, _, loaded in seen if loaded] == []



#: runs each command line of the JSON list in argv[1] in one process; prints [argv, exit code, stderr, heavy
#: modules loaded by then] for each
_BAD_INPUT = """
import contextlib, io, json, sys
from adapmoe_cli.cli.app import main
seen = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["adapmoe", *argv]
    err, code = io.StringIO(), None
    with contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code
    seen.append([argv, code, err.getvalue(), sorted(m for m in ("torch", "transformers") if m in sys.modules)])
print(json.dumps(seen))
"""


def _run_lines(home: Path, argvs: list[list[str]]) -> list[list]:
    """Each command line run in one process (`_BAD_INPUT`): [argv, exit code, stderr, heavy modules loaded]."""
    r = subprocess.run([sys.executable, "-c", _BAD_INPUT, json.dumps(argvs)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "ADAPMOE_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _refused(home: Path, argvs: list[list[str]]) -> list[list]:
    """Each command line run in one process: every one refused with a one-line error."""
    seen = _run_lines(home, argvs)
    for argv, code, err, _ in seen:
        assert code not in (0, None) and err.startswith("error: ") and len(err.strip().splitlines()) == 1, argv
    return seen


def test_bad_flags_of_bench_and_serve_are_refused_before_torch_loads(tmp_path: Path):
    """A misspelt policy or a bad port is said at once (0.6 s), not after importing torch (3.4 s before)."""
    seen = _refused(tmp_path, [["bench", "--policies", "lru,nope"], ["serve", "--port", "-1"],
                               ["serve", "--max-queue", "-1"], ["serve", "--api-key", " "],
                               ["bench", "--memory-cap", "60%,3XB"]])  # (a bad cap: 7.5 s before)
    assert ["nope" in seen[0][2], "--port" in seen[1][2], "--max-queue" in seen[2][2], "--api-key" in seen[3][2],
            "--memory-cap '3XB'" in seen[4][2]] == [True] * 5
    assert [loaded for *_, loaded in seen] == [[]] * 5


def test_bad_settings_of_the_model_commands_are_refused_before_torch_loads(tmp_path: Path):
    """An unknown eviction policy or a budget out of range is said once the flags are read (0.6 s), not after
    the command has imported its library (2.9–3 s before)."""
    seen = _refused(tmp_path, [["chat", "--policy", "nope", "--prompt", "hi"], ["eval", "--policy", "nope"],
                               ["plan-cache", "--budget", "0%"], ["profile", "--memory", "3XB"]])
    assert ["unknown eviction policy 'nope'" in seen[0][2], "unknown eviction policy 'nope'" in seen[1][2],
            "--budget" in seen[2][2], "'3XB'" in seen[3][2]] == [True] * 4
    assert [loaded for *_, loaded in seen] == [[]] * 4


def test_a_model_that_names_nothing_is_refused_before_torch_loads(tmp_path: Path):
    """A mistyped MODEL — no such path and not a hub id, or a folder that is neither a store nor a checkpoint —
    is said as the command line is read (0.4–0.7 s), not after the command has imported torch (2.5–3 s
    before); `verify` likewise for a folder that is not a store. Nothing is made in ADAPMOE_HOME."""
    home, empty, missing = tmp_path / "home", tmp_path / "empty", str(tmp_path / "no-such-store")
    empty.mkdir()
    commands = [["info"], ["profile"], ["plan-cache"], ["eval"], ["bench"], ["serve"], ["chat", "--prompt", "hi"]]
    cases = [([c[0], missing, *c[1:]], f"{missing!r} is not a store, a checkpoint folder or a hub id")
             for c in commands]
    cases += [([c[0], str(empty), *c[1:]], f"{empty} is neither an adapmoe store nor a checkpoint folder")
              for c in commands]
    cases += [(["verify", missing], f"{missing} does not exist"), (["verify", str(empty)],
                                                                    f"{empty} is not an adapmoe store")]
    seen = _refused(home, [argv for argv, _ in cases])
    for (argv, _, err, loaded), (_, want) in zip(seen, cases, strict=True):
        assert want in " ".join(err.split()) and loaded == [], (argv, err, loaded)
    assert not home.exists()

def test_token_counts_that_leave_nothing_to_score_are_refused_as_the_line_is_read(tmp_path: Path):
    """`eval --tokens 1` and `plan-cache --tokens 0` or `1` divided by zero after loading the model, `plan-cache
    --tokens -1` scored the whole calibration text (minutes) and `eval --window 1` never ended (a window of
    one token moves by none): each is now a usage error as the command line is read, naming the flag."""
    cases = [(["eval", "--tokens", "1"], "--tokens"), (["eval", "--tokens", "-1"], "--tokens"),
             (["eval", "--window", "1"], "--window"), (["eval", "--calibration-tokens", "1"], "--calibration-tokens"),
             (["plan-cache", "--tokens", "0"], "--tokens"), (["plan-cache", "--tokens", "1"], "--tokens"),
             (["plan-cache", "--tokens", "-1"], "--tokens")]
    seen = _run_lines(tmp_path, [argv for argv, _ in cases])
    for (argv, code, err, loaded), (_, flag) in zip(seen, cases, strict=True):
        assert code == 2 and f"Invalid value for '{flag}'" in err and loaded == [], (argv, code, err)
    assert not any(tmp_path.iterdir())  # nothing made: the embedded model's store was never opened


def test_a_misspelt_format_hardware_or_policy_and_a_stride_outside_the_window_are_said_before_torch_loads(
        tmp_path: Path):
    """An unknown `--experts-format` (or a `--group-size` it does not take) took ~3 s to be said (after torch),
    `simulate --policies nope` 2.25 s and `fit --hardware nope` 2.6 s; `eval --stride 0` was taken as the
    default and a stride longer than the window was refused only after loading the model; `fit --bits nan` was
    blamed on the model's file; `plan-cache --gate-scale nan` wrote a plan of NaN thresholds over the one there.
    Each is said now as the line is read, with nothing made or changed."""
    home, plan = tmp_path / "home", tmp_path / "plan.json"
    plan.write_text('{"a plan": "kept"}')
    usage = [(["eval", "--stride", "0"], "'--stride'"), (["eval", "--window", "8", "--stride", "9"],
                                                          "--stride: give at most the window (8), not 9"),
             (["fit", "--bits", "nan"], "'--bits': give a number of bits from 1 to 32, not nan"),
             (["simulate", "--bits", "100"], "'--bits': give a number of bits from 1 to 32, not 100.0"),
             (["plan-cache", "--gate-scale", "nan", "--out", str(plan)], "'--gate-scale': give a finite number ≥ 0, "
                                                                         "not nan"),
             (["simulate", "--gate-scale", "inf"], "'--gate-scale': give a finite number ≥ 0, not inf")]
    seen = _run_lines(home, [argv for argv, _ in usage])
    for (argv, code, err, loaded), (_, want) in zip(seen, usage, strict=True):
        assert code == 2 and f"Invalid value for {want}" in " ".join(err.split()) and loaded == [], (argv, err)
    refused = [(["chat", "--experts-format", "nope", "--prompt", "hi"], "unknown --experts-format 'nope'"),
               (["bench", "--fallback-format", "int3"], "unknown --fallback-format 'int3'"),
               (["chat", "--experts-format", "native", "--group-size", "32", "--prompt", "hi"],
                "--group-size applies to int4 and int2, not native"),
               (["eval", "--group-size", "32", "--experts-format", "int8"], "--group-size applies to int4 and int2, "
                                                                           "not int8"),
               (["simulate", "--policies", "nope"], "unknown policy nope"),
               (["simulate", "--hardware", "nope"], "unknown hardware 'nope'"),
               (["fit", "--hardware", "nope"], "unknown hardware 'nope'")]
    seen = _refused(home, [argv for argv, _ in refused])
    for (argv, _, err, loaded), (_, want) in zip(seen, refused, strict=True):
        assert want in err and loaded == [], (argv, err, loaded)
    assert not home.exists() and plan.read_text() == '{"a plan": "kept"}'


def test_a_chart_file_matplotlib_cannot_write_and_prompts_that_are_no_text_are_one_line(tmp_path: Path):
    """`--plot bench.json` failed in matplotlib after the whole bench had run; a prompt file that is a folder
    or binary failed with Python's own exception. Now: a usage error as the line is read, and one line."""
    home, folder, binary = tmp_path / "home", tmp_path / "prompts", tmp_path / "prompts.bin"
    folder.mkdir()
    binary.write_bytes(b"a prompt\n" + bytes(range(128, 256)))
    seen = _run_lines(home, [["bench", "--plot", "bench.json"], ["simulate", "--plot", "chart"]])
    assert [(code, "Invalid value for '--plot'" in err, loaded) for _, code, err, loaded in seen] == [(2, True, [])] * 2
    seen = _refused(home, [["bench", "--prompts", str(folder)], ["bench", "--prompts", str(binary)]])
    assert f"prompt file {folder} cannot be read" in seen[0][2] and f"prompt file {binary} is not UTF-8" in seen[1][2]


def test_the_library_refuses_a_window_or_a_calibration_too_short_to_score():
    from adapmoe_cli.errors import UsageError
    from adapmoe_cli.perplexity import evaluate
    from adapmoe_cli.planning.quality import token_losses

    with pytest.raises(UsageError, match="window must be at least 2"):
        evaluate(None, [1, 2, 3], window=1)  # refused before the engine is used: it looped for ever
    with pytest.raises(UsageError, match="at least 2 calibration tokens"), token_losses(None, None, Path("x"), 1):
        pass


def test_bench_warns_when_repeats_overlap_or_the_machine_is_busy():
    from adapmoe_cli.bench import warnings

    def pol(lo: float, med: float, hi: float) -> dict:
        return {"decode_tokens_per_s": med, "decode_tokens_per_s_min": lo, "decode_tokens_per_s_max": hi}

    r = {"repeats": 3, "machine": {"torch_threads": 2}, "machine_load": {"load_average_1m": 1.9, "steal_share": 0.0},
         "policies": {"lru": pol(90, 100, 110), "adapmoe": pol(105, 120, 125), "naive": pol(40, 45, 50)}}
    got = warnings(r)
    assert len(got) == 1 and "lru and adapmoe overlap" in got[0]  # naive is clearly apart
    r["machine_load"] = {"load_average_1m": 5.0, "steal_share": 0.2}
    got = warnings(r)
    assert any("busy" in w for w in got) and any("hypervisor" in w for w in got)
    r["repeats"] = 1
    assert not any("overlap" in w for w in warnings(r))


def test_chat_banner_shows_the_budget_in_slots_and_bytes(make_store: Callable[..., Path]):
    import pexpect

    store = make_store(TinySpec(), dtype=torch.float32)
    child = pexpect.spawn(sys.executable, ["-m", "adapmoe_cli", "chat", str(store), "--memory", "1GiB",
                                           "--no-auto-profile"],
                          env={**os.environ, "COLUMNS": "250"}, encoding="utf-8", timeout=120, dimensions=(30, 250))
    try:
        child.expect(r"8/8 experts cached \(\d+\.\d\d KiB; --memory 1\.00 GiB = \d+ slots of [\d.]+ KiB, capped at "
                     r"the model's 8 experts\)")
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


@pytest.mark.parametrize("config,needle", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 is outside 1…4096"),
    ({"first_k_dense_replace": 10**12}, "first_k_dense_replace = 1000000000000 is outside 0…4096"),
    ({"mlp_only_layers": 5}, "mlp_only_layers must be a list of layer numbers"),
    ([1, 2], "is not a JSON object"),
    ("[" * 1000 + "]" * 1000, "nests deeper than 64 levels"),
], ids=["layers", "dense-layers", "mlp-only", "list", "deep"])
def test_fit_refuses_a_config_json_of_absurd_counts_before_building_anything(tmp_path, monkeypatch, capsys, config,
                                                                               needle):
    """A range of 10^12 layer numbers filled the memory before the 4096-layer check (MemoryError); a config.json
    that was a list, or nested 100,000 deep, was an unexpected error."""
    from tests.test_trust import one_line, run_cli

    qwen = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2,
            "hidden_size": 64, "moe_intermediate_size": 32, "num_attention_heads": 4, "vocab_size": 100}
    folder = tmp_path / "model"
    folder.mkdir()
    body = {**qwen, **config} if isinstance(config, dict) else config
    (folder / "config.json").write_text(body if isinstance(body, str) else json.dumps(body))
    code, _, err = run_cli(monkeypatch, capsys, "fit", str(folder))
    assert code != 0 and needle in one_line(err)


def test_fit_takes_a_model_yaml_as_simulate_does(tmp_path, monkeypatch, capsys):
    """`fit FILE.yaml` said "holds no config.json" even for a shipped model file; it reads the file now."""
    from adapmoe_cli.simulate.model_spec import shipped_dir
    from tests.test_trust import run_cli

    mine = tmp_path / "my-olmoe.yaml"
    shutil.copy(shipped_dir() / "olmoe-1b-7b.yaml", mine)
    code, out, err = run_cli(monkeypatch, capsys, "fit", str(mine), "--json")
    assert code == 0, err
    assert json.loads(out)["model"]["source"] == str(mine)
