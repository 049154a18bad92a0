"""`adapmoe download` end to end against a local hub (tests/hub_server.py), run as a subprocess so that
HF_ENDPOINT / HF_TOKEN / HF_HUB_OFFLINE take effect as huggingface_hub reads them at import. Never
touches the internet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapmoe_cli.synthetic import TinySpec
from tests.helpers import SHARD_RUN_COUNTER
from tests.hub_server import HubServer

REPO = "tiny/moe"
GATED = "tiny/gated"
BIG = "tiny/big"
DECOYS = ["pytorch_model.bin", "consolidated.00.pth", "original/model.safetensors"]


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory: pytest.TempPathFactory, make_checkpoint: Callable[..., Path]) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "repo"
    shutil.copytree(make_checkpoint(), folder)
    (folder / "original").mkdir()
    for name in DECOYS:
        (folder / name).write_bytes(b"decoy" * 100)
    return folder


@pytest.fixture
def hub(hub_folder: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add(REPO, hub_folder)
        server.add(GATED, hub_folder, token="good-token")
        yield server


def run(hub: HubServer, *args: str, prelude: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m adapmoe_cli ARGS` against the local hub; `prelude` runs first in the same interpreter."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_") or k == "HF_HOME"}
    full.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
                HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", **env)
    cmd = [sys.executable, "-m", "adapmoe_cli", *args]
    if prelude:
        main = "\nimport sys\nfrom adapmoe_cli.cli.app import main\nsys.argv[0] = 'adapmoe'\nmain()\n"
        cmd = [sys.executable, "-c", prelude + main, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=120)


def _last_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one-line error the CLI prints last on stderr (huggingface_hub may print progress above it)."""
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def fetched(hub: HubServer, repo: str) -> set[str]:
    prefix = f"/{repo}/resolve/"
    return {p.split("/", 5)[-1] for p in hub.state.files(repo) if p.startswith(prefix)}


def verify(store: Path) -> None:
    # `verify` needs no network, so it runs in-process (a subprocess costs seconds of imports).
    from typer.testing import CliRunner

    from adapmoe_cli.cli.app import app

    res = CliRunner().invoke(app, ["verify", str(store)])
    assert res.exit_code == 0, res.output


