"""Build llama.cpp from source, for `adapmoe bench --policies llama.cpp,llama.cpp-uncapped`.

  python scripts/build_llamacpp.py [--root DIR] [--jobs 2]

1. downloads the *source* package of llama-cpp-python (it bundles llama.cpp and its converter
   `convert_hf_to_gguf.py`) with pip (`--no-binary :all: --no-deps`: no wheel, nothing installed) and
   extracts it into ADAPMOE_HOME/peers/llama-cpp-python-VERSION (or --root, or $ADAPMOE_LLAMA_CPP),
   whole or not at all;
2. configures llama.cpp with cmake (Ninja, Release, no server, no tests, no OpenSSL) and builds the
   tools the bench uses: llama-completion, llama-bench, llama-quantize (about 4.5 minutes on 2 cores);
   with --server also llama-server (the OpenAI-compatible server `bench --endpoint` and
   scripts/measure_serve.py compare `adapmoe serve` with).

Does nothing that is already done; prints where the tools are. The converter needs only what adapmoe
already has (torch, transformers, numpy, pyyaml, tqdm) and the bundled gguf-py, which it imports from
its own tree; its requirements file is never installed (it would replace torch and transformers)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from adapmoe_cli.peers.llamacpp import ENV_VAR, PACKAGE_VERSION, TOOLS, LlamaCpp, default_root, why_unavailable

CMAKE_FLAGS = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_SERVER=OFF"]


class BuildFailed(Exception):
    pass


def fetch_source(root: Path) -> None:
    """The source package extracted at `root` (a temporary sibling renamed into place when complete)."""
    if root.is_dir() and any(root.iterdir()):
        raise BuildFailed(f"{root} exists and holds no llama.cpp source; remove it or give another --root")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llama-src-", dir=root.parent) as tmp:
        print(f"downloading the source package llama-cpp-python=={PACKAGE_VERSION} (about 75 MB)", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-cache-dir",
               "-d", tmp, f"llama-cpp-python=={PACKAGE_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no archive was saved"])[-1]
            raise BuildFailed(f"pip could not download llama-cpp-python=={PACKAGE_VERSION}: {last}")
        out = Path(tmp) / "src"
        with tarfile.open(archives[0]) as tar:
            if hasattr(tarfile, "data_filter"):  # refuses members that would land outside `out`
                tar.extractall(out, filter="data")
            else:
                tar.extractall(out)  # noqa: S202 (Python < 3.11.4: the archive is PyPI's, fetched by pip)
        (top,) = [p for p in out.iterdir() if p.is_dir()]
        if not (top / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise BuildFailed(f"{archives[0].name} holds no vendor/llama.cpp; not the expected source package")
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        if root.exists():  # never removed: it may be someone's folder
            raise BuildFailed(f"{root} exists and holds no llama.cpp source; remove it or give another --root")
        os.replace(top, root)


def check_toolchain() -> None:
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise BuildFailed(f"{tool} is not installed; install it (e.g. `apt-get install cmake ninja-build`)")
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        raise BuildFailed("no C++ compiler found; install one (e.g. `apt-get install g++`)")


def build(llama: LlamaCpp, jobs: int, server: bool = False) -> None:
    build_dir = llama.root / "build"
    log = llama.root / "build.log"
    tools = [*TOOLS, *(["llama-server"] if server else [])]
    flags = [f for f in CMAKE_FLAGS if not (server and f.startswith("-DLLAMA_BUILD_SERVER"))]
    steps = []
    if not (build_dir / "build.ninja").is_file() or server:
        steps.append(["cmake", "-S", str(llama.tree), "-B", str(build_dir), *flags,
                      *(["-DLLAMA_BUILD_SERVER=ON"] if server else [])])
    steps.append(["cmake", "--build", str(build_dir), f"-j{jobs}", "--target", *tools])
    print(f"building {', '.join(tools)} with {jobs} jobs (log: {log})", flush=True)
    with log.open("a") as f:
        for cmd in steps:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-15:]
                print("\n".join(tail), file=sys.stderr)
                raise BuildFailed(f"`{' '.join(cmd[:3])} …` failed; the full log is {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help=f"where to extract and build (default: ${ENV_VAR}, else "
                                                  f"{default_root()})")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--server", action="store_true", help="also build llama-server")
    args = parser.parse_args()
    env = os.environ.get(ENV_VAR)
    llama = LlamaCpp((args.root or (Path(env).expanduser() if env else default_root())).resolve())
    try:
        if why_unavailable(llama) is not None or (args.server and not llama.tool("llama-server").is_file()):
            check_toolchain()
            if not llama.converter.is_file():
                fetch_source(llama.root)
            build(llama, args.jobs, args.server)
    except BuildFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    reason = why_unavailable(llama)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    for tool in [*TOOLS, *(["llama-server"] if args.server else [])]:
        print(llama.tool(tool))
    if importlib.util.find_spec("sentencepiece") is None:
        print("note: converting models to GGUF also needs sentencepiece: pip install 'adapmoe-cli[peers]'")
    if llama.root != default_root().resolve() and env is None:
        print(f"built outside the default place: export {ENV_VAR}={llama.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
