"""Memory caps that hold a whole process, page cache included (memcap.py), and `bench --memory-cap`:
every policy runs in a worker process of its own inside the cap, with the slots the cap leaves after the
runtime's measured baseline; a run the cap kills is a row, not a crash; a cap below the minimum is one
line naming it. These need a memory cgroup, which root has on these machines: without one they are
skipped with the reason (the no-permission path is tested everywhere)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from adapmoe_cli import memcap
from adapmoe_cli.synthetic import TinySpec
from tests.test_bench import _run, setup  # noqa: F401 - the fixture

needs_cgroup = pytest.mark.skipif(memcap.why_unavailable() is not None,
                                  reason=f"no memory cgroup here: {memcap.why_unavailable()}")
MiB = 1 << 20


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@needs_cgroup
def test_a_cap_holds_anonymous_memory_and_the_page_cache(tmp_path):
    # anonymous memory past the cap: killed, and reported as such
    r = memcap.run_capped(_python("b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"), 96 * MiB)
    assert r.killed_for_memory and not r.ok and r.peak_bytes is not None and r.peak_bytes <= 96 * MiB
    # within the cap: runs, and the peak counts what it touched
    r = memcap.run_capped(_python("b = bytearray(48 << 20); b[::4096] = b'x' * len(b[::4096]); print('ok')"),
                          256 * MiB)
    assert r.ok and r.stdout.strip() == "ok" and 48 * MiB <= r.peak_bytes <= 256 * MiB
    # the page cache is charged: reading a file larger than the cap keeps the group at the cap, not killed
    big = tmp_path / "big"
    _uncached_file(big, 160)
    r = memcap.run_capped(_python(f"f = open({str(big)!r}, 'rb')\nwhile f.read(1 << 20): pass"), 96 * MiB)
    assert r.ok and r.peak_bytes <= 96 * MiB and r.peak_bytes > 48 * MiB  # cache filled up to the cap


def _uncached_file(path, mib: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * mib)
        f.flush()
        os.fsync(f.fileno())  # dirty pages are not dropped: written back first, the file leaves the page cache
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@needs_cgroup
def test_the_working_set_leaves_out_the_page_cache_a_run_read_once(tmp_path):
    """The bench's baseline is a run's peak working set: its anonymous memory counts, the file pages it read
    once and left (the kernel's inactive list, reclaimed first under a cap) do not; the group's peak usage
    counts both."""
    big = tmp_path / "big"
    _uncached_file(big, 160)
    code = (f"import time\nb = bytearray(48 << 20); b[::4096] = b'x' * len(b[::4096])\nf = open({str(big)!r}, 'rb')\n"
            "while f.read(1 << 20): pass\ntime.sleep(0.3)")
    r = memcap.run_capped(_python(code), 512 * MiB)
    assert r.ok and r.peak_bytes > (48 + 150) * MiB  # the file's pages were charged to the group
    assert 48 * MiB <= r.peak_working_bytes < r.peak_bytes - 100 * MiB


@needs_cgroup
def test_bench_runs_each_policy_inside_the_cap(setup, tmp_path):  # noqa: F811
    store, text = setup
    out = tmp_path / "b.json"
    r = _run("bench", str(store), "--text", str(text), "--calibration", str(text), "--tokens", "3", "--repeat", "1",
             "--policies", "adapmoe,resident", "--memory-cap", "700MiB,1MiB", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    [point] = data["caps"]  # 1 MiB is below the minimum: not run, said why
    cap = point["memory_cap"]
    assert cap["applied"] and cap["cap_bytes"] == 700 * MiB and cap["baseline_bytes"] > 100 * MiB
    assert "below what the runtime needs" in data["caps_refused"]["1MiB"] and "give at least" in r.stdout
    shape_total = point["total_experts"]
    assert point["budget_slots"] == shape_total  # a tiny model: the cap leaves room for every expert
    for name, p in point["policies"].items():
        assert p["peak_bytes"] is not None and 100 * MiB < p["peak_bytes"] <= 700 * MiB, name
        assert p["counts"]["expert_uses"] > 0
    assert set(point["policies"]) == {"adapmoe", "resident"}  # the gate and the preload reach each worker
    assert "memory cap 700MiB" in r.stdout and "peak" in r.stdout


@needs_cgroup
def test_with_compile_the_capped_runs_find_their_graphs_compiled(make_store, tmp_path, monkeypatch):
    """Compiling a graph afresh runs a C++ compiler and takes hundreds of MiB for a while; inside a cap that
    killed runs that fit once compiled (a machine's first `bench --memory-cap --compile`). A compiled setup's
    first capped run is preceded by an uncapped, untimed one that compiles; the capped runs then build no
    graph. Inductor's cache is cold here (a directory of the test's own, which the workers inherit): without
    that run the capped one builds its graph itself (counted: 1)."""
    from adapmoe_cli import bench
    from adapmoe_cli.runtime.gating import GatePolicy
    from adapmoe_cli.runtime.measure import Setup
    from adapmoe_cli.settings import load_settings
    from adapmoe_cli.store import Store

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    store = Store.open(make_store(TinySpec(num_hidden_layers=1, num_local_experts=2), dtype=torch.float32))
    timed = Setup(bench.budgets.even(store.cache_shape, 1), GatePolicy.off(),
                  load_settings(overrides={"prefetch": False, "compile": True}))
    out = bench.capped_runner(900 * MiB)(store, timed, [[1, 2, 3]], 2)
    assert out.timing is not None, out.failure
    assert out.timing.compile_s is not None and out.timing.compiled_afresh == 0
    assert out.peak_bytes <= 900 * MiB
    assert any((tmp_path / "inductor").rglob("*.so"))  # compiled there, by the uncapped run


@needs_cgroup
def test_a_run_the_cap_kills_is_a_row(setup, capsys, monkeypatch):  # noqa: F811
    """A policy whose worker the cap kills is listed under `failed` with why and its peak, printed as a row
    that says so; the other policies' rows stand."""
    from adapmoe_cli import bench
    from adapmoe_cli.cli import common
    from adapmoe_cli.cli.bench import render_table

    monkeypatch.setattr(common.console, "width", 160)  # the table whole, whatever terminal runs the tests
    from adapmoe_cli.runtime.gating import GatePolicy
    from adapmoe_cli.runtime.measure import Setup
    from adapmoe_cli.settings import load_settings
    from adapmoe_cli.store import Store

    store = Store.open(setup[0])
    shape = store.cache_shape
    settings = load_settings(overrides={"prefetch": False})
    plan = {"lru": Setup(bench.budgets.even(shape, 4), GatePolicy.off(), settings),
            "resident": Setup(bench.budgets.all_experts(shape), GatePolicy.off(), settings, preload=True)}
    small, large = bench.capped_runner(64 * MiB), bench.capped_runner(900 * MiB)  # 64 MiB: below Python + torch

    def runner(store, setup, prompts, tokens):
        return (small if setup.preload else large)(store, setup, prompts, tokens)

    r = bench.measure(store, plan, {}, 4, [[1, 2, 3, 4]], 3, 1, lambda setup: (1.0, None), runner=runner)
    assert set(r["policies"]) == {"lru"} and r["policies"]["lru"]["peak_bytes"] <= 900 * MiB
    assert r["failed"]["resident"]["why"] == "killed by the memory cap (64.00 MiB)"
    assert r["failed"]["resident"]["peak_bytes"] <= 64 * MiB
    r["memory_cap"] = {"applied": True, "text": "64MiB", "cap_bytes": 64 * MiB}
    render_table(r)
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["resident", "killed"] for line in out.splitlines()), out
    assert "resident: killed by the memory cap (64.00 MiB) at a peak of" in out


