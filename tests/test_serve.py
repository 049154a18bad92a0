"""`adapmoe serve`: the real command in a process of its own on a free local port, driven by the real `openai`
client (and plain HTTP where the client would hide the status): answers and their counts, streaming, stop
sequences, concurrency, the queue's bound, disconnects, auth, bad input, a bounded load, draining on SIGTERM,
and lm-eval's `local-completions` through it against `adapmoe eval`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    import httpx2 as httpx  # what openai >= 3 uses
except ImportError:  # pragma: no cover
    import httpx
import openai
import psutil
import pytest

from adapmoe_cli.model_arg import default_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from check_lm_eval import heldout_docs  # noqa: E402  (the documents the real lm-eval run scores)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    """`adapmoe serve --port 0 ARGS` in its own process and ADAPMOE_HOME; `url` once it says where it listens."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "ADAPMOE_HOME": str(home), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "adapmoe_cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env)
        self.lines: list[str] = []
        self.url = ""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"serving at (http://\S+/v1)", line)
            if m:
                self.url = m.group(1)
                break
        assert self.url, "".join(self.lines)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def client(self, key: str = KEY, retries: int = 0) -> openai.OpenAI:
        """`retries`: how often the client asks again after a 429, waiting what Retry-After says."""
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=retries, timeout=60)

    def post(self, path: str, body: object, headers: dict[str, str] | None = None,
             timeout: float = 60) -> httpx.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, timeout=timeout, headers={
            "Content-Type": "application/json", **AUTH, **(headers or {})})

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url[:-3] + "/metrics", headers=AUTH, timeout=10).text
        return {k: float(v) for k, v in re.findall(r"^(adapmoe_\w+) (\S+)$", text, re.M)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module, with a key (the README test runs one without, and `bench --endpoint`
    through it); the last test here stops it with SIGTERM."""
    s = Server(tmp_path_factory.mktemp("home"), "--max-queue", "3", env={"ADAPMOE_API_KEY": KEY})
    yield s
    s.stop()


def ask(client: openai.OpenAI, text: str, ignore_eos: bool = False, **kw: object) -> object:
    extra = {"extra_body": {"ignore_eos": True}} if ignore_eos else {}
    return client.chat.completions.create(model="embedded", messages=[{"role": "user", "content": text}],
                                          temperature=0, **extra, **kw)


PROMPTS = ["What does the json module do?", "How do I read a file?", "Explain a list comprehension.",
           "What is a decorator?"]


def test_chat_answers_streams_and_counts(server: Server) -> None:
    c = server.client()
    r = ask(c, PROMPTS[0], max_tokens=12, logprobs=True, top_logprobs=1)
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop") and choice.message.role == "assistant"
    # usage: the chat template's tokens, and one logprob entry per generated token
    from transformers import AutoTokenizer

    from adapmoe_cli.conversation import chat_ids

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    assert r.usage.prompt_tokens == len(chat_ids(tok, [{"role": "user", "content": PROMPTS[0]}]))
    entries = choice.logprobs.content
    assert r.usage.completion_tokens == len(entries) == (12 if choice.finish_reason == "length" else len(entries))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(e.logprob == e.top_logprobs[0].logprob for e in entries)  # greedy: each token was the likeliest
    extra = r.model_extra["adapmoe"]
    assert 0 <= extra["hit_rate"] <= 1 and extra["experts_per_token"] > 0
    # streaming: the same text, chunk by chunk, usage last, [DONE] closes it (the client stops there)
    chunks = list(ask(c, PROMPTS[0], max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the second asking reused the first one's prompt from the KV cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    models = c.models.list().data
    assert [m.id for m in models] == ["embedded"]


def test_stop_sequences(server: Server) -> None:
    c = server.client()
    full = ask(c, PROMPTS[1], max_tokens=24, ignore_eos=True).choices[0].message.content
    assert len(full) > 8
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    r = ask(c, PROMPTS[1], max_tokens=24, stop=[stop, "\x00never"], ignore_eos=True)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       ask(c, PROMPTS[1], max_tokens=24, stop=stop, stream=True, ignore_eos=True) if ch.choices)
    assert streamed == cut


def test_concurrent_requests_each_equal_their_sequential_answer(server: Server) -> None:
    # (four at once against --max-queue 3: on a loaded machine the fourth can arrive before the worker has
    # taken the first, find three waiting and be told 429 — it then asks again, as a client should)
    c = server.client(retries=3)
    alone = [ask(c, p, max_tokens=16).choices[0].message.content for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: ask(c, p, max_tokens=16).choices[0].message.content, PROMPTS))
    assert together == alone


def test_a_full_queue_answers_429_with_retry_after(server: Server) -> None:
    body = {"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
            "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: server.post("/chat/completions", body), range(8)))
    codes = sorted(r.status_code for r in replies)
    # 3 waiting (--max-queue 3), and one running where the worker took it before the last of them came
    assert codes.count(200) >= 3 and 429 in codes, codes
    busy = next(r for r in replies if r.status_code == 429)
    assert int(busy.headers["retry-after"]) >= 1 and busy.json()["error"]["code"] == "queue_full"


def test_a_client_that_goes_away_frees_the_runtime(server: Server) -> None:
    before = server.metrics()
    body = {"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # not streaming: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        server.post("/chat/completions", {**body, "stream": False}, timeout=0.5)
    after_short = ask(server.client(), "hi", max_tokens=1)
    assert after_short.usage.completion_tokens == 1
    after = server.metrics()
    assert after["adapmoe_requests_cancelled_total"] - before["adapmoe_requests_cancelled_total"] == 2
    # both were stopped long before their 400 tokens
    assert after["adapmoe_completion_tokens_total"] - before["adapmoe_completion_tokens_total"] < 400


BAD = [
    (b"{not json", 400, None),
    ({"model": "embedded", "messages": []}, 400, "messages"),
    ({"model": "embedded"}, 400, "messages"),
    ({"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ({"model": "embedded", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "stop": ""}, 400, "stop"),
    ({"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400, "stop"),
    ({"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),  # (a 500)
    # a stop's check costs the square of its length (a million characters held every request for 50 s)
    ({"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "q" * 257]}, 400, "stop"),
    # (Python's JSON reads NaN: it was "less than or equal to 2")
    (b'{"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "embedded", "messages": [{"role": "user", "content": "word " * 2000}]}, 413, None),
    # refused by its length before it is tokenized (7 MB held every other request 6-8 s)
    ({"model": "embedded", "messages": [{"role": "user", "content": "word " * 400_000}]}, 413, None),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_an_openai_error(server: Server, body: object, status: int, param: str | None) -> None:
    r = server.post("/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["message"] and "Traceback" not in r.text
    assert err["param"] == param
    assert "valid string" not in err["message"]  # (five stop sequences: pydantic's first union branch spoke)


def test_bad_completions_and_sizes(server: Server) -> None:
    cases = [
        ({"model": "embedded", "prompt": [1, 2, 10**7]}, 400),  # a token outside the vocabulary
        ({"model": "embedded", "prompt": list(range(600))}, 413),  # longer than the context
        ({"model": "embedded", "prompt": "hi", "max_tokens": 0}, 400),  # nothing asked for
        ({"model": "embedded", "prompt": ""}, 400),
        ({"model": "embedded", "prompt": "hi", "logit_bias": {"5": 10}}, 400),
        ({"model": "embedded", "prompt": ["hi"] * 1025, "max_tokens": 1}, 400),  # (1.5 million ran for minutes)
    ]
    for body, status in cases:
        r = server.post("/completions", body)
        assert r.status_code == status and "error" in r.json(), (body, r.text)
    big = b'{"model": "embedded", "prompt": "' + b"a" * (9 << 20) + b'"}'
    assert server.post("/completions", big).status_code == 413
    long = server.post("/completions", {"model": "embedded", "prompt": "a " * 400_000})  # counted, not tokenized
    assert long.status_code == 413 and "800,000 characters" in long.json()["error"]["message"]
    assert httpx.get(server.url + "/nowhere", headers=AUTH, timeout=10).json()["error"]["type"] == "not_found_error"
    assert ask(server.client(), "still there?", max_tokens=2).usage.completion_tokens == 2
    # a temperature so small that the scores overflow is sampled as its limit (greedy), not a 500
    r = server.client().chat.completions.create(model="embedded", messages=[{"role": "user", "content": "hi"}],
                                                temperature=1e-300, max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_completions_echo_logprobs_and_max_tokens_zero(server: Server) -> None:
    c = server.client()
    r = c.completions.create(model="embedded", prompt="import json\nimport os", max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "import json\nimport os" and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == r.usage.prompt_tokens
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
    # the same prompt as token ids, one more token generated: the prompt's logprobs do not change
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(default_model_dir()).encode("import json\nimport os")
    r2 = c.completions.create(model="embedded", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert r2.choices[0].logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_metrics_and_health(server: Server) -> None:
    assert httpx.get(server.url[:-3] + "/health", timeout=10).json()["status"] == "ok"
    m = server.metrics()
    for name in ("requests_total", "completion_tokens_total", "expert_hits_total", "expert_misses_total",
                 "expert_bytes_read_total", "expert_stall_seconds_total", "requests_waiting", "expert_hit_rate"):
        assert f"adapmoe_{name}" in m
    assert m["adapmoe_requests_total"] >= 1 and m["adapmoe_expert_uses_total"] > 0


def test_a_bounded_load_leaves_it_answering_with_flat_memory(server: Server) -> None:
    proc = psutil.Process(server.proc.pid)
    body = {"model": "embedded", "prompt": "def f(", "max_tokens": 1}

    def hit(_: int) -> int:
        return server.post("/completions", body).status_code

    hit(0)
    with ThreadPoolExecutor(6) as pool:  # warm: the allocator's pools reach their working size
        list(pool.map(hit, range(60)))
    rss, before = proc.memory_info().rss, server.metrics()
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(hit, range(200)))
    after = server.metrics()
    # every request answered or turned away (6 clients against --max-queue 3), and counted as such
    assert set(codes) <= {200, 429} and 200 in codes
    assert after["adapmoe_requests_total"] - before["adapmoe_requests_total"] == codes.count(200)
    assert after["adapmoe_requests_rejected_total"] - before["adapmoe_requests_rejected_total"] == codes.count(429)
    assert proc.memory_info().rss - rss < 32 << 20
    assert ask(server.client(), "hello", max_tokens=2).usage.completion_tokens == 2


def test_lm_eval_requests_equal_adapmoe_eval(server: Server, tmp_path: Path) -> None:
    """What lm-eval's `local-completions` sends for log-likelihood tasks (a batch of token-id prompts,
    `echo`, `logprobs: 1`, `max_tokens: 1`, temperature 0, a seed) and how it reads the answer
    (`token_logprobs[ctxlen:-1]` summed; greedy when each equals the best of `top_logprobs`): the
    log-likelihood of a held-out text equals `adapmoe eval`'s. scripts/check_lm_eval.py runs lm-eval itself."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    docs = heldout_docs(tok, 3)
    prompts = [tok.encode(d["context"] + d["continuation"]) for d in docs]
    ctxlens = [len(tok.encode(d["context"])) for d in docs]
    assert ctxlens == [1, 1, 1] and all(p[:1] == tok.encode(d["context"]) for p, d in zip(prompts, docs, strict=True))
    r = server.post("/completions", {"model": "embedded", "prompt": prompts, "temperature": 0, "max_tokens": 1,
                                     "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    lls = []
    for choice, ctxlen, prompt in zip(choices, ctxlens, prompts, strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1  # the prompt's, then the generated token's
        cont, tops = lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]
        lls.append(sum(cont))
        # lm-eval's greedy check compares each token's logprob with the best alternative's: one given, never less
        assert all(len(t) == 1 and max(t.values()) >= v for v, t in zip(cont, tops, strict=True))
    text = tmp_path / "doc0.txt"
    text.write_text(docs[0]["context"] + docs[0]["continuation"], encoding="utf-8")
    ev = subprocess.run([sys.executable, "-m", "adapmoe_cli", "eval", "--text", str(text), "--json"],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "ADAPMOE_HOME": str(tmp_path / "home")})
    assert ev.returncode == 0, ev.stderr
    out = json.loads(ev.stdout)
    assert out["tokens"] == len(prompts[0]) - 1  # every token after the one-token context
    assert lls[0] == pytest.approx(-out["loss"] * out["tokens"], rel=1e-5, abs=1e-4)


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "adapmoe_cli", "serve", "--port", str(port)], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "ADAPMOE_HOME": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in r.stderr
    assert not (tmp_path / "stores").exists()  # refused before the embedded store was made


