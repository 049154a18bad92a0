"""`adapmoe chat` as a user meets it: one-shot and JSON output through the real CLI process, and an
interactive session in a real pseudo-terminal (pexpect): /help, two turns, /stats, /save, Ctrl-C mid-answer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from adapmoe_cli.synthetic import TinySpec

# slow enough per token (1 slot per layer, no prefetch, 1.5 MiB experts) that Ctrl-C lands mid-answer
SLOW = TinySpec(num_hidden_layers=4, num_local_experts=8, hidden_size=256, intermediate_size=512,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096)


def _run(*args: str, input: str | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "adapmoe_cli", *args], capture_output=True, text=True,
                          input=input, env=env, timeout=120)


def test_one_shot_json(make_store):
    store = make_store(TinySpec(), dtype=torch.float32)
    r = _run("chat", str(store), "--prompt", "What does the json module do?", "-n", "8", "-c", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "token_ids", "stats"}
    assert 1 <= len(out["token_ids"]) <= 8
    st = out["stats"]
    for key in ("tokens", "tokens_per_s", "prompt_tokens_per_s", "experts_per_token", "hits", "misses",
                "prefetch_hits", "bytes_read", "stall_s", "context_used", "context_max", "peak_rss_bytes"):
        assert key in st
    assert st["context_max"] == TinySpec().max_position_embeddings and 0 < st["context_used"] < st["context_max"]
    assert st["peak_rss_bytes"] > 50 << 20 and st["prompt_tokens"] > 0
    assert st["tokens"] == len(out["token_ids"])
    assert st["experts_per_token"] == pytest.approx(2.0)
    assert st["misses"] >= 1 and st["bytes_read"] > 0


def test_prompt_from_stdin_and_raw(make_store):
    store = make_store(TinySpec(), dtype=torch.float32)
    r = _run("chat", str(store), "-n", "5", "--raw", input="def main():\n")
    assert r.returncode == 0, r.stderr
    assert "tokens" in r.stderr and "hit rate" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["chat", "no/such/thing/here", "-p", "x"], "is not a store"),
    (["chat", "STORE", "-p", "x", "-c", "1"], "below one per MoE layer"),
    (["chat", "STORE", "-p", "x", "-c", "0"], "--cache-experts must be at least 1 slot"),
    (["chat", "STORE", "-p", "x", "--ctx", "1"], "--ctx must be at least 2"),
    (["chat", "STORE", "-p", "x" * 2000, "-n", "10"], "exceeds the context of 256 tokens"),  # one-shot: refused
    (["chat", "STORE", "-p", "x", "--memory", "six gigs"], "cannot parse size"),
    (["chat", "STORE", "-p", "x", "--device", "tpu"], "unsupported device"),
    (["chat", "STORE", "-p", "x", "--temperature", "-1"], "temperature"),
])
def test_bad_input_is_one_line(make_store, args, needle):
    store = make_store(TinySpec(), dtype=torch.float32)
    r = _run(*[str(store) if a == "STORE" else a for a in args], "--no-auto-profile")  # no profile note: one line
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_corrupted_store_is_refused_before_the_first_token(make_store, tmp_path):
    import shutil

    src = make_store(TinySpec(), dtype=torch.float32)
    store = tmp_path / "store"
    shutil.copytree(src, store)
    f = store / "experts" / "layer-001.bin"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    r = _run("chat", str(store), "-p", "hello", "--json")
    assert r.returncode != 0
    assert "failed verification" in r.stderr and "expert (1, 0)" in r.stderr
    assert r.stdout == ""


def test_interactive_session_in_a_terminal(make_store, tmp_path: Path):
    store = make_store(SLOW, dtype=torch.float32)
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "adapmoe_cli", "chat", str(store), "-c", "4", "--no-prefetch",
                                           "-n", "300", "--no-auto-profile"], env=env, encoding="utf-8", timeout=180,
                          dimensions=(40, 200))
    try:
        child.expect("/help for commands")
        child.expect(">>> ")
        child.sendline("/help")
        for command in ("/reset", "/stats", "/save FILE", "/exit"):
            child.expect_exact(command)
        child.expect(">>> ")
        child.sendline("What does the json module do?")
        child.expect(r"\d+ tokens · prompt \d+ tok/s · [\d.]+ tok/s · hit rate \d+% · 2\.00 experts/token")
        child.expect(">>> ")
        child.sendline('"""')  # second turn, same conversation, typed as a multi-line block
        for line in ("And what about", "the os module?"):
            child.expect(r"\.\.\. ")
            child.sendline(line)
        child.expect(r"\.\.\. ")
        child.sendline('"""')
        child.expect(r"tokens · prompt \d+ tok/s · [\d.]+ tok/s")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect("hit rate")
        child.expect(">>> ")
        child.sendline("/show")
        child.expect("prefetch +off")
        child.expect(">>> ")
        child.sendline("/help")
        child.expect("/set NAME VALUE")
        child.expect(">>> ")
        saved = tmp_path / "t.json"
        child.sendline(f"/save {saved}")
        child.expect("saved 4 messages")
        child.expect(">>> ")
        # a long answer, interrupted: the program stays, the answer stops
        child.sendline("/reset")
        child.expect("conversation reset")
        child.expect(">>> ")
        child.sendline("Tell me everything about every module.")
        child.expect(r"every module\.\r\n")  # the terminal's echo of the input ...
        child.expect(r"\S")  # ... then the answer's first characters: it is streaming
        child.sendintr()
        child.expect("stopped")
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    msgs = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[1]["stats"]["tokens"] > 0
    assert msgs[2]["content"] == "And what about\nthe os module?"


