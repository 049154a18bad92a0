"""llama.cpp as a peer: where its build is, the model as a GGUF file, and one greedy run's command line
and timings.

The build is llama.cpp's own source as the `llama-cpp-python` source package ships it, compiled with
cmake by scripts/build_llamacpp.py into ADAPMOE_HOME/peers (or any built llama.cpp tree named by
$ADAPMOE_LLAMA_CPP). A GGUF is made from a store by exporting it as a hub-layout checkpoint, running
llama.cpp's `convert_hf_to_gguf.py` (through `convert_hf`, which names our tokenizer's pre-tokenizer),
and `llama-quantize` for the quantized widths; each is made once per (store fingerprint, width).
This module runs nothing at bench time: the bench runs `completion_argv` and feeds `parse_timings`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapmoe_cli.errors import PeerError, UsageError
from adapmoe_cli.paths import home

if TYPE_CHECKING:
    from adapmoe_cli.store import Store

#: the `llama-cpp-python` source package whose bundled llama.cpp (commit 0c1e570) we build
PACKAGE_VERSION = "0.3.36"
ENV_VAR = "ADAPMOE_LLAMA_CPP"
BUILD_COMMAND = "python scripts/build_llamacpp.py"
#: the tools the bench and the conversion use, built by cmake into <root>/build/bin
TOOLS = ("llama-completion", "llama-bench", "llama-quantize")
#: width → (converter --outtype, llama-quantize type or None)
WIDTHS = {"f32": ("f32", None), "bf16": ("bf16", None), "f16": ("f16", None),
          "q8_0": ("f32", "Q8_0"), "q4_0": ("f32", "Q4_0")}


def peers_dir() -> Path:
    return home() / "peers"


def default_root() -> Path:
    """Where scripts/build_llamacpp.py extracts the source package and builds it."""
    return peers_dir() / f"llama-cpp-python-{PACKAGE_VERSION}"


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp build: `root` is the extracted source package (llama.cpp under vendor/llama.cpp) or a
    llama.cpp checkout; cmake's build folder is `root/build` either way."""

    root: Path

    @property
    def tree(self) -> Path:
        vendored = self.root / "vendor" / "llama.cpp"
        return vendored if vendored.is_dir() else self.root

    @property
    def converter(self) -> Path:
        return self.tree / "convert_hf_to_gguf.py"

    @property
    def bin_dir(self) -> Path:
        return self.root / "build" / "bin"

    def tool(self, name: str) -> Path:
        return self.bin_dir / name


def locate() -> LlamaCpp:
    """The build $ADAPMOE_LLAMA_CPP names, else the default place the build script uses."""
    env = os.environ.get(ENV_VAR)
    return LlamaCpp(Path(env).expanduser() if env else default_root())


def why_unavailable(llama: LlamaCpp | None = None) -> str | None:
    """None when llama.cpp is built and its converter is there; else one line saying what is missing
    and what to do."""
    llama = llama or locate()
    named = os.environ.get(ENV_VAR)
    remedy = (f"point {ENV_VAR} at a llama.cpp source tree built with cmake, or unset it and run "
              f"`{BUILD_COMMAND}`") if named else f"run `{BUILD_COMMAND}` (or set {ENV_VAR} to a built llama.cpp)"
    where = f"{ENV_VAR}={named}" if named else str(llama.root)
    if not llama.root.is_dir():
        return f"llama.cpp is not installed: {where} is not a folder; {remedy}"
    if not llama.converter.is_file():
        return f"llama.cpp is not installed: no convert_hf_to_gguf.py in {llama.tree}; {remedy}"
    missing = [t for t in TOOLS if not os.access(llama.tool(t), os.X_OK)]
    if missing:
        return f"llama.cpp is not built: no {', '.join(missing)} in {llama.bin_dir}; {remedy}"
    return None


def require(llama: LlamaCpp | None = None) -> LlamaCpp:
    llama = llama or locate()
    reason = why_unavailable(llama)
    if reason:
        raise PeerError(reason)
    return llama


# --- the model as a GGUF file -------------------------------------------------------------------------------