def test_bench_endpoint_times_the_server_and_reads_its_counters(server: Server, tmp_path: Path) -> None:
    before = server.metrics()["adapmoe_requests_total"]
    r = subprocess.run([sys.executable, "-m", "adapmoe_cli", "bench", "--endpoint", server.url, "--tokens", "6",
                        "--repeat", "2", "--api-key", KEY, "--json"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "ADAPMOE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    p = out["endpoints"][server.url]
    assert p["model"] == "embedded" and p["completion_tokens_per_request"] == 6  # ignore_eos honoured
    assert p["decode_tokens_per_s_min"] <= p["decode_tokens_per_s"] <= p["decode_tokens_per_s_max"]
    assert p["time_to_first_token_s"] > 0 and p["adapmoe"]["experts_per_token"] > 0
    assert 0 <= p["adapmoe"]["hit_rate"] <= 1 and p["adapmoe"]["server_decode_tokens_per_s"] > 0
    # one untimed request, then 4 default prompts × 2 repeats
    assert server.metrics()["adapmoe_requests_total"] - before == 1 + 4 * 2
    wrong = subprocess.run([sys.executable, "-m", "adapmoe_cli", "bench", "--endpoint", server.url, "--tokens", "4"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "ADAPMOE_HOME": str(tmp_path), "OPENAI_API_KEY": "wrong"})
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and "401" in wrong.stderr


def test_api_key(server: Server) -> None:
    body = {"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert server.post("/chat/completions", body, headers={"Authorization": ""}).status_code == 401
    wrong = server.post("/chat/completions", body, headers={"Authorization": "Bearer sekret-kez"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("nope").models.list()
    assert ask(server.client(), "hi", max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(server.url[:-3] + "/health", timeout=10).status_code == 200  # no key needed
    assert httpx.get(server.url[:-3] + "/metrics", timeout=10).status_code == 401


def test_sigterm_drains_the_request_in_flight(server: Server) -> None:
    c = server.client()
    stream = ask(c, "hi", max_tokens=60, ignore_eos=True, stream=True, stream_options={"include_usage": True})
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    server.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert rest[-1].usage.completion_tokens == 60  # the answer in flight finished
    assert server.proc.wait(30) == 0
