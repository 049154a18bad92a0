"""Runs llama.cpp's own `convert_hf_to_gguf.py`, unchanged, in this (child) process, with two things set
from outside instead of by editing its files:

- a tokenizer whose pre-tokenizer hash the converter does not list gets the name we give
  (`--pre-tokenizer gpt-2` for a byte-level BPE with GPT-2's split regex: llama.cpp then splits text
  exactly as the tokenizer does); a listed hash keeps the converter's own answer;
- transformers' `from_pretrained` loaders never run code from the checkpoint (`trust_remote_code` is
  forced off, as everywhere in adapmoe).

  python -m adapmoe_cli.peers.convert_hf --tree LLAMA_CPP [--pre-tokenizer NAME] -- CONVERTER-ARGS…

`llamacpp.gguf_for` starts it; the converter's exit status and messages are passed through."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any


def _no_remote_code(cls: Any) -> None:
    original = cls.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        kwargs["trust_remote_code"] = False
        return original(*args, **kwargs)

    cls.from_pretrained = staticmethod(from_pretrained)


def _name_unknown_pre_tokenizer(text_model: Any, name: str) -> None:
    original = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # the hash is not in their list: the name we were given
            print(f"adapmoe: unlisted pre-tokenizer hash, named {name!r}", file=sys.stderr)
            return name

    text_model.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adapmoe_cli.peers.convert_hf")
    parser.add_argument("--tree", type=Path, required=True, help="the llama.cpp source tree")
    parser.add_argument("--pre-tokenizer", help="llama.cpp's name for a pre-tokenizer it does not recognise")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the converter's own arguments")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    script = args.tree / "convert_hf_to_gguf.py"

    # what running their script directly would put first on the path: its folder and the bundled gguf-py
    sys.path[:0] = [str(args.tree), str(args.tree / "gguf-py")]
    import transformers

    for loader in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModel):
        _no_remote_code(loader)
    if args.pre_tokenizer:
        from conversion.base import TextModel  # their package, found through args.tree

        _name_unknown_pre_tokenizer(TextModel, args.pre_tokenizer)

    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = [str(script), *rest]
    module.main()


if __name__ == "__main__":
    main()
