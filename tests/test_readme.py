"""Every `adapmoe` command in README.md runs, as written, from a fresh ADAPMOE_HOME.

The commands are read from the README's code blocks (set-up lines that install are CI's own job). What
they need beside the package is made here for real: a local hub server (tests/hub_server.py) serves a
tiny Mixtral checkpoint under the README's hub id, and `./Mixtral-8x7B-v0.1` is a tiny checkpoint in the
working folder. Commands that profile, search or benchmark get size flags appended (fewer tokens, one
repeat) so the suite stays quick; every flag the README line holds is still parsed and used."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from adapmoe_cli.synthetic import TinySpec
from tests.hub_server import HubServer

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = "mistralai/Mixtral-8x7B-Instruct-v0.1"
#: appended to keep the suite quick (the README's own flags stay in front of these)
SIZE_FLAGS = {"profile": ["--tokens", "512"], "plan-cache": ["--tokens", "512"], "eval": ["--tokens", "512"],
              "bench": ["--tokens", "3", "--repeat", "1", "--policies", "naive,lru+prefetch,adapmoe",
                        "--heldout-tokens", "2048"],
              "simulate": ["--policies", "lru,adapmoe"]}


ENDPOINT_FLAGS = ["--tokens", "3", "--repeat", "1"]


def _serve(cmd: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start a `serve` line; returns the process and its base URL once it listens."""
    proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for text in proc.stderr:
        seen.append(text)
        m = re.search(r"serving at (http://\S+)/v1", text)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe drained
            return proc, m.group(1)
    raise AssertionError(f"{cmd} did not start: {''.join(seen)[-400:]}")


def readme_commands() -> list[str]:
    """The `adapmoe …` command lines of README's bash blocks (continuations joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines: list[str] = []
    for block in blocks:
        for raw in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", raw).strip()
            if line.startswith("adapmoe ") or re.match(r"^echo .*\| *adapmoe ", line):
                lines.append(line)
    return lines


def test_the_readme_has_the_commands_a_newcomer_needs():
    cmds = readme_commands()
    assert any(c.startswith("adapmoe chat") for c in cmds) and any(c.startswith("adapmoe fit") for c in cmds)
    assert not any("../shared" in c for c in cmds)  # nothing outside the repository and the package


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, make_checkpoint: Callable[..., Path]) -> Path:
    work = tmp_path_factory.mktemp("readme")
    # an intermediate size the default int4 group (64) divides, as real models' do
    shutil.copytree(make_checkpoint(TinySpec(intermediate_size=128), dtype=torch.float32), work / "Mixtral-8x7B-v0.1")
    return work


@pytest.fixture(scope="module")
def hub(make_checkpoint: Callable[..., Path]):
    with HubServer() as server:
        server.add(HUB_ID, make_checkpoint(dtype=torch.float32))
        yield server


#: commands that touch only the checkpoints, the hub model and their stores (or nothing in ADAPMOE_HOME); the
#: others use the embedded model's stores. The two lanes run side by side (each in order): nothing one writes
#: is read by the other
OWN_STORES = ("download", "shard", "info", "verify", "fit", "simulate", "list")


def lane(line: str) -> int:
    words = shlex.split(line.split("|")[-1])
    return 0 if words[1] in OWN_STORES or (len(words) > 2 and (words[2] == HUB_ID or words[2].startswith("./"))) else 1


#: embedded-model commands the first lane runs at its end, once the second lane's first command has made the
#: embedded model's store (they write only a store of their own): the two lanes then take about as long
LATE = ("adapmoe chat --experts-format int4",)


def test_every_readme_command_runs(workdir: Path, hub: HubServer, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("readme-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(ADAPMOE_HOME=str(home), HF_HOME=str(home / "hf"), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", COLUMNS="120", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    # what makes a store runs first (the README shows `chat ./mixtral-store` before `shard … ./mixtral-store`)
    lines = sorted(readme_commands(), key=lambda c: not c.startswith(("adapmoe shard", "adapmoe download")))
    late = [c for c in lines if c in LATE]
    lanes = [[c for c in lines if lane(c) == 0] + late, [c for c in lines if lane(c) == 1 and c not in LATE]]
    assert all(lanes) and len(late) == len(LATE), lanes
    embedded_made = threading.Event()

    def run_lane(commands: list[str]) -> list[str]:
        failures = []
        server: subprocess.Popen | None = None

        def stop() -> None:
            nonlocal server
            if server is not None:
                server.terminate()
                if server.wait(60) != 0:
                    failures.append(f"adapmoe serve exited {server.returncode} on SIGTERM")
                server = None

        try:
            for line in commands:
                if line in late:
                    embedded_made.wait(600)
                words = shlex.split(line.split("|")[-1])
                extra = ENDPOINT_FLAGS if "--endpoint" in words else SIZE_FLAGS.get(words[1], [])
                cmd = line + "".join(f" {shlex.quote(x)}" for x in extra)
                if words[1] == "serve":  # up for the commands that talk to it (on a free port: the README's
                    server, base = _serve(cmd + " --port 0", workdir, env)  # 8000 may be taken here)
                    continue
                if "http://127.0.0.1:8000" in cmd:
                    assert server is not None, f"{line}: no `adapmoe serve` line before it"
                    cmd = cmd.replace("http://127.0.0.1:8000", base)
                else:
                    stop()
                # `chat` without --prompt reads its prompt from stdin when it is not a terminal
                r = subprocess.run(["bash", "-c", cmd], cwd=workdir, env=env, input="What does the json module do?\n",
                                   capture_output=True, text=True, timeout=600)
                if r.returncode != 0 or "Traceback" in r.stderr:
                    failures.append(f"{cmd}\n  → exit {r.returncode}: {r.stderr.strip()[-400:]}")
                if line == lanes[1][0]:
                    embedded_made.set()
        finally:
            stop()
            embedded_made.set()
        return failures

    with ThreadPoolExecutor(2) as pool:
        failures = [f for result in pool.map(run_lane, lanes) for f in result]
    assert not failures, "\n".join(failures)
    assert (workdir / "mixtral-store" / "manifest.json").exists()
    assert (workdir / "bench.json").exists() and (workdir / "bench.png").exists()
