"""llama.cpp as a peer (peers/llamacpp.py) without building llama.cpp: the timings parser on a run we
captured from the real `llama-completion` (tests/data/), the one-line reasons when llama.cpp is missing,
and the GGUF pipeline (export → our converter wrapper → llama-quantize → cache) through a stand-in
llama.cpp tree whose converter and tools are small scripts. The real build is checked end to end by
scripts/check_llamacpp.py."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from adapmoe_cli.errors import PeerError, UsageError
from adapmoe_cli.peers import llamacpp
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec

DATA = Path(__file__).parent / "data"

# A stand-in for llama.cpp's converter: their module layout (`conversion.base.TextModel` whose
# `get_vocab_base_pre` rejects an unknown hash), our arguments, and a "GGUF" that records what it was asked.
FAKE_BASE = '''
class TextModel:
    def get_vocab_base_pre(self, tokenizer):
        raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")
'''
FAKE_CONVERTER = '''
import argparse, json, os, sys
from pathlib import Path
from conversion.base import TextModel

def main():
    p = argparse.ArgumentParser()
    p.add_argument("model"); p.add_argument("--outfile"); p.add_argument("--outtype")
    a = p.parse_args()
    if os.environ.get("FAKE_CONVERTER_FAILS"):
        print("INFO:hf-to-gguf:Loading model: checkpoint", file=sys.stderr)
        print("ERROR:hf-to-gguf:Model MixtralForCausalLM is not supported", file=sys.stderr)
        sys.exit(1)
    pre = TextModel().get_vocab_base_pre(None)
    model_type = json.loads((Path(a.model) / "config.json").read_text())["model_type"]
    Path(a.outfile).write_text(f"{a.outtype} {pre} {model_type}")
'''
FAKE_TOOL = "#!/bin/sh\nexit 0\n"
FAKE_QUANTIZE = '#!/bin/sh\ncat "$1" > "$2" && printf " %s" "$3" >> "$2"\n'


def _fake_llama(root: Path) -> Path:
    (root / "conversion").mkdir(parents=True)
    (root / "conversion" / "__init__.py").write_text("")
    (root / "conversion" / "base.py").write_text(FAKE_BASE)
    (root / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    bins = root / "build" / "bin"
    bins.mkdir(parents=True)
    for tool in llamacpp.TOOLS:
        (bins / tool).write_text(FAKE_QUANTIZE if tool == "llama-quantize" else FAKE_TOOL)
        (bins / tool).chmod((bins / tool).stat().st_mode | stat.S_IXUSR)
    return root


@pytest.fixture
def fake_llama(tmp_path, monkeypatch):
    root = _fake_llama(tmp_path / "llama.cpp")
    monkeypatch.setenv(llamacpp.ENV_VAR, str(root))
    return root


@pytest.fixture(scope="module")
def tiny(make_store):
    return Store.open(make_store(TinySpec(), dtype=torch.float32))


# --- timings ------------------------------------------------------------------------------------------------


def _captured() -> tuple[str, str]:
    # llama-completion (llama-cpp-python 0.3.36's llama.cpp) on the embedded model's f32 GGUF: the argv of
    # completion_argv (32 tokens, --verbose-prompt) after the 29-token chat prompt of "Tell me a short story
    # about a robot who learns to paint."
    return (DATA / "llama-completion.stdout").read_text(), (DATA / "llama-completion.stderr").read_text()


def test_the_timings_of_a_real_llama_completion_run_are_parsed():
    stdout, stderr = _captured()
    t = llamacpp.parse_timings(stdout, stderr)
    assert t == {"prompt_tokens": 29, "prefill_s": 0.00597, "decode_tokens": 31, "decode_s": 0.02091,
                 "load_s": 0.01128}  # 31 runs: the first of the 32 tokens comes out of the prompt's pass
    ids = llamacpp.parse_prompt_ids(stderr)
    assert len(ids) == 29 and ids[:3] == [1, 5, 206] and ids[-4:] == [7, 206, 6, 206]  # <s><|user|>\n…


def test_a_run_whose_log_tail_was_lost_says_to_run_it_again():
    # llama.cpp's log thread is not waited for at exit: on a busy machine the tail of both streams is lost
    stdout, stderr = _captured()
    cut = stderr[: stderr.index("common_perf_print")]
    with pytest.raises(llamacpp.TimingsLost, match="run it again"):
        llamacpp.parse_timings(stdout[:20], cut)


def test_a_run_that_printed_no_timings_is_one_line_with_llama_cpp_s_last_message():
    stderr = ("0.00.003.573 E gguf_init_from_file: failed to open GGUF file '/x.gguf' (No such file or directory)\n"
              "0.00.003.605 E cmn  common_init_: failed to load model '/x.gguf'\n"
              "0.00.003.609 E llama_completion: error: unable to create context\n")
    with pytest.raises(PeerError) as e:
        llamacpp.parse_timings("", stderr)
    assert not isinstance(e.value, llamacpp.TimingsLost)
    assert str(e.value) == "llama.cpp printed no timings: llama_completion: error: unable to create context"


def test_the_argv_decodes_greedily_exactly_n_tokens_from_the_given_text_with_mmap(fake_llama):
    argv = llamacpp.completion_argv(Path("/m.gguf"), "<s><|user|>\nhi<|end|>\n<|assistant|>\n", 64, context=100)
    assert argv[0] == str(fake_llama / "build" / "bin" / "llama-completion")
    pairs = dict(zip(argv, argv[1:], strict=False))
    assert pairs["-m"] == "/m.gguf" and pairs["-n"] == "64" and pairs["-t"] == "2" and pairs["-c"] == "100"
    assert pairs["--temp"] == "0" and pairs["--top-k"] == "1" and pairs["--load-mode"] == "mmap"
    assert pairs["--override-kv"] == "tokenizer.ggml.add_bos_token=bool:false"
    assert pairs["-p"].endswith("<|assistant|>\n")
    assert {"-no-cnv", "--ignore-eos", "--no-escape"} <= set(argv)
    assert "--no-repack" not in argv and "--no-warmup" not in argv  # uncapped: llama.cpp's defaults
    # under a memory cap: no warmup pass, and quantized weights read from the mapping, not copied out of it
    capped = llamacpp.completion_argv(Path("/m.gguf"), "hi", 64, warmup=False, repack=False)
    assert {"--no-warmup", "--no-repack"} <= set(capped)
    assert llamacpp.completion_argv(Path("/m.gguf"), Path("/p.txt"), 8)[-2:] == ["-bf", "/p.txt"]


# --- where llama.cpp is -------------------------------------------------------------------------------------


def test_an_env_var_pointing_nowhere_is_one_line_naming_it_and_the_build_script(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_VAR, str(tmp_path / "nowhere"))
    reason = llamacpp.why_unavailable()
    assert reason is not None and "\n" not in reason
    assert f"{llamacpp.ENV_VAR}={tmp_path / 'nowhere'} is not a folder" in reason
    assert llamacpp.BUILD_COMMAND in reason


def test_without_the_env_var_the_default_place_under_adapmoe_home_is_used(monkeypatch):
    monkeypatch.delenv(llamacpp.ENV_VAR, raising=False)
    assert llamacpp.locate().root == llamacpp.default_root()
    assert str(llamacpp.default_root()).startswith(str(llamacpp.peers_dir()))
    reason = llamacpp.why_unavailable()
    assert reason and "not installed" in reason and llamacpp.BUILD_COMMAND in reason


def test_source_without_built_tools_names_the_missing_tools(fake_llama):
    assert llamacpp.why_unavailable() is None
    (fake_llama / "build" / "bin" / "llama-completion").unlink()
    reason = llamacpp.why_unavailable()
    assert reason and "not built: no llama-completion in" in reason and "\n" not in reason


def test_gguf_for_without_llama_cpp_raises_the_same_reason(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(PeerError, match="is not a folder"):
        llamacpp.gguf_for(tiny, "f32")
    with pytest.raises(UsageError, match="unknown GGUF width 'q2_k'"):
        llamacpp.gguf_for(tiny, "q2_k")


# --- conversion ---------------------------------------------------------------------------------------------


def test_pre_tokenizer_names():
    gpt2 = b'{"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, ' \
           b'"use_regex": true}, "normalizer": null}'
    assert llamacpp.pre_tokenizer_name(gpt2) == "gpt-2"
    assert llamacpp.pre_tokenizer_name(gpt2.replace(b'"add_prefix_space": false', b'"add_prefix_space": true')) is None
    assert llamacpp.pre_tokenizer_name(b'{"model": {"type": "Unigram"}}') is None
    assert llamacpp.pre_tokenizer_name(b"not json") is None and llamacpp.pre_tokenizer_name(None) is None


def test_conversion_names_the_unknown_pre_tokenizer_quantizes_and_caches(tiny, fake_llama):
    f32 = llamacpp.gguf_for(tiny, "f32")
    # the converter ran unchanged; our wrapper answered its unknown-hash error with the GPT-2 split
    assert f32.read_text() == "f32 gpt-2 mixtral"
    assert f32.parent == llamacpp.peers_dir() / "gguf" and tiny.fingerprint[:16] in f32.name
    q4 = llamacpp.gguf_for(tiny, "q4_0")  # llama-quantize from the f32 file
    assert q4.read_text() == "f32 gpt-2 mixtral Q4_0"
    f32.write_text("cached")
    assert llamacpp.gguf_for(tiny, "f32").read_text() == "cached"  # made once per store and width
    assert sorted(p.name for p in f32.parent.iterdir()) == sorted([f32.name, q4.name])  # no temporaries left


def test_a_conversion_error_is_one_line_with_the_converter_s_message_and_leaves_no_file(tiny, fake_llama,
                                                                                         monkeypatch):
    monkeypatch.setenv("FAKE_CONVERTER_FAILS", "1")
    with pytest.raises(PeerError) as e:
        llamacpp.gguf_for(tiny, "bf16")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("llama.cpp's converter could not convert store to GGUF (bf16): ")
    assert message.endswith("Model MixtralForCausalLM is not supported")
    assert list((llamacpp.peers_dir() / "gguf").iterdir()) == []
