"""What `adapmoe serve` costs and saves, measured through HTTP with the real `openai` client:

  python scripts/measure_serve.py [--out docs/serve.json] [--repeat 3] [--llama-server GGUF]

1. the prefix cache: a four-turn conversation (each turn sends the whole history again, as chat clients do)
   against `serve` and `serve --no-prefix-cache`, interleaved; time to first token per turn as the server
   measured it, and the prompt tokens it reused;
2. the API's own cost: `adapmoe bench --endpoint` (decode tok/s from the streamed chunks' arrival) against
   the server's own count of the same requests (its decode tok/s inside the runtime);
3. with --llama-server GGUF: llama.cpp's `llama-server` on the same model, 2 threads, through the same
   `bench --endpoint` (the build needs `python scripts/build_llamacpp.py --server`).

Run it on a quiet machine (nothing else running)."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import openai

TURNS = ["What does the json module do?", "And how do I write a file with it?", "What about reading it back?",
         "Show a short example."]


class Server:
    def __init__(self, argv: list[str], ready: str, env: dict[str, str] | None = None) -> None:
        """`ready`: a pattern of its log whose first group is its /v1 URL."""
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None
        self.url = ""
        seen = []
        for line in self.proc.stdout:
            seen.append(line)
            m = re.search(ready, line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            self.proc.kill()
            raise SystemExit(f"{argv[0]} did not start:\n{''.join(seen[-20:])}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep its log drained

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def adapmoe(*args: str, home: str) -> Server:
    return Server([sys.executable, "-m", "adapmoe_cli", "serve", "--port", "0", *args],
                  r"serving at (http://\S+/v1)", {"ADAPMOE_HOME": home})


def conversation(url: str, tokens: int) -> list[dict[str, float]]:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    messages: list[dict[str, str]] = []
    out = []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        r = client.chat.completions.create(model="embedded", messages=messages, max_tokens=tokens, temperature=0,
                                           extra_body={"ignore_eos": True})
        extra = r.model_extra["adapmoe"]
        out.append({"prompt_tokens": r.usage.prompt_tokens, "reused": extra["reused_prompt_tokens"],
                    "ttft_s": extra["time_to_first_token_s"]})
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    return out


def bench_endpoints(urls: list[str], tokens: int, repeat: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "adapmoe_cli", "bench", *[x for u in urls for x in ("--endpoint", u)],
                        "--tokens", str(tokens), "--repeat", str(repeat), "--json"],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/serve.json"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--llama-server", type=Path, help="a GGUF of the embedded model for llama-server")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="adapmoe-serve-")
    result: dict = {"tokens": args.tokens, "repeats": args.repeat}

    reuse, fresh = adapmoe(home=home), adapmoe("--no-prefix-cache", home=home)
    try:
        runs: dict[str, list] = {"prefix cache": [], "no prefix cache": []}
        for _ in range(args.repeat):
            runs["prefix cache"].append(conversation(reuse.url, 16))
            runs["no prefix cache"].append(conversation(fresh.url, 16))
    finally:
        fresh.stop()
    table = {}
    for name, reps in runs.items():
        table[name] = [{"prompt_tokens": reps[0][t]["prompt_tokens"], "reused": reps[0][t]["reused"],
                        "ttft_ms": statistics.median(r[t]["ttft_s"] for r in reps) * 1e3,
                        "ttft_ms_min": min(r[t]["ttft_s"] for r in reps) * 1e3,
                        "ttft_ms_max": max(r[t]["ttft_s"] for r in reps) * 1e3} for t in range(len(TURNS))]
    result["prefix_cache"] = table
    print("turn  prompt tokens  reused  TTFT ms (prefix cache)  TTFT ms (none)")
    for t in range(len(TURNS)):
        a, b = table["prefix cache"][t], table["no prefix cache"][t]
        print(f"{t + 1:>4}  {a['prompt_tokens']:>13}  {a['reused']:>6}  {a['ttft_ms']:>22.1f}  {b['ttft_ms']:>14.1f}")

    peer = None
    try:
        urls = [reuse.url]
        if args.llama_server:
            from adapmoe_cli.peers.llamacpp import locate

            exe = locate().tool("llama-server")
            peer = Server([str(exe), "-m", str(args.llama_server), "--port", "8089", "-t", "2", "-c", "512",
                           "--host", "127.0.0.1", "--alias", "embedded", "--jinja"],
                          r"listening on (http://[^\s/]+)")
            peer.url += "/v1"
            urls.append(peer.url)
        result["endpoints"] = bench_endpoints(urls, args.tokens, args.repeat)
    finally:
        reuse.stop()
        if peer is not None:
            peer.stop()
    for url, p in result["endpoints"]["endpoints"].items():
        own = p.get("adapmoe")
        print(f"{url}: decode {p['decode_tokens_per_s']:.1f} tok/s ({p['decode_tokens_per_s_min']:.1f}–"
              f"{p['decode_tokens_per_s_max']:.1f}), first token {p['time_to_first_token_s'] * 1e3:.0f} ms"
              + (f", hit rate {own['hit_rate']:.1%}" if own else ""))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