def pre_tokenizer_name(tokenizer_json: bytes | None) -> str | None:
    """llama.cpp's name for the store tokenizer's pre-tokenizer when its converter may not list the hash:
    `gpt-2` for byte-level BPE splitting with GPT-2's regex (HF `ByteLevel` with `use_regex`, no prefix
    space), the split llama.cpp's `gpt-2` type does; None for anything else (the converter decides)."""
    if tokenizer_json is None:
        return None
    try:
        tok = json.loads(tokenizer_json)
    except ValueError:
        return None
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    if (model.get("type") == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False) and tok.get("normalizer") is None):
        return "gpt-2"
    return None


def gguf_path(store_key: str, name: str, width: str) -> Path:
    return peers_dir() / "gguf" / f"{name}-{store_key[:16]}-{width}.gguf"


def _store_key(store: Store) -> str:
    if store.fingerprint:
        return store.fingerprint
    return hashlib.sha256((store.path / "manifest.json").read_bytes()).hexdigest()


#: a log line's prefix: llama.cpp's `0.00.030.580 E ` (time, level) or Python logging's `ERROR:hf-to-gguf:`
_LOG_PREFIX = re.compile(r"^(?:[\d.]+ [A-Z] |(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.-]+:)")


def _last_line(text: str) -> str:
    """A tool's last message, without traceback frames or a log prefix."""
    lines = [_LOG_PREFIX.sub("", ln).strip() for ln in text.splitlines() if not ln.startswith((" ", "\t"))]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else "no message"


def gguf_for(store: Store, width: str, note: Callable[[str], None] | None = None) -> Path:
    """`store` as a GGUF file of `width` (f32, bf16, f16, q8_0, q4_0), made once per store and width under
    ADAPMOE_HOME/peers/gguf: exported as a checkpoint, converted by llama.cpp's converter (f32/bf16/f16),
    quantized by `llama-quantize` from the f32 file (q8_0/q4_0). Each file appears whole or not at all."""
    from adapmoe_cli.store.export import export_checkpoint

    if width not in WIDTHS:
        raise UsageError(f"unknown GGUF width {width!r}; one of {', '.join(WIDTHS)}")
    llama = require()
    out = gguf_path(_store_key(store), store.path.name, width)
    if out.is_file():
        return out
    outtype, qtype = WIDTHS[width]
    source = gguf_for(store, "f32", note) if qtype else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}-", dir=out.parent) as tmp:
        made = Path(tmp) / out.name
        if source is not None:
            if note:
                note(f"quantizing {source.name} to {qtype} with llama-quantize")
            _run([str(llama.tool("llama-quantize")), str(source), str(made), qtype],
                 f"llama-quantize failed on {source.name} ({qtype})")
        else:
            if importlib.util.find_spec("sentencepiece") is None:  # their converter imports it for every llama
                raise PeerError("llama.cpp's converter needs sentencepiece: pip install 'adapmoe-cli[peers]'")
            if note:
                note(f"converting {store.path.name} to GGUF ({width}) with llama.cpp's converter")
            ckpt = export_checkpoint(store, Path(tmp) / "checkpoint")
            cmd = [sys.executable, "-m", "adapmoe_cli.peers.convert_hf", "--tree", str(llama.tree)]
            name = pre_tokenizer_name(store.side_file("tokenizer.json"))
            if name:
                cmd += ["--pre-tokenizer", name]
            cmd += ["--", str(ckpt), "--outfile", str(made), "--outtype", outtype]
            _run(cmd, f"llama.cpp's converter could not convert {store.path.name} to GGUF ({width})")
        if not made.is_file():
            raise PeerError(f"llama.cpp wrote no GGUF file for {store.path.name} ({width})")
        os.replace(made, out)
    return out


def _run(cmd: list[str], failure: str) -> None:
    # no network for the converter (it reads a local checkpoint) and no prompts from tools
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env,
                              stdin=subprocess.DEVNULL)
    except OSError as e:
        raise PeerError(f"{failure}: {e.strerror or e}") from None
    if done.returncode != 0:
        raise PeerError(f"{failure}: {_last_line(done.stderr or done.stdout)}")


# --- one greedy run -----------------------------------------------------------------------------------------


