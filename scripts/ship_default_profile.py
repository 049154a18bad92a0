"""Make the profile, routing trace and cache plan that ship beside an embedded model.

    python scripts/ship_default_profile.py [--model embedded|embedded-fine] [--workdir /tmp/adapmoe-ship]

Runs, on a fresh ADAPMOE_HOME, exactly what a user would run to turn AdapMoE on:
    adapmoe profile MODEL                                  (gradient method, 8,192 calibration tokens)
    adapmoe plan-cache MODEL --budget 50% --quality-budget 1%
and copies `profile.json`, `profile.trace.safetensors`, `profile.experts.safetensors` and `plan.json` into
the model's package folder (src/adapmoe_cli/default_model/ or fine_model/), with `shipped.json`: the
sha256 of every version of each file ever shipped (this one, the git history's, the previous list's), by
which an upgraded adapmoe knows a store's copy for one it installed and replaces it
(`model_arg.install_shipped_method`).
`adapmoe_cli.model_arg` installs them into the embedded model's store when it is made. Re-run it whenever
the embedded model, the store format's fingerprint or the profile/plan formats change (a test checks that
the shipped files are accepted for the embedded model)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"embedded": "default_model", "embedded-fine": "fine_model"}
FILES = ("profile.json", "profile.trace.safetensors", "profile.experts.safetensors", "plan.json")


def versions(out: Path, name: str, listed: dict[str, list[str]]) -> list[str]:
    """sha256 of `out/name` now, then of every version of it in the git history and the previous list."""
    rel = (out / name).relative_to(ROOT).as_posix()
    commits = subprocess.run(["git", "log", "--format=%H", "--", rel], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    blobs = [subprocess.run(["git", "show", f"{c}:{rel}"], cwd=ROOT, capture_output=True, check=False) for c in commits]
    digests = [hashlib.sha256((out / name).read_bytes()).hexdigest()]
    digests += [hashlib.sha256(b.stdout).hexdigest() for b in blobs if b.returncode == 0]
    return list(dict.fromkeys(digests + listed.get(name, [])))


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
    listed_path = out / "shipped.json"
    listed = json.loads(listed_path.read_text()) if listed_path.exists() else {}
    listed_path.write_text(json.dumps({name: versions(out, name, listed) for name in FILES}, indent=1) + "\n")
    print(f"wrote {listed_path}")
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