def test_without_permission_the_bench_says_so_and_runs_uncapped(setup, tmp_path, monkeypatch):  # noqa: F811
    from adapmoe_cli import bench
    from adapmoe_cli.bench import BenchRequest
    from adapmoe_cli.settings import load_settings
    from adapmoe_cli.store import Store

    monkeypatch.setattr(memcap, "why_unavailable", lambda: "making a memory cgroup needs root")
    store, text = setup
    req = BenchRequest(policies=("lru",), tokens=2, repeat=1, text=text, calibration=text, memory_caps=("60%",))
    result = bench.run(Store.open(store), load_settings(), req)
    assert result["memory_cap"] == {"applied": False,
                                    "why": "cannot cap memory: making a memory cgroup needs root; ran uncapped"}
    assert "caps" not in result and result["policies"]["lru"]["peak_bytes"] is None


@pytest.mark.parametrize("text", ["lots", "0%", "-5%", "0MiB"])
def test_bad_caps_are_one_line(text):
    from adapmoe_cli.errors import UsageError
    from adapmoe_cli.units import parse_cap

    with pytest.raises(UsageError, match=r"--memory-cap .*: give a size \(1.5GiB\) or a share"):
        parse_cap(text, 10 * MiB)
    assert parse_cap("60%", 100 * MiB) == 60 * MiB and parse_cap("1.5GiB", 1) == 3 * (1 << 29)
