"""Make the profile, routing trace and cache plan that ship beside an embedded model.

    python scripts/ship_default_profile.py [--model embedded|embedded-fine] [--workdir /tmp/adapmoe-ship]

Runs, on a fresh ADAPMOE_HOME, exactly what a user would run to turn AdapMoE on:
    adapmoe profile MODEL                                  (gradient method, 8,192 calibration tokens)
    adapmoe plan-cache MODEL --budget 50% --quality-budget 1%
and copies `profile.json`, `profile.trace.safetensors` and `plan.json` into the model's package folder
(src/adapmoe_cli/default_model/ or fine_model/).
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
FOLDERS = {"embedded": "default_model", "embedded-fine": "fine_model"}
FILES = ("profile.json", "profile.trace.safetensors", "plan.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(FOLDERS), default="embedded")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/adapmoe-ship"))
    a = ap.parse_args()
    out = ROOT / "src" / "adapmoe_cli" / FOLDERS[a.model]
    shutil.rmtree(a.workdir, ignore_errors=True)
    for name in FILES:  # never let an old shipped copy seed the store
        (out / name).unlink(missing_ok=True)
    env = {**os.environ, "ADAPMOE_HOME": str(a.workdir), "HF_HUB_OFFLINE": "1"}
    for args in (["profile", a.model], ["plan-cache", a.model, "--budget", "50%", "--quality-budget", "1%"]):
        print("adapmoe", " ".join(args), flush=True)
        subprocess.run([sys.executable, "-m", "adapmoe_cli", *args], env=env, check=True)
    store = a.workdir / "stores" / a.model
    for name in FILES:
        shutil.copyfile(store / name, out / name)
        print(f"wrote {out / name} ({(out / name).stat().st_size:,} bytes)")
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
