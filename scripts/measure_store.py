"""Measure the expert store on a generated checkpoint of more than 2 GB.

  python scripts/measure_store.py [--workdir /tmp/adapmoe-measure] [--layers 6] [--repeats 3] [--keep]

1. writes a random float32 Mixtral-shaped checkpoint in hub layout (`synthetic.write_checkpoint`, one
   shard per layer so generation memory stays bounded);
2. runs `python -m adapmoe_cli shard` on it in a child process, after flushing and dropping the source's
   page cache (fsync + posix_fadvise DONTNEED): store bytes written / wall time, and the child's peak RSS
   (wait4's ru_maxrss of that one process);
3. reads every expert of one layer file with `ExpertReader` (O_DIRECT, one reused aligned buffer) and the
   same file with `dd bs=<expert length> iflag=direct`, interleaved, `--repeats` times each: medians and
   their ratio. The whole store is read once more by the reader for reference.

MB are 10^6 bytes. Prints a report, writes JSON (`--json`), deletes the workdir unless `--keep`."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MB = 1e6


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _drop_cache(paths: list[Path]) -> None:
    """Flush dirty pages, then ask the kernel to forget the cached ones (DONTNEED skips dirty pages)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cached_bytes(paths: list[Path]) -> int | None:
    """Page-cache residency of `paths` according to util-linux `fincore`, when it is installed."""
    if not shutil.which("fincore") or not paths:
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return sum(int(x) for x in r.stdout.split())


def make_checkpoint(ckpt: Path, layers: int, hidden: int, intermediate: int, experts: int, vocab: int) -> float:
    import torch

    from adapmoe_cli.synthetic import TinySpec, write_checkpoint

    spec = TinySpec(num_hidden_layers=layers, num_local_experts=experts, num_experts_per_tok=2,
                    hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024)
    t0 = time.perf_counter()
    write_checkpoint(ckpt, spec, dtype=torch.float32, num_shards=max(4, layers))
    return time.perf_counter() - t0


def measure_shard(ckpt: Path, store: Path) -> dict[str, Any]:
    sources = [p for p in _files(ckpt) if p.suffix == ".safetensors"]
    _drop_cache(sources)
    cached = _cached_bytes(sources)
    cmd = [sys.executable, "-m", "adapmoe_cli", "shard", str(ckpt), str(store)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    readers = [threading.Thread(target=lambda s=s: out.append(s.read())) for s in (proc.stdout, proc.stderr)]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    if proc.returncode != 0:
        raise SystemExit(f"shard failed ({proc.returncode}):\n{''.join(out)}")
    written = sum(p.stat().st_size for p in _files(store))
    m = re.search(r"in ([0-9.]+) s", "".join(out))
    return {
        "command": " ".join(cmd),
        "source_cached_bytes_before": cached,
        "store_bytes": written,
        "wall_s": wall,
        "mb_per_s": written / wall / MB,
        "reported_s": float(m.group(1)) if m else None,  # shard()'s own time, without interpreter start
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "stdout": "".join(out).strip(),
    }


def read_with_reader(store_path: Path, layer: int | None) -> dict[str, Any]:
    """Every expert of `layer` (or of the whole store) into one reused aligned buffer."""
    from adapmoe_cli.store import Store
    from adapmoe_cli.store.reader import ExpertReader, aligned_buffer

    store = Store.open(store_path)
    keys = sorted(k for k in store.experts if layer is None or k[0] == layer)
    _drop_cache(sorted({store.path / store.experts[k].file for k in keys}))
    buf = aligned_buffer(store.slot_bytes)
    with ExpertReader(store, direct=True) as reader:
        t0 = time.perf_counter()
        for la, e in keys:
            reader.read_into(la, e, buf)
        dt = time.perf_counter() - t0
        direct, nbytes, reads = reader.direct, reader.bytes_read, reader.reads
    buf.close()
    return {"bytes": nbytes, "reads": reads, "seconds": dt, "mb_per_s": nbytes / dt / MB, "o_direct": direct}


def read_with_dd(path: Path, block: int) -> dict[str, Any]:
    _drop_cache([path])
    cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={block}", "iflag=direct"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, check=True)
    m = re.search(r"^(\d+) bytes .* copied, ([0-9.e+-]+) s", r.stderr, re.M)
    if not m:
        raise SystemExit(f"cannot parse dd's output: {r.stderr!r}")
    nbytes, dt = int(m.group(1)), float(m.group(2))
    return {"command": " ".join(cmd), "bytes": nbytes, "seconds": dt, "mb_per_s": nbytes / dt / MB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/adapmoe-measure"))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("/tmp/adapmoe-measure-store.json"),
                    help="where to write the results (outside the workdir, which is deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and store")
    a = ap.parse_args()

    ckpt, store = a.workdir / "checkpoint", a.workdir / "store"
    res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "load_avg_start": os.getloadavg()}
    try:
        # 1. the checkpoint
        if store.exists():
            shutil.rmtree(store)
        if not (ckpt / "model.safetensors.index.json").exists():
            res["generate_s"] = make_checkpoint(ckpt, a.layers, a.hidden, a.intermediate, a.experts, a.vocab)
        res["checkpoint_bytes"] = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        print(f"checkpoint: {res['checkpoint_bytes'] / MB:,.0f} MB in {ckpt}", flush=True)

        # 2. shard
        res["shard"] = sh = measure_shard(ckpt, store)
        print(f"shard: {sh['store_bytes'] / MB:,.0f} MB in {sh['wall_s']:.1f} s = {sh['mb_per_s']:.0f} MB/s "
              f"(shard() itself: {sh['reported_s']} s), peak RSS {sh['peak_rss_bytes'] / MB:,.0f} MB", flush=True)

        # 3. reader vs dd on the same expert file, interleaved
        from adapmoe_cli.store import Store

        s = Store.open(store)
        layer = s.shape.moe_layers[0]
        first = s.experts[(layer, 0)]
        reader_runs, dd_runs = [], []
        for _ in range(a.repeats):
            reader_runs.append(read_with_reader(store, layer))
            dd_runs.append(read_with_dd(store / first.file, first.length))
        r_med = statistics.median(r["mb_per_s"] for r in reader_runs)
        d_med = statistics.median(r["mb_per_s"] for r in dd_runs)
        res["read"] = {
            "file": first.file, "file_bytes": (store / first.file).stat().st_size, "block": first.length,
            "reader_runs": reader_runs, "dd_runs": dd_runs,
            "reader_mb_per_s_median": r_med, "dd_mb_per_s_median": d_med, "ratio": r_med / d_med,
            "whole_store_reader": read_with_reader(store, None),
        }
        print(f"read {first.file} ({res['read']['file_bytes'] / MB:,.0f} MB, block {first.length:,} B), "
              f"median of {a.repeats}: ExpertReader {r_med:,.0f} MB/s "
              f"(O_DIRECT={reader_runs[0]['o_direct']}), dd iflag=direct {d_med:,.0f} MB/s, "
              f"ratio {r_med / d_med:.2f}")
        whole = res["read"]["whole_store_reader"]
        print(f"whole store through the reader: {whole['bytes'] / MB:,.0f} MB at {whole['mb_per_s']:,.0f} MB/s")
        res["load_avg_end"] = os.getloadavg()
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    a.json.write_text(json.dumps(res, indent=2))
    print(f"results: {a.json}")


if __name__ == "__main__":
    main()