def test_download_then_offline_from_cache(hub: HubServer, tmp_path: Path) -> None:
    r = run(hub, "download", REPO)  # default: a per-model store under ADAPMOE_HOME
    assert r.returncode == 0, r.stderr
    got = fetched(hub, REPO)
    assert not got & set(DECOYS)
    assert {"config.json", "model.safetensors.index.json"} <= got
    assert any(f.endswith(".safetensors") for f in got)
    stores = [p for p in (Path(os.environ["ADAPMOE_HOME"]) / "stores").iterdir()]
    assert len(stores) == 1
    verify(stores[0])

    hub.state.requests.clear()
    r = run(hub, "download", REPO, "--out", str(tmp_path / "b"), HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert hub.state.requests == []
    verify(tmp_path / "b")


def test_an_out_folder_of_the_users_is_refused_before_anything_is_downloaded(hub: HubServer, tmp_path: Path) -> None:
    """`download REPO --out FOLDER` fetched the whole checkpoint (~93 GB for Mixtral) and only then refused a
    FOLDER that is not a store; now it asks the hub nothing and leaves the folder as it was."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    hub.state.requests.clear()
    r = run(hub, "download", REPO, "--out", str(mine))
    assert r.returncode == 1 and f"{mine} exists and is not an adapmoe store" in _last_line(r), r.stderr
    assert hub.state.requests == [] and [p.name for p in mine.iterdir()] == ["notes.txt"]

def test_a_hub_id_is_sharded_into_home_on_first_use_and_reused(hub: HubServer, tmp_path: Path) -> None:
    """`chat ORG/NAME`: the first use downloads and shards into ADAPMOE_HOME (one shard run) and answers;
    the second shards nothing and asks the hub nothing."""
    runs = tmp_path / "shard-runs.txt"
    args = ("chat", REPO, "-p", "What does the json module do?", "-n", "3", "-c", "4", "--json")
    first = run(hub, *args, prelude=SHARD_RUN_COUNTER, ADAPMOE_TEST_SHARD_RUNS=str(runs))
    assert first.returncode == 0, first.stderr
    (store,) = runs.read_text().splitlines()
    assert Path(store).parent == Path(os.environ["ADAPMOE_HOME"]) / "stores"
    assert 1 <= len(json.loads(first.stdout)["token_ids"]) <= 3
    hub.state.requests.clear()
    second = run(hub, *args, prelude=SHARD_RUN_COUNTER, ADAPMOE_TEST_SHARD_RUNS=str(runs))
    assert second.returncode == 0, second.stderr
    assert runs.read_text().splitlines() == [store] and hub.state.requests == []
    assert json.loads(second.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]


def test_resume_after_cut_off_uses_range(hub: HubServer, tmp_path: Path,
                                         make_checkpoint: Callable[..., Path]) -> None:
    # huggingface_hub 2.4 resumes within the same call (RemoteProtocolError → Range request), but only from
    # whole 10 MiB chunks it has written (DOWNLOAD_CHUNK_SIZE), and deletes its per-process `.incomplete`
    # on failure, so nothing carries over between runs. Hence a single shard of ~25 MB cut at half.
    ckpt = make_checkpoint(TinySpec(hidden_size=256, intermediate_size=2048), shards=1)
    hub.add(BIG, ckpt)
    big = next(ckpt.glob("*.safetensors"))
    size = big.stat().st_size
    assert size // 2 > 10 * 1024 * 1024
    hub.state.cut_off.add(f"{BIG}/{big.name}")
    out = tmp_path / "store"
    r = run(hub, "download", BIG, "--out", str(out))
    assert r.returncode == 0, r.stderr
    gets = [q for q in hub.state.requests if q.method == "GET" and q.path.endswith("/" + big.name)]
    assert len(gets) == 2
    assert gets[0].range is None and gets[0].bytes_sent == size // 2
    assert gets[1].range is not None
    start = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= size // 2
    assert gets[1].bytes_sent == size - start  # resumed, not re-downloaded from zero
    verify(out)


def test_a_failed_run_leaves_no_store_and_the_next_run_fetches_only_what_is_missing(
        hub: HubServer, tmp_path: Path) -> None:
    """A transfer that keeps breaking fails the run cleanly; the rerun takes the finished files from the hub
    cache and downloads only the file that broke (huggingface_hub keeps no partial file between runs)."""
    shards = sorted(f for f in fetched_names(hub, REPO) if f.endswith(".safetensors") and "/" not in f)
    assert len(shards) >= 2
    broken = f"{REPO}/{shards[-1]}"
    hub.state.broken.add(broken)
    out = tmp_path / "store"
    r = run(hub, "download", REPO, "--out", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"error: downloading {REPO} failed" in _last_line(r), r.stderr
    assert not out.exists()
    first = fetched(hub, REPO)
    assert set(shards[:-1]) <= first  # the other shards were completed in the failed run
    hub.state.broken.discard(broken)
    hub.state.requests.clear()
    r = run(hub, "download", REPO, "--out", str(out))
    assert r.returncode == 0, r.stderr
    again = {f for f in fetched(hub, REPO) if f.endswith(".safetensors")}
    assert again == {shards[-1]}  # only what the failed run did not finish
    verify(out)


def fetched_names(hub: HubServer, repo: str) -> list[str]:
    return [p.relative_to(hub.state.repos[repo].folder).as_posix() for p in hub.state.repos[repo].folder.rglob("*")
            if p.is_file()]


def test_gated_without_token_is_one_line_error(hub: HubServer, tmp_path: Path) -> None:
    out = tmp_path / "store"
    r = run(hub, "download", GATED, "--out", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert f"error: {GATED} is gated: accept its licence on the hub, then set HF_TOKEN" in _last_line(r), r.stderr
    assert not out.exists()


def test_gated_with_token_downloads(hub: HubServer, tmp_path: Path) -> None:
    r = run(hub, "download", GATED, "--out", str(tmp_path / "store"), HF_TOKEN="good-token")
    assert r.returncode == 0, r.stderr
    assert all(q.authorization == "Bearer good-token" for q in hub.state.requests)


def test_bad_token_is_reported(hub: HubServer, tmp_path: Path) -> None:
    r = run(hub, "download", REPO, "--out", str(tmp_path / "store"), HF_TOKEN="wrong")
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert f"error: {REPO}: the hub refused the token (401); check HF_TOKEN" in _last_line(r), r.stderr


def test_missing_repo(hub: HubServer, tmp_path: Path) -> None:
    r = run(hub, "download", "tiny/nope", "--out", str(tmp_path / "store"))
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "error: tiny/nope was not found on the hub (or is private: set HF_TOKEN)" in _last_line(r), r.stderr


def test_offline_with_empty_cache(hub: HubServer, tmp_path: Path) -> None:
    r = run(hub, "download", REPO, "--out", str(tmp_path / "store"), HF_HUB_OFFLINE="1")
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert f"error: {REPO} is not in the local hub cache and the hub cannot be reached" in _last_line(r), r.stderr
    assert hub.state.requests == []
