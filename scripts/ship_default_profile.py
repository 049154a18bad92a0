"""Make the profile, routing trace and cache plan that ship beside the embedded model.

    python scripts/ship_default_profile.py [--workdir /tmp/adapmoe-ship]

Runs, on a fresh ADAPMOE_HOME, exactly what a user would run to turn AdapMoE on:
    adapmoe profile                                  (gradient method, 8,192 calibration tokens)
    adapmoe plan-cache --budget 50% --quality-budget 1%
and copies `profile.json`, `profile.trace.safetensors` and `plan.json` into src/adapmoe_cli/default_model/.
`adapmoe_cli.model_arg` installs them into the embedded model's store when it is made. Re-run it whenever
the embedded model, the store format's fingerprint or the profile/plan formats change (a test checks that
the shipped files are accepted for the embedded model)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "adapmoe_cli" / "default_model"
FILES = ("profile.json", "profile.trace.safetensors", "plan.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/adapmoe-ship"))
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    for name in FILES:  # never let an old shipped copy seed the store
        (OUT / name).unlink(missing_ok=True)
    env = {**os.environ, "ADAPMOE_HOME": str(a.workdir), "HF_HUB_OFFLINE": "1"}
    for args in (["profile"], ["plan-cache", "--budget", "50%", "--quality-budget", "1%"]):
        print("adapmoe", " ".join(args), flush=True)
        subprocess.run([sys.executable, "-m", "adapmoe_cli", *args], env=env, check=True)
    store = a.workdir / "stores" / "embedded"
    for name in FILES:
        shutil.copyfile(store / name, OUT / name)
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size:,} bytes)")
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
