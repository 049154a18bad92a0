"""lm-eval through `adapmoe serve`, checked against `adapmoe eval`:

  python scripts/check_lm_eval.py [--docs 3] [--keep]

1. makes (once) a virtual environment of its own for lm-eval 0.4.13 and its `api` extra, under
   ADAPMOE_HOME/tools/ (lm-eval pulls scikit-learn and scipy, and transformers imports scipy whenever it is
   installed: +36 MiB and +0.6 s for every process of the runtime, so it is kept out of adapmoe's own);
2. starts `adapmoe serve` (the embedded model) on a free port;
3. writes a log-likelihood task (a task YAML over a local JSON file: no hub) whose documents are pieces of
   the embedded model's held-out text, and runs `lm_eval --model local-completions` on it (the OpenAI
   completions API: token ids, `echo`, `logprobs: 1`, `max_tokens: 1`);
4. checks that the log-likelihood lm-eval reports for each document equals `adapmoe eval`'s for the same
   text (which scores every token after the first: the document's context is its first token).

The suite runs the same requests and lm-eval's reading of them without lm-eval itself
(tests/test_serve.py::test_lm_eval_requests_equal_adapmoe_eval); this runs the real harness."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

LM_EVAL = "lm-eval[api]==0.4.13"


def heldout_docs(tokenizer: object, n: int) -> list[dict[str, str]]:
    """`n` documents from the embedded model's held-out text: a context of one token (one that encodes back
    to itself alone and at the start of the whole) and the 39 tokens after it."""
    from adapmoe_cli.model_arg import default_text

    text = default_text("heldout").read_text(encoding="utf-8")
    docs: list[dict[str, str]] = []
    for start in range(0, len(text) - 2000, 1500):
        ids = tokenizer.encode(text[start:start + 2000])[2:42]  # whole tokens from inside a line
        doc = {"context": tokenizer.decode(ids[:1]), "continuation": tokenizer.decode(ids[1:])}
        if tokenizer.encode(doc["context"]) == tokenizer.encode(doc["context"] + doc["continuation"])[:1]:
            docs.append(doc)
        if len(docs) == n:
            return docs
    raise SystemExit(f"the held-out text gave fewer than {n} documents")


def task_yaml(data: Path) -> str:
    return ("task: adapmoe_heldout\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
            "doc_to_target: '{{continuation}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: perplexity\n"
            "    aggregation: perplexity\n    higher_is_better: false\n")


def tool_env() -> Path:
    import transformers

    from adapmoe_cli.paths import home

    where = home() / "tools" / "lm-eval-0.4.13"
    python = where / "bin" / "python"
    if not python.exists():
        print(f"making {where} for {LM_EVAL} (once; about a minute)", flush=True)
        venv.create(where, with_pip=True)
        pins = [LM_EVAL, f"transformers=={transformers.__version__}"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins],
                       check=True)
    return python


def adapmoe_eval(text: Path) -> float:
    """The log-likelihood `adapmoe eval` gives a text: minus its loss times the tokens it scored."""
    r = subprocess.run([sys.executable, "-m", "adapmoe_cli", "eval", "--text", str(text), "--json"],
                       capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    return -out["loss"] * out["tokens"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from adapmoe_cli.model_arg import default_model_dir

    python = tool_env()
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    docs = heldout_docs(tok, args.docs)
    server = subprocess.Popen([sys.executable, "-m", "adapmoe_cli", "serve", "--port", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        url = next(m.group(1) for line in server.stderr if (m := re.search(r"serving at (http://\S+/v1)", line)))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            data = work / "docs.jsonl"
            data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
            (work / "task.yaml").write_text(task_yaml(data), encoding="utf-8")
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            subprocess.run([str(python), "-m", "lm_eval", "--model", "local-completions", "--model_args",
                            f"base_url={url}/completions,model=embedded,tokenizer_backend=huggingface,"
                            f"tokenizer={default_model_dir()},num_concurrent=1,max_retries=1",
                            "--tasks", "adapmoe_heldout", "--include_path", str(work), "--output_path",
                            str(work / "out"), "--log_samples"], env=env, check=True)
            samples = [json.loads(line) for f in (work / "out").rglob("samples_adapmoe_heldout_*.jsonl")
                       for line in f.read_text().splitlines()]
            got = {s["doc_id"]: float(s["resps"][0][0][0]) for s in samples}
            worst = 0.0
            for i, d in enumerate(docs):
                text = work / f"doc{i}.txt"
                text.write_text(d["context"] + d["continuation"], encoding="utf-8")
                want = adapmoe_eval(text)
                worst = max(worst, abs(got[i] - want) / abs(want))
                print(f"doc {i}: lm-eval {got[i]:.6f}  adapmoe eval {want:.6f}")
    finally:
        server.terminate()
        server.wait(60)
    print(f"largest relative difference {worst:.2e}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
