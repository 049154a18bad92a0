"""Measure the offloading runtime on a generated store whose experts total more than 2 GB.

  python scripts/measure_runtime.py [--workdir /tmp/adapmoe-runtime] [--tokens 32] [--keep]

Writes a random float32 Mixtral-shaped checkpoint in hub layout, shards it, then runs each
configuration in its own process (so peak RSS is that configuration's own):
  quarter budget with and without prefetch: decode tok/s, hit rate, stall share, peak RSS;
  full budget: decode tok/s of the runtime against plain transformers `generate` on the checkpoint.
Prints a table and writes results.json into the workdir."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT_LEN = 16


def peak_rss() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux keeps it across exec, so a child forked
    from this script after sharding would report the parent's peak."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child_runtime(store: str, slots: int, prefetch: bool, tokens: int) -> dict:
    import torch

    from adapmoe_cli import budget as budgets
    from adapmoe_cli.runtime.engine import Engine
    from adapmoe_cli.runtime.measure import timed_decode
    from adapmoe_cli.settings import load_settings
    from adapmoe_cli.store import Store

    torch.manual_seed(0)
    prompt = torch.randint(3, 300, (PROMPT_LEN,)).tolist()
    st = Store.open(Path(store))
    settings = load_settings(overrides={"prefetch": prefetch})
    with Engine(st, settings, budgets.resolve(budgets.BudgetRequest(slots=slots), st.cache_shape)) as eng:
        runs = []
        for _ in range(2 if slots == len(st.experts) else 1):  # full budget: warm the cache first
            r = timed_decode(eng, prompt, tokens)
            runs.append({"prefill_s": r.prefill_s, "decode_s": r.decode_s, "decode_tokens": tokens,
                         "decode_tok_s": r.decode_tps, "stats": r.stats.as_dict()})
        out = runs[-1]
    out["peak_rss_bytes"] = peak_rss()
    out["dense_bytes"] = st.dense_bytes
    out["budget_bytes"] = slots * st.slot_bytes
    return out


def child_transformers(ckpt: str, tokens: int, impl: str) -> dict:
    import torch
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    prompt = torch.randint(3, 300, (PROMPT_LEN,)).tolist()
    model = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    if impl != "default":
        model.set_experts_implementation(impl)
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, **kw)
    t2 = time.perf_counter()
    decode_s = (t2 - t1) - (t1 - t0)
    return {"decode_s": decode_s, "decode_tok_s": tokens / decode_s,
            "peak_rss_bytes": peak_rss()}


def run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/adapmoe-runtime"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and store")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "runtime":
            print(json.dumps(child_runtime(rest[0], int(rest[1]), rest[2] == "1", int(rest[3]))))
        else:
            print(json.dumps(child_transformers(rest[0], int(rest[1]), rest[2])))
        return

    import torch

    from adapmoe_cli.store import Store
    from adapmoe_cli.store.writer import shard
    from adapmoe_cli.synthetic import TinySpec, write_checkpoint

    spec = TinySpec(num_hidden_layers=a.layers, num_local_experts=8, hidden_size=a.hidden,
                    intermediate_size=a.intermediate, num_attention_heads=16, num_key_value_heads=4,
                    vocab_size=32000, max_position_embeddings=4096)
    ckpt, store_dir = a.workdir / "checkpoint", a.workdir / "store"
    if not (ckpt / "model.safetensors.index.json").exists():
        print("writing checkpoint …", flush=True)
        write_checkpoint(ckpt, spec, dtype=torch.float32, num_shards=6)
    print("sharding …", flush=True)
    shard(ckpt, store_dir)
    st = Store.open(store_dir)
    experts = len(st.experts)
    quarter = experts // 4
    print(f"store: {experts} experts × {st.slot_bytes / 2**20:.1f} MiB = {experts * st.slot_bytes / 2**30:.2f} GiB "
          f"experts, dense {st.dense_bytes / 2**20:.0f} MiB", flush=True)
    res: dict = {"experts": experts, "expert_slot_bytes": st.slot_bytes, "dense_bytes": st.dense_bytes,
                 "tokens": a.tokens, "machine": {"cpus": __import__("os").cpu_count()}}
    for name, slots, pf in (("quarter+prefetch", quarter, 1), ("quarter-no-prefetch", quarter, 0),
                            ("quarter+prefetch#2", quarter, 1), ("quarter-no-prefetch#2", quarter, 0),
                            ("full", experts, 1)):
        print(f"running {name} …", flush=True)
        res[name] = run_child("runtime", str(store_dir), str(slots), str(pf), str(a.tokens))
    for impl in ("default", "eager"):
        print(f"running transformers generate ({impl} experts) …", flush=True)
        res[f"transformers-{impl}"] = run_child("transformers", str(ckpt), str(a.tokens), impl)
    (a.workdir / "results.json").write_text(json.dumps(res, indent=2))

    mib = 2**20
    print(f"\n{'config':24} {'decode tok/s':>12} {'hit rate':>9} {'stall share':>11} {'peak RSS MiB':>12} "
          f"{'limit MiB':>10}")
    for name in ("quarter+prefetch", "quarter+prefetch#2", "quarter-no-prefetch", "quarter-no-prefetch#2", "full",
                 "transformers-default", "transformers-eager"):
        r = res[name]
        s = r.get("stats", {})
        limit = (r["dense_bytes"] + r["budget_bytes"]) / mib + 300 if "dense_bytes" in r else float("nan")
        share = s.get("stall_s", 0) / r["decode_s"] if s else float("nan")
        print(f"{name:24} {r['decode_tok_s']:12.2f} {s.get('hit_rate', float('nan')):9.2f} {share:11.2f} "
              f"{r['peak_rss_bytes'] / mib:12.0f} {limit:10.0f}")
    for impl in ("default", "eager"):
        ratio = res["full"]["decode_tok_s"] / res[f"transformers-{impl}"]["decode_tok_s"]
        print(f"full budget: runtime / transformers generate ({impl} experts) decode speed = {ratio:.3f}")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
