"""Train adapmoe's embedded default model: a small, genuinely trained Mixtral-architecture MoE.

    python scripts/train_default_model.py [--steps N] [--threads T] [--out DIR] [--quick]

Boundary: this script only *makes* the files in src/adapmoe_cli/default_model/; nothing in the package
imports it. It uses only text that is already on the machine after the project's install, so the result
is reproducible offline for given package versions. The code of each phase lives in the `training` package
next to this script (scripts/training/).

Phases (numbered the same way in `main`):
1. Corpus: the documentation topics of `pydoc_data`, the docstrings of the standard library and the
   docstrings of the installed dependencies, read as source text with `ast` (never imported). Identical
   docstrings are kept once. Every module (or pydoc topic) is one document; a hash of its key puts it
   in train (90 %), calibration (5 %) or held-out (5 %). Each document also yields question/answer pairs
   ("What does the json module do?" → its docstring) rendered with the chat template.
2. A byte-level BPE tokenizer (4096 tokens) with the chat template's special tokens, trained on the
   train split only and saved as a transformers `PreTrainedTokenizerFast`.
3. `transformers.MixtralForCausalLM`: 8 layers, 8 experts, top-2, grouped-query attention, router
   load-balancing loss on; AdamW with warm-up and cosine decay; fixed seeds; about one pass over the
   train tokens, so held-out and train loss stay close.
4. Saved in the hub's original Mixtral layout (per-expert w1/w2/w3 tensor names, bfloat16), reloaded
   with `from_pretrained` and checked bit-exact against the trained model rounded to bfloat16.
5. A quality report from the reloaded checkpoint: held-out perplexity against a unigram baseline and
   word-shuffled text, routing statistics per layer, how many expert evaluations a single threshold on
   the second expert's weight would save, and greedy answers to a few Python questions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from training.card import model_card
from training.corpus import Document, build_corpus, plain_text, split_of, training_texts
from training.export import reload_and_verify, save_checkpoint
from training.family import MIXTRAL
from training.report import plot_curve, quality_report
from training.tokenizer import check_tokenizer, encode, save_tokenizer, train_tokenizer
from training.train import model_config, parameter_counts, train, windows

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "adapmoe_cli" / "default_model"
FAMILY = MIXTRAL  # the model family (transformers classes, config keys, hub tensor names): see training/family.py


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.0, help="attention dropout")
    ap.add_argument("--aux-coef", type=float, default=0.02, help="router load-balancing loss coefficient")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--corpus-scale", type=float, default=1.0, help="multiplies every per-source character cap")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=48, help="held-out windows scored during training")
    ap.add_argument("--report-windows", type=int, default=160, help="held-out windows scored in the report")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a one-minute smoke run: tiny corpus, model and steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.corpus_scale, args.eval_every, args.batch = 20, 0.02, 10, 4
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.layers = 64, 64, 4, 2, 6
        args.vocab, args.eval_windows, args.report_windows = 1024, 4, 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # the tokenizers library's thread pool
    t_start = time.time()

    # 1. corpus, split by document
    docs, versions = build_corpus(args.corpus_scale)
    splits: dict[str, list[Document]] = {"train": [], "calibration": [], "heldout": []}
    for doc in docs:
        splits[split_of(doc.key)].append(doc)
    chars_by_source: dict[str, int] = {}
    for doc in docs:
        chars_by_source[doc.source] = chars_by_source.get(doc.source, 0) + len(doc.text)
    train_texts = training_texts(splits["train"], args.seed)
    held_text = plain_text(splits["heldout"], 300_000)
    calib_text = plain_text(splits["calibration"], 300_000)
    print(f"corpus: {len(docs)} documents {({k: len(v) for k, v in splits.items()})}, "
          f"{sum(map(len, train_texts)) / 1e6:.1f} M train characters ({time.time() - t_start:.0f} s)", flush=True)

    # 2. tokenizer (train split only), saved and reloaded to check the chat template
    tok = train_tokenizer([t.removeprefix("<s>").removesuffix("</s>") for t in train_texts], args.vocab)
    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, args.out)
    special_ids = check_tokenizer(args.out)
    train_ids = encode(tok, train_texts)
    held_ids = encode(tok, [held_text])
    held = windows(held_ids, args.ctx, args.report_windows)
    held_eval = held[: args.eval_windows]
    probe = windows(train_ids, args.ctx, args.eval_windows)
    print(f"tokens: train {len(train_ids):,}, held-out {len(held_ids):,}; specials {special_ids} "
          f"({time.time() - t_start:.0f} s)", flush=True)

    # 3. model and training
    config = model_config(tok, args, FAMILY)
    model = FAMILY.model_class()(config)
    params, active = parameter_counts(model, FAMILY)
    print(f"model: {params:,} parameters ({active:,} active), {params * 2 / 2**20:.1f} MiB in bfloat16", flush=True)
    t_train = time.time()
    curve = train(model, train_ids, held_eval, probe, args)
    train_seconds = time.time() - t_train
    model.eval()

    # 4. save in the hub layout and verify the reload
    save_checkpoint(model, tok, args.out, FAMILY)
    loaded = reload_and_verify(model, args.out, held, FAMILY)
    (args.out / "calibration.txt").write_text(calib_text, encoding="utf-8")
    (args.out / "heldout.txt").write_text(held_text, encoding="utf-8")
    (args.out / "loss_curve.json").write_text(json.dumps(curve) + "\n")
    plot_curve(curve, args.out / "loss_curve.png")

    # 5. quality report from the reloaded checkpoint
    report = quality_report(loaded, tok, train_ids, held, probe, held_text, args, FAMILY)
    meta = {
        "command": " ".join(["python", "scripts/train_default_model.py", *(sys.argv[1:] if argv is None else argv)]),
        "threads": args.threads, "steps": args.steps, "batch": args.batch, "ctx": args.ctx,
        "tokens_seen": args.steps * args.batch * args.ctx,
        "epochs": args.steps * args.batch * args.ctx / len(train_ids),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
        "parameters": params, "active_parameters": active, "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids), "documents": {k: len(v) for k, v in splits.items()},
        "chars_by_source": chars_by_source, "versions": versions, "special_tokens": special_ids,
        "config": {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str))},
    }
    report["meta"] = meta
    (args.out / "quality_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "MODEL_CARD.md").write_text(model_card(report, meta, FAMILY), encoding="utf-8")
    print(json.dumps(report, indent=2), flush=True)
    print(f"done in {time.time() - t_start:.0f} s → {args.out}", flush=True)


if __name__ == "__main__":
    main()
