"""Long fuzz runs of every parser of outside input (targets in tests/fuzz_targets.py).

    .venv/bin/python scripts/fuzz.py --inputs 100000 --out docs/fuzz-results.json

Per target, `--inputs` mutated inputs drawn by hypothesis (chunks of 10,000 with their own seeds); each
must return or raise an AdapmoeError. Counts refusals, acceptances, crashes (any other exception, with
the first few kept) and hangs (an input still running after `--timeout` seconds); exits 1 if any target
crashed or hung. Runs on one core; the figures are in docs/reliability.md."""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from adapmoe_cli.errors import AdapmoeError  # noqa: E402
from tests.fuzz_targets import TARGETS, inputs, seeds_in_tempdir  # noqa: E402

CHUNK = 10_000


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang()


def fuzz(name: str, total: int, base_seed: int, timeout: int, report: Callable[[dict], None]) -> dict:
    tmp, seeds = seeds_in_tempdir()
    fn = TARGETS[name][0]
    counts = {"inputs": 0, "refused": 0, "accepted": 0, "crashes": 0, "hangs": 0}
    examples: list[str] = []
    strategy = inputs(name, seeds)
    t0 = time.perf_counter()
    chunk = 0
    while counts["inputs"] < total:
        n = min(CHUNK, total - counts["inputs"])

        @seed(base_seed * 1000 + chunk)
        @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(data: bytes) -> None:
            counts["inputs"] += 1
            signal.alarm(timeout)
            try:
                fn(seeds, data)
                counts["accepted"] += 1
            except AdapmoeError:
                counts["refused"] += 1
            except Hang:
                counts["hangs"] += 1
                examples.append(f"hang: {data[:200]!r}")
            except Exception as e:  # a crash: recorded, and the run goes on
                counts["crashes"] += 1
                if len(examples) < 5:
                    examples.append(f"{type(e).__name__}: {e} | input {data[:200]!r}\n"
                                    + "".join(traceback.format_exc(limit=-3)))
            finally:
                signal.alarm(0)

        before = counts["inputs"]
        run()
        chunk += 1
        if counts["inputs"] == before:  # hypothesis found nothing more to draw
            break
        print(f"  {name}: {counts['inputs']:,} inputs, {counts['crashes']} crashes, {counts['hangs']} hangs",
              file=sys.stderr, flush=True)
        report({**counts, "seconds": round(time.perf_counter() - t0, 1), "examples": examples, "finished": False})
    tmp.cleanup()
    return {**counts, "seconds": round(time.perf_counter() - t0, 1), "examples": examples, "finished": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs per target")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from: " + ", ".join(TARGETS))
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--timeout", type=int, default=10, help="seconds after which one input counts as a hang")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    results: dict[str, dict] = {}

    def save() -> None:  # after every chunk, so a long run that is stopped keeps what it did
        if args.out:
            doc = {"command": " ".join(sys.argv), "python": platform.python_version(), "seed": args.seed,
                   "targets": results}
            args.out.write_text(json.dumps(doc, indent=1))

    for name in args.targets.split(","):
        print(f"fuzzing {name} …", file=sys.stderr, flush=True)
        results[name] = fuzz(name, args.inputs, args.seed, args.timeout,
                             lambda partial, name=name: (results.__setitem__(name, partial), save()))
        r = results[name]
        print(f"{name}: {r['inputs']:,} inputs in {r['seconds']} s: {r['refused']:,} refused, {r['accepted']:,} "
              f"accepted, {r['crashes']} crashes, {r['hangs']} hangs", flush=True)
        save()
    sys.exit(1 if any(r["crashes"] or r["hangs"] for r in results.values()) else 0)


if __name__ == "__main__":
    main()