def test_a_long_session_keeps_going_when_the_context_fills(make_store, tmp_path: Path):
    """Six turns in a context that holds about three: the oldest turns are dropped (twice or more, said in
    one line each), errors are one line, /set and /show work, bytes that are not UTF-8 are a turn, not
    the end of the session. Nor are (each ended it once) markup in the system message shown by /show, or a
    temperature so small that the scores overflow; and a message refused as too long leaves the
    conversation as it was (it dropped every turn first)."""
    store = make_store(TinySpec(), dtype=torch.float32)
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm"}
    args = ["-m", "adapmoe_cli", "chat", str(store), "--ctx", "120", "-n", "24", "--repeat-penalty", "1",
            "--no-auto-profile"]
    child = pexpect.spawn(sys.executable, args, env=env, timeout=180, dimensions=(40, 200))
    dropped = 0
    try:
        child.expect(b"ctx 120")
        child.expect(b">>> ")
        for i in range(6):
            child.sendline(f"Question number {i}: what does the json module do?".encode())
            got = child.expect([rb"context full: dropped the oldest \d+ turn", rb"ctx \d+/120"])
            if got == 0:
                dropped += 1
                child.expect(rb"ctx \d+/120")
            child.expect(b">>> ")
        child.sendline(b"/set temperature 0.7")
        child.expect(b"temperature = 0.7")
        child.sendline(b"/set temperature -3")  # refused in one line, the session goes on
        child.expect(b"error:.*temperature")
        child.sendline(b"/set gate on")  # no plan in this store: said so
        child.expect(b"no adaptive gate to turn on")
        child.sendline(b"/set prefetch off")
        child.expect(b"prefetch off")
        child.sendline(b"/set system Answer briefly.")
        child.expect(b"system message set")
        child.sendline(b"/show")
        child.expect(rb"prefetch +off")
        child.expect(rb"temperature 0\.7")
        child.expect(b"Answer briefly.")
        child.expect(b">>> ")
        child.send(b"caf\xe9 \xff\xfe\n")  # Latin-1 and invalid bytes, not UTF-8
        child.expect(rb"ctx \d+/120")
        child.expect(b">>> ")
        child.sendline(b"/bogus")
        child.expect(b"unknown command /bogus")
        child.sendline(b"/set system [/] not markup")
        child.expect(b"system message set")
        child.sendline(b"/show")
        child.expect(re.escape(b"[/] not markup"))
        child.expect(b">>> ")
        child.sendline(b"/set temperature 1e-300")
        child.expect(b"temperature = 1e-300")
        child.sendline(b"what now?")
        child.expect(rb"ctx \d+/120")
        child.expect(b">>> ")
        child.sendline(b"word " * 200)
        child.expect(rb"this message is \d+ tokens, more than the context of 120 \(the ctx setting")
        child.expect(b">>> ")
        child.sendline(f"/save {tmp_path / 'kept.json'}".encode())
        child.expect(rb"saved [1-9]\d* messages")
        child.sendline(b"/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert dropped >= 2


def test_the_reply_is_streamed_as_the_whole_replys_text_decoding_a_few_ids_a_token():
    """`Detokenizer` (what chat, serve and the one-shot print stream): fed token by token, its deltas add up to
    the whole reply decoded at once — leading spaces, multi-byte characters split over byte-level tokens (no
    half character is shown), special tokens skipped — while each token decodes a bounded number of ids,
    not the reply so far (a 2,048-token reply would otherwise decode 2 million ids)."""
    from transformers import AutoTokenizer

    from adapmoe_cli.model_arg import default_model_dir
    from adapmoe_cli.runtime.generate import Detokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    text = ("  The json module encodes données: 東京 ✓ 🙂🙂 and\n\tdecodes them.  "
            "def f(x):\n    return {'a': [1, 2]}  # ünïcödé ") * 12
    ids = tok.encode(text, add_special_tokens=False)
    ids[len(ids) // 2:len(ids) // 2] = [tok.convert_tokens_to_ids("<|end|>")]  # a special token mid-reply
    lengths: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kwargs) -> str:
            lengths.append(len(ids))
            return tok.decode(ids, **kwargs)

    detok = Detokenizer(Counting())
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # a character's first bytes were held back
    assert len(ids) > 200 and max(lengths) <= Detokenizer.CONTEXT + 4  # each decode: the context and a character
