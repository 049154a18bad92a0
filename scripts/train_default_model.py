"""Train adapmoe's embedded models: small, genuinely trained MoE language models.

    python scripts/train_default_model.py [--steps N] [--threads T] [--out DIR] [--quick]
    python scripts/train_default_model.py --fine [--steps N] ...   # `embedded-fine`

Two models are made with it. `embedded` (the default; `src/adapmoe_cli/default_model/`): Mixtral
architecture, 8 experts, top-2. `embedded-fine` (`--fine`; `src/adapmoe_cli/fine_model/`): Qwen3-MoE
architecture, 64 small experts, top-8, the fine-grained shape of today's models (OLMoE: 64 experts top-8,
Qwen3-30B-A3B: 128 top-8); it reuses the first model's tokenizer, so both read the same corpus the same way.

Boundary: this script only *makes* the files in src/adapmoe_cli/default_model/ and fine_model/; nothing
in the package imports it. It uses only text that is already on the machine after the project's install, so the result
is reproducible offline for given package versions. The code of each phase lives in the `training` package
next to this script (scripts/training/).

Phases (numbered the same way in `main`):
1. Corpus: the documentation topics of `pydoc_data`, the docstrings of the standard library and the
   docstrings of the installed dependencies, read as source text with `ast` (never imported). Identical
   docstrings are kept once. Every module (or pydoc topic) is one document; a hash of its key puts it
   in train (90 %), calibration (5 %) or held-out (5 %). Each document also yields question/answer pairs
   ("What does the json module do?" → its docstring) rendered with the chat template.
2. A byte-level BPE tokenizer (4096 tokens) with the chat template's special tokens, trained on the
   train split only and saved as a transformers `PreTrainedTokenizerFast` (or another model's, reused:
   `--tokenizer-from`; the corpus then reads only that model's sources, so the splits are the same).
3. The family's transformers model (`--family`): 8 layers, grouped-query attention, a router
   load-balancing loss computed per layer (`training/train.py` `balance_loss`); AdamW with warm-up and
   cosine decay; fixed seeds; about half a pass over the train tokens, so held-out and train loss stay
   close.
4. Saved in its family's original hub layout (per-expert tensor names, bfloat16), reloaded with
   `from_pretrained` and checked bit-exact against the trained model rounded to bfloat16.
5. A quality report from the reloaded checkpoint: held-out perplexity against a unigram baseline and
   word-shuffled text, routing statistics per layer, how many expert evaluations one threshold on the
   experts' shares would save, and greedy answers to a few Python questions.
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
from training.family import FAMILIES
from training.report import plot_curve, quality_report
from training.tokenizer import check_tokenizer, encode, load_tokenizer, save_tokenizer, train_tokenizer
from training.train import model_config, parameter_counts, train, windows

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "adapmoe_cli" / "default_model"
FINE_OUT = ROOT / "src" / "adapmoe_cli" / "fine_model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="output folder (default: the package's)")
    ap.add_argument("--fine", action="store_true",
                    help="the fine-grained model `embedded-fine`: --family qwen3_moe --experts 64 --top-k 8 "
                         "--intermediate 32 --tokenizer-from the first model")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="mixtral",
                    help="model family (transformers classes, config keys, hub tensor names: training/family.py)")
    ap.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    ap.add_argument("--top-k", type=int, default=2, help="experts each token is routed to")
    ap.add_argument("--balance", choices=("per-layer", "pooled"), default="per-layer",
                    help="load-balancing loss per layer (default) or pooled over layers as transformers' own")
    ap.add_argument("--tokenizer-from", type=Path, help="reuse the tokenizer saved in this folder")
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
    if args.fine:
        args.family, args.experts, args.top_k, args.intermediate = "qwen3_moe", 64, 8, 32
        args.tokenizer_from = args.tokenizer_from or DEFAULT_OUT
    args.out = args.out or (FINE_OUT if args.fine else DEFAULT_OUT)
    args.name = "embedded-fine" if args.fine else "embedded"
    if args.quick:
        args.steps, args.corpus_scale, args.eval_every, args.batch = 20, 0.02, 10, 4
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.layers = 64, 64, 4, 2, 6
        args.vocab, args.eval_windows, args.report_windows = 1024, 4, 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    family = FAMILIES[args.family]
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # the tokenizers library's thread pool
    t_start = time.time()

    # 1. corpus, split by document
    sources = None
    if args.tokenizer_from is not None and (args.tokenizer_from / "quality_report.json").exists():
        # the same sources as the model whose tokenizer is reused (and so the same splits, if versions match)
        sources = set(json.loads((args.tokenizer_from / "quality_report.json").read_text())["meta"]["versions"])
    docs, versions = build_corpus(args.corpus_scale, sources)
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

    # 2. tokenizer (train split only; or the one in --tokenizer-from), saved and reloaded to check the chat template
    if args.tokenizer_from is not None:
        tok = load_tokenizer(args.tokenizer_from)
    else:
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
    config = model_config(tok, args, family, experts=args.experts, top_k=args.top_k)
    model = family.model_class()(config)
    params, active = parameter_counts(model, family)
    print(f"model: {params:,} parameters ({active:,} active), {params * 2 / 2**20:.1f} MiB in bfloat16", flush=True)
    t_train = time.time()
    curve = train(model, train_ids, held_eval, probe, args)
    train_seconds = time.time() - t_train
    model.eval()

    # 4. save in the hub layout and verify the reload
    save_checkpoint(model, tok, args.out, family)
    loaded = reload_and_verify(model, args.out, held, family)
    texts = {"calibration.txt": calib_text, "heldout.txt": held_text}
    if args.tokenizer_from is not None and all(
            (args.tokenizer_from / n).exists() and (args.tokenizer_from / n).read_text(encoding="utf-8") == t
            for n, t in texts.items()):
        texts = {}  # the same splits as the tokenizer's model: adapmoe reads them from there (model_arg.default_text)
    for name, text in texts.items():
        (args.out / name).write_text(text, encoding="utf-8")
    (args.out / "loss_curve.json").write_text(json.dumps(curve) + "\n")
    plot_curve(curve, args.out / "loss_curve.png", f"adapmoe embedded model `{args.name}`")

    # 5. quality report from the reloaded checkpoint
    report = quality_report(loaded, tok, train_ids, held, probe, held_text, args, family)
    meta = {
        "command": " ".join(["python", "scripts/train_default_model.py", *(sys.argv[1:] if argv is None else argv)]),
        "threads": args.threads, "steps": args.steps, "batch": args.batch, "ctx": args.ctx,
        "tokens_seen": args.steps * args.batch * args.ctx,
        "epochs": args.steps * args.batch * args.ctx / len(train_ids),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
        "parameters": params, "active_parameters": active, "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids), "documents": {k: len(v) for k, v in splits.items()},
        "chars_by_source": chars_by_source, "versions": versions, "special_tokens": special_ids,
        "name": args.name, "experts": family.num_experts(config), "balance": args.balance,
        "texts_shared_with": args.tokenizer_from.name if not texts else None,
        "config": {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str))},
    }
    report["meta"] = meta
    (args.out / "quality_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "MODEL_CARD.md").write_text(model_card(report, meta, family), encoding="utf-8")
    print(json.dumps(report, indent=2), flush=True)
    print(f"done in {time.time() - t_start:.0f} s → {args.out}", flush=True)


if __name__ == "__main__":
    main()
