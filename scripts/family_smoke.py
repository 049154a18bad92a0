"""The commands a user runs, on a tiny random checkpoint of each supported family (written by transformers
itself, `synthetic.write_family_checkpoint`): `info`, `chat -p` (one answer), `chat --experts-format int8`,
`bench` (lru+prefetch and adapmoe: the store is profiled and planned on first use), `eval` and `simulate`
(the store's own routing trace, from its profile). Prints one line per
command with its exit code and last line; exits non-zero if any failed. Usage:
python scripts/family_smoke.py OUT_DIR [FAMILY ...]"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from adapmoe_cli.synthetic import TINY_FAMILIES, write_family_checkpoint


def main() -> int:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or sorted(TINY_FAMILIES)
    env = {**os.environ, "ADAPMOE_HOME": str(out / "home"), "NO_COLOR": "1", "COLUMNS": "160"}
    failed = 0
    for name in names:
        ckpt = out / name
        if not (ckpt / "config.json").exists():
            write_family_checkpoint(ckpt, name, dtype=torch.bfloat16)
        for args in (["info", str(ckpt)],
                     ["chat", str(ckpt), "-p", "Hello, what do experts do?", "-n", "12", "-c", "4"],
                     ["chat", str(ckpt), "-p", "Hello", "-n", "8", "--experts-format", "int8"],
                     ["bench", str(ckpt), "--policies", "lru+prefetch,adapmoe", "-n", "8", "-r", "1",
                      "--budget", "50%"],
                     ["eval", str(ckpt), "--tokens", "512"],
                     ["simulate", str(ckpt), "--budget", "50%"]):
            r = subprocess.run([sys.executable, "-m", "adapmoe_cli", *args], capture_output=True, text=True,
                               env=env, timeout=600)
            lines = (r.stdout.strip() or r.stderr.strip()).splitlines() or [""]
            failed += r.returncode != 0
            print(f"{name:12s} {args[0]:5s} {' '.join(args[2:4]):24s} rc={r.returncode} {lines[-1][:110]}", flush=True)
            if r.returncode:
                print(r.stderr[-600:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
