"""What checking expert bytes costs next to reading them (docs/reliability.md).

  .venv/bin/python scripts/measure_verify.py [--workdir /tmp/adapmoe-verify] [--repeats 3] [--json FILE]

For two stores — the embedded model's (0.6 MB experts) and a generated float32 Mixtral-shaped one with
44 MB experts (1024 × 3584 × 3 × 4 bytes, 2 layers × 8 experts) — and for every expert:
  read   one O_DIRECT read into an aligned buffer (`ExpertReader`, check off), page cache dropped first;
  sha256 hashlib's sha256 of the payload in that buffer (what the runtime checks on an expert's first
         read in a process); blake2b for reference (also in hashlib, no extra dependency);
  first  a cold read with the check on, as the loader does it the first time.
Medians over experts and repeats; MB are 10^6 bytes. Also the dense weights: read + sha256 + views (what
`Store.load_dense` does at every start)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

MB = 1e6


def drop(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(store_path: Path, repeats: int) -> dict[str, Any]:
    from adapmoe_cli.store import Store
    from adapmoe_cli.store.reader import ExpertReader, aligned_buffer

    store = Store.open(store_path)
    files = sorted({store.path / e.file for e in store.experts.values()})
    buf = aligned_buffer(store.slot_bytes)
    view = memoryview(buf)
    read_s, sha_s, blake_s, first_s = [], [], [], []
    direct = None
    for _ in range(repeats):
        drop(files)
        with ExpertReader(store, check=False) as reader:
            for (la, ex), e in sorted(store.experts.items()):
                t0 = time.perf_counter()
                reader.read_into(la, ex, buf)
                t1 = time.perf_counter()
                hashlib.sha256(view[: e.nbytes]).hexdigest()
                t2 = time.perf_counter()
                hashlib.blake2b(view[: e.nbytes]).hexdigest()
                t3 = time.perf_counter()
                read_s.append(t1 - t0)
                sha_s.append(t2 - t1)
                blake_s.append(t3 - t2)
            direct = reader.direct
        drop(files)
        fresh = Store.open(store_path)  # nothing checked yet in this Store
        with ExpertReader(fresh, check=True) as reader:
            for (la, ex), _ in sorted(fresh.experts.items()):
                t0 = time.perf_counter()
                reader.read_into(la, ex, buf)
                first_s.append(time.perf_counter() - t0)
    view.release()
    buf.close()
    dense_s = []
    for _ in range(repeats):
        drop([store.path / f.file for f in store.dense_files])
        t0 = time.perf_counter()
        Store.open(store_path).load_dense()
        dense_s.append(time.perf_counter() - t0)
    nbytes = store.expert_payload_bytes
    med = statistics.median
    return {
        "store": str(store_path), "expert_payload_bytes": nbytes, "experts": len(store.experts), "o_direct": direct,
        "read_ms": med(read_s) * 1e3, "sha256_ms": med(sha_s) * 1e3, "blake2b_ms": med(blake_s) * 1e3,
        "first_read_checked_ms": med(first_s) * 1e3,
        "read_MBps": nbytes / med(read_s) / MB, "sha256_MBps": nbytes / med(sha_s) / MB,
        "blake2b_MBps": nbytes / med(blake_s) / MB,
        "sha256_over_read": med(sha_s) / med(read_s),
        "dense_bytes": store.dense_bytes, "dense_load_checked_s": med(dense_s),
        "dense_MBps": store.dense_bytes / med(dense_s) / MB,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/adapmoe-verify"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    os.environ["ADAPMOE_HOME"] = str(a.workdir / "home")
    import torch

    from adapmoe_cli.model_arg import open_model
    from adapmoe_cli.store.writer import shard
    from adapmoe_cli.synthetic import TinySpec, write_checkpoint

    stores = {"embedded model": open_model(None).path}
    big = a.workdir / "store-44MB"
    if not big.exists():
        spec = TinySpec(num_hidden_layers=2, num_local_experts=8, hidden_size=1024, intermediate_size=3584,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=8000, max_position_embeddings=1024)
        ckpt = write_checkpoint(a.workdir / "ckpt-44MB", spec, dtype=torch.float32, num_shards=4)
        shard(ckpt, big)
    stores["44 MB experts"] = big
    res = {"load_avg_start": os.getloadavg(), "stores": {}}
    for name, path in stores.items():
        r = measure(path, a.repeats)
        res["stores"][name] = r
        print(f"{name}: expert {r['expert_payload_bytes'] / MB:.2f} MB ({r['experts']} experts, O_DIRECT "
              f"{r['o_direct']}): read {r['read_ms']:.2f} ms ({r['read_MBps']:,.0f} MB/s), sha256 "
              f"{r['sha256_ms']:.2f} ms ({r['sha256_MBps']:,.0f} MB/s, {r['sha256_over_read']:.2f}× the read), "
              f"blake2b {r['blake2b_ms']:.2f} ms; first read with the check {r['first_read_checked_ms']:.2f} ms; "
              f"dense {r['dense_bytes'] / MB:.1f} MB loaded and checked in {r['dense_load_checked_s'] * 1e3:.0f} ms",
              flush=True)
    res["load_avg_end"] = os.getloadavg()
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