def prompt_text(tokenizer: Any, ids: list[int]) -> str:
    """The text whose tokenization, with special tokens parsed and nothing added, is `ids` (the chat
    template's output: `<s><|user|>\\n…<|end|>\\n<|assistant|>\\n`): decoding a byte-level BPE gives back
    the exact text. Run with `verbose_prompt` and compare `parse_prompt_ids` to be sure for a tokenizer."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def completion_argv(gguf: Path, prompt: str | Path, tokens: int, threads: int = 2, *, context: int | None = None,
                    warmup: bool = True, repack: bool = True, verbose_prompt: bool = False,
                    llama: LlamaCpp | None = None) -> list[str]:
    """`llama-completion` decoding exactly `tokens` tokens greedily after `prompt` (text, or a file holding
    it: `prompt_text`), its weights memory-mapped, on `threads` threads. The prompt is taken as is:
    special tokens parsed, no escapes processed, no BOS added (the template already has it), no chat
    template applied again. `context` sizes the KV cache; give it (prompt + tokens is enough): without
    it llama.cpp allocates the model's whole trained context (4 GiB of KV cache for Mixtral's 32k).
    `repack=False`: quantized weights stay in the mapping as the file has them; by default llama.cpp copies
    them into a layout of its own in anonymous memory (Q4_0 on AVX-512: the whole model again, which no
    memory cap below about twice the file lets it make)."""
    llama = llama or locate()
    argv = [str(llama.tool("llama-completion")), "-m", str(gguf),
            "-no-cnv", "--no-escape", "--no-display-prompt",
            "--override-kv", "tokenizer.ggml.add_bos_token=bool:false",
            "-n", str(tokens), "--ignore-eos",
            "--temp", "0", "--top-k", "1", "--seed", "0",
            "-t", str(threads), "-tb", str(threads),
            "--load-mode", "mmap", "-ngl", "0"]
    argv += ["-bf", str(prompt)] if isinstance(prompt, Path) else ["-p", prompt]
    if context is not None:
        argv += ["-c", str(context)]
    if not warmup:
        argv.append("--no-warmup")
    if not repack:
        argv.append("--no-repack")
    if verbose_prompt:
        argv.append("--verbose-prompt")
    return argv


_PERF = re.compile(r"(?P<what>load|prompt eval|eval) time\s*=\s*(?P<ms>[\d.]+) ms(?: /\s*(?P<n>\d+) (?:tokens|runs))?")
# `--verbose-prompt` lines, after the log's optional `0.00.030.580 I ` prefix (time, level)
_PROMPT_ID = re.compile(r"^(?:[\d.]+ [A-Z] )?\s*(\d+) -> '", re.MULTILINE)
_GENERATING = re.compile(r"generate: n_ctx = \d+")
_PROMPT_COUNT = re.compile(r"number of tokens in prompt = (\d+)")


class TimingsLost(PeerError):
    """llama-completion generated but exited before its log thread wrote the timings out: its log is a
    queue drained by a thread the process does not wait for at exit (llama.cpp says so in
    `common_log_main`), so on a busy CPU the tail of stdout and stderr is sometimes lost. Run it again."""


def parse_timings(stdout: str, stderr: str) -> dict[str, float | int]:
    """The counts and times of llama.cpp's own performance print (`common_perf_print`): prompt_tokens,
    prefill_s, decode_tokens (eval runs: tokens fed after the prompt's pass), decode_s, load_s.
    Raises TimingsLost when the run reached generation but its log's tail never came out (run it again),
    PeerError with llama.cpp's last message when it failed before."""
    found: dict[str, tuple[float, int | None]] = {}
    for text in (stderr, stdout):
        for m in _PERF.finditer(text):
            found.setdefault(m["what"], (float(m["ms"]) / 1000, int(m["n"]) if m["n"] else None))
    if "prompt eval" not in found or "eval" not in found:
        if _GENERATING.search(stderr):
            raise TimingsLost("llama.cpp exited before its log printed the timings (its log thread is not "
                              "waited for at exit); run it again")
        raise PeerError(f"llama.cpp printed no timings: {_last_line(stderr or stdout)}")
    (prefill_s, prompt_tokens), (decode_s, decode_tokens) = found["prompt eval"], found["eval"]
    timings: dict[str, float | int] = {"prompt_tokens": prompt_tokens or 0, "prefill_s": prefill_s,
                                       "decode_tokens": decode_tokens or 0, "decode_s": decode_s}
    if "load" in found:
        timings["load_s"] = found["load"][0]
    return timings


def parse_prompt_ids(stderr: str) -> list[int]:
    """The prompt's token ids as `--verbose-prompt` lists them (`   123 -> 'piece'`)."""
    m = _PROMPT_COUNT.search(stderr)
    if m is None:
        return []
    ids = [int(x) for x in _PROMPT_ID.findall(stderr[m.end():])]
    return ids[: int(m[1])]
