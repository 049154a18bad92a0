"""Train adapmoe's embedded default model: a small, genuinely trained Mixtral-architecture MoE.

    python scripts/train_default_model.py [--steps N] [--threads T] [--out DIR] [--quick]

Boundary: this script only *makes* the files in src/adapmoe_cli/default_model/; nothing in the package
imports it. It uses only text that is already on the machine after the project's install, so the result
is reproducible offline for given package versions.

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
import ast
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "adapmoe_cli" / "default_model"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SYSTEM_PROMPT = "You are a helpful assistant that answers questions about Python and its libraries."
# Installed distributions whose docstrings join the corpus: (import name, distribution name, char cap).
DEPENDENCIES = [
    ("transformers", "transformers", 4_500_000),
    ("torch", "torch", 3_500_000),
    ("huggingface_hub", "huggingface_hub", 800_000),
    ("safetensors", "safetensors", 200_000),
    ("tokenizers", "tokenizers", 200_000),
    ("accelerate", "accelerate", 600_000),
    ("typer", "typer", 300_000),
    ("click", "click", 400_000),
    ("rich", "rich", 600_000),
    ("yaml", "PyYAML", 200_000),
    ("jinja2", "Jinja2", 400_000),
    ("markupsafe", "MarkupSafe", 100_000),
    ("numpy", "numpy", 2_500_000),
    ("matplotlib", "matplotlib", 2_000_000),
    ("psutil", "psutil", 300_000),
    ("packaging", "packaging", 200_000),
    ("filelock", "filelock", 100_000),
    ("fsspec", "fsspec", 600_000),
    ("tqdm", "tqdm", 200_000),
    ("requests", "requests", 200_000),
    ("httpx", "httpx", 300_000),
    ("sympy", "sympy", 1_500_000),
    ("networkx", "networkx", 1_500_000),
]
SKIP_DIRS = {"test", "tests", "testing", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip",
             "tkinter", "benchmarks", "_vendor", "vendored"}
SAMPLE_QUESTIONS = [
    "What does the json module do?",
    "What does os.path.join do?",
    "Explain the with statement in Python.",
    "What is a generator?",
    "What does the collections module do?",
]
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass
class Document:
    """One module or pydoc topic: plain text plus question/answer pairs drawn from it."""

    key: str
    source: str
    text: str
    qa: list[tuple[str, str]] = field(default_factory=list)


# -- 1. corpus ------------------------------------------------------------------------------------------
def clean(doc: str) -> str:
    return "\n".join(line.rstrip() for line in doc.strip().splitlines()).strip()


def first_paragraphs(doc: str, limit: int = 700) -> str:
    """Leading paragraphs of a docstring, up to about `limit` characters: the answer to 'what does X do?'."""
    out, size = [], 0
    for para in doc.split("\n\n"):
        if out and size + len(para) > limit:
            break
        out.append(para)
        size += len(para)
    return "\n\n".join(out)[: 2 * limit]


def python_files(base: Path, prefix: str) -> list[tuple[Path, str]]:
    """(path, dotted module name) of every .py file under `base`, sorted, skipping tests and private dirs."""
    out = []
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                rel = Path(root, name).relative_to(base).with_suffix("")
                mod = ".".join([prefix, *rel.parts]) if prefix else ".".join(rel.parts)
                out.append((Path(root, name), mod.removesuffix(".__init__")))
    return out


def module_document(path: Path, module: str, source: str, seen: set[str]) -> Document | None:
    """The public docstrings of one source file as a document; docstrings already in `seen` are skipped."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError, RecursionError):
        return None

    def fresh(doc: str | None) -> str | None:
        if not doc or len(doc) < 40:
            return None
        doc = clean(doc)
        digest = hashlib.sha1(doc.encode()).hexdigest()
        if digest in seen:
            return None
        seen.add(digest)
        return doc

    parts: list[str] = []
    qa: list[tuple[str, str]] = []
    if doc := fresh(ast.get_docstring(tree)):
        parts.append(f"Module {module}\n\n{doc}")
        qa.append((f"What does the {module} module do?", first_paragraphs(doc)))
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        name = f"{module}.{node.name}"
        if doc := fresh(ast.get_docstring(node)):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            parts.append(f"{kind} {name}\n\n{doc}")
            qa.append((f"What does {name} do?", first_paragraphs(doc)))
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                    if sdoc := fresh(ast.get_docstring(sub)):
                        parts.append(f"method {name}.{sub.name}\n\n{sdoc}")
                        qa.append((f"What does {name}.{sub.name} do?", first_paragraphs(sdoc)))
    if not parts:
        return None
    return Document(key=f"{source}:{module}", source=source, text="\n\n".join(parts), qa=qa)


def pydoc_documents(seen: set[str]) -> list[Document]:
    import pydoc_data.topics as topics  # a data dict of the reference manual, safe to import

    docs = []
    for name in sorted(topics.topics):
        text = clean(topics.topics[name])
        digest = hashlib.sha1(text.encode()).hexdigest()
        if len(text) < 80 or digest in seen:
            continue
        seen.add(digest)
        title = name.replace("-", " ")
        docs.append(Document(key=f"pydoc:{name}", source="pydoc_data", text=text,
                             qa=[(f"Explain {title} in Python.", first_paragraphs(text)),
                                 (f"What is {title}?", first_paragraphs(text, 400))]))
    return docs


def package_documents(base: Path, prefix: str, source: str, cap: int, seen: set[str]) -> list[Document]:
    """Documents of one package, at most about `cap` characters, files taken in hash order so a capped
    package is a spread sample (not just its alphabetically first sub-packages)."""
    files = sorted(python_files(base, prefix), key=lambda pm: hashlib.sha1(pm[1].encode()).hexdigest())
    docs, used = [], 0
    for path, module in files:
        if used >= cap:
            break
        if (doc := module_document(path, module, source, seen)) is not None:
            docs.append(doc)
            used += len(doc.text)
    return sorted(docs, key=lambda d: d.key)


def build_corpus(scale: float) -> tuple[list[Document], dict[str, str]]:
    """All documents in a deterministic order, and the versions of the sources they came from."""
    seen: set[str] = set()
    versions = {"python": sys.version.split()[0]}
    docs = pydoc_documents(seen)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs += package_documents(stdlib, "", "stdlib", int(6_000_000 * scale), seen)
    site = Path(sysconfig.get_paths()["purelib"])
    for module, dist, cap in DEPENDENCIES:
        base = site / module
        if not base.is_dir():
            continue
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
        docs += package_documents(base, module, dist, int(cap * scale), seen)
    return docs, versions


def split_of(key: str) -> str:
    """Split by document: 90 % train, 5 % calibration, 5 % held-out, from a hash of the document key."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 20
    return "calibration" if bucket == 0 else "heldout" if bucket == 1 else "train"


def render_chat(messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE in Python (checked against the jinja one in `check_tokenizer`), for speed."""
    out = "<s>" + "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return out + ("<|assistant|>\n" if generation_prompt else "")


def training_texts(docs: list[Document], seed: int) -> list[str]:
    """Plain documents wrapped in <s>…</s> plus their QA pairs as chats (a quarter with a system turn)."""
    rng = random.Random(seed)
    texts = []
    for doc in docs:
        texts.append(f"<s>{doc.text}</s>")
        for question, answer in doc.qa:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if rng.random() < 0.25:
                messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
            texts.append(render_chat(messages))
    rng.shuffle(texts)
    return texts


def plain_text(docs: list[Document], limit: int) -> str:
    """Documents separated by blank lines, whole documents only, at most `limit` bytes."""
    out, size = [], 0
    for doc in docs:
        n = len(doc.text.encode()) + 2
        if size + n > limit:
            continue
        out.append(doc.text)
        size += n
    return "\n\n".join(out) + "\n"


# -- 2. tokenizer ---------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=SPECIALS[4:],
                                   model_max_length=512, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tok, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json, with the chat template inside the config (not a .jinja file)."""
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(str(out), save_jinja_files=False)


def check_tokenizer(out: Path) -> dict:
    """Reload the saved tokenizer the way users will and check the chat template round-trips."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is a list?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == render_chat(messages, generation_prompt=True), text
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}


def encode(tok, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for start in range(0, len(texts), 2048):
        for row in tok(texts[start:start + 2048], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


# -- 3. model and training ------------------------------------------------------------------------------
def model_config(tok, args: argparse.Namespace):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        output_router_logits=True, router_aux_loss_coef=args.aux_coef, attention_dropout=args.dropout,
        initializer_range=0.02, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def batches(ids: torch.Tensor, ctx: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Random non-overlapping windows of ctx+1 tokens, each window once per epoch. Yields [B, ctx+1]."""
    g = torch.Generator().manual_seed(seed)
    n = (len(ids) - 1) // ctx
    order, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + batch].tolist()
        pos += batch
        yield torch.stack([ids[i * ctx:(i + 1) * ctx + 1] for i in idx])


def windows(ids: torch.Tensor, ctx: int, limit: int) -> torch.Tensor:
    """The first `limit` consecutive windows of ctx+1 tokens. [N, ctx+1]"""
    n = min((len(ids) - 1) // ctx, limit)
    return torch.stack([ids[i * ctx:(i + 1) * ctx + 1] for i in range(n)])


@torch.no_grad()
def mean_loss(model, wins: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over windows [N, ctx+1]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(wins), batch):
        x = wins[i:i + batch]
        logits = model(input_ids=x[:, :-1], output_router_logits=False).logits  # [B, T, V]
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def lr_lambda(steps: int, warmup: int, floor: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def train(model, train_ids: torch.Tensor, held: torch.Tensor, probe: torch.Tensor, args) -> list[dict]:
    """AdamW + warm-up + cosine; returns the loss curve (smoothed train loss every step, evals periodically)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, max(1, args.steps // 25)))
    coef = model.config.router_aux_loss_coef
    curve: list[dict] = []
    smooth = None
    model.train()
    t0 = time.time()
    for step, x in enumerate(batches(train_ids, args.ctx, args.batch, args.steps, args.seed), start=1):
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        lm = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        loss = lm + coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lm_value = float(lm.detach())
        smooth = lm_value if smooth is None else 0.98 * smooth + 0.02 * lm_value
        entry = {"step": step, "tokens": step * args.batch * args.ctx, "train_loss": lm_value,
                 "train_loss_smoothed": smooth, "aux_loss": float(out.aux_loss.detach()), "lr": sched.get_last_lr()[0],
                 "seconds": time.time() - t0}
        if step % args.eval_every == 0 or step == args.steps:
            entry["heldout_loss"] = mean_loss(model, held)
            entry["train_probe_loss"] = mean_loss(model, probe)
            rate = entry["tokens"] / (time.time() - t0)
            print(f"step {step}/{args.steps}  train {smooth:.3f}  train-probe {entry['train_probe_loss']:.3f}  "
                  f"held-out {entry['heldout_loss']:.3f}  aux {entry['aux_loss']:.3f}  lr {entry['lr']:.2e}  "
                  f"{rate:.0f} tok/s  {entry['seconds']:.0f} s", flush=True)
        elif step % 10 == 0:
            print(f"step {step}  train {smooth:.3f}  {entry['seconds']:.0f} s", flush=True)
        curve.append(entry)
    return curve


# -- 4. save in the hub layout --------------------------------------------------------------------------
def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers 5's fused in-memory experts → the hub's original per-expert Mixtral names, bfloat16."""
    tensors = {}
    for name, value in model.state_dict().items():
        parts = name.split(".")
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: first I rows w1 (gate), next I w3 (up)
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                base = f"model.layers.{parts[2]}.block_sparse_moe.experts.{e}"
                tensors[f"{base}.w1.weight"] = value[e, :inter]  # [I, H]
                tensors[f"{base}.w3.weight"] = value[e, inter:]  # [I, H]
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            for e in range(value.shape[0]):
                tensors[f"model.layers.{parts[2]}.block_sparse_moe.experts.{e}.w2.weight"] = value[e]  # [H, I]
        else:
            tensors[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value
    return {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in sorted(tensors.items())}


def save_checkpoint(model, tok, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    save_file(hub_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600; the file ships in the package
    config = model.config
    config.output_router_logits = False  # trained with it on; inference should not pay for the aux loss
    config.architectures = ["MixtralForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(str(out))
    end = tok.convert_tokens_to_ids("<|end|>")
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[end, tok.eos_token_id],
                     pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=128).save_pretrained(str(out))
    save_tokenizer(tok, out)


def reload_and_verify(model, out: Path, held: torch.Tensor):
    """Load the saved files as a user would; require no missing/unexpected weights and logits bit-equal to
    the trained model rounded to bfloat16 and run in float32."""
    import copy

    from transformers import MixtralForCausalLM

    loaded, info = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"reload reported weight problems: {problems}")
    rounded = copy.deepcopy(model).eval()
    with torch.no_grad():  # round the weights only: buffers such as RoPE's inv_freq stay float32 on reload
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    loaded.eval()
    x = held[:4, :-1]
    with torch.no_grad():
        a = rounded(input_ids=x, output_router_logits=False).logits
        b = loaded(input_ids=x, output_router_logits=False).logits
    if not torch.equal(a, b):
        raise RuntimeError(f"reloaded logits differ, max abs diff {float((a - b).abs().max())}")
    return loaded


# -- 5. quality report ----------------------------------------------------------------------------------
def unigram_perplexity(train_ids: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    """Add-one smoothed unigram fitted on the train tokens, scored on the same targets as the model."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(float(-logp[held[:, 1:].flatten()].mean()))


def shuffled_windows(tok, text: str, ctx: int, limit: int, seed: int) -> torch.Tensor:
    words = text.split()
    random.Random(seed).shuffle(words)
    ids = encode(tok, [" ".join(words[i:i + 2000]) for i in range(0, len(words), 2000)])
    return windows(ids, ctx, limit)


@torch.no_grad()
def routing_statistics(model, wins: torch.Tensor) -> list[dict]:
    """Per layer: mean router entropy, quantiles of the renormalised second top-2 weight, expert usage."""
    logits_per_layer: list[list[torch.Tensor]] = []
    for i in range(0, len(wins), 8):
        out = model(input_ids=wins[i:i + 8, :-1], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):  # [B*T, E]
            if len(logits_per_layer) <= layer:
                logits_per_layer.append([])
            logits_per_layer[layer].append(logits.float())
    rows = []
    for layer, chunks in enumerate(logits_per_layer):
        p = torch.softmax(torch.cat(chunks), -1)  # [N, E]
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
        top, idx = torch.topk(p, 2, -1)
        second = (top[:, 1] / top.sum(-1)).double()
        q = torch.quantile(second, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        usage = torch.bincount(idx.flatten(), minlength=p.shape[-1]).double()
        usage = usage / usage.sum()
        quantiles = {f"p{int(k * 100)}": round(v, 4) for k, v in zip(QUANTILES, q, strict=True)}
        rows.append({"layer": layer, "router_entropy": round(entropy, 4), "second_weight_quantiles": quantiles,
                     "expert_usage": [round(u, 4) for u in usage.tolist()],
                     "usage_max_over_uniform": round(float(usage.max()) * p.shape[-1], 3)})
    return rows


class SecondExpertGate:
    """Forward hooks that drop the second expert where its renormalised weight is below `threshold`
    (the top-1 then gets weight 1), counting the expert evaluations saved."""

    def __init__(self, model) -> None:
        self.threshold = 0.0
        self.dropped = 0
        self.total = 0
        self.handles = [layer.mlp.gate.register_forward_hook(self.hook) for layer in model.model.layers]

    def hook(self, module, inputs, output):
        logits, weights, index = output  # [N, E], [N, 2], [N, 2]
        drop = weights[:, 1] < self.threshold
        self.dropped += int(drop.sum())
        self.total += index.numel()
        if not bool(drop.any()):
            return output
        weights = weights.clone()
        index = index.clone()
        weights[drop, 0], weights[drop, 1] = 1.0, 0.0
        index[drop, 1] = module.num_experts  # the experts module skips this out-of-range id
        return logits, weights, index

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def threshold_sweep(model, wins: torch.Tensor, base_loss: float) -> list[dict]:
    gate = SecondExpertGate(model)
    rows = []
    try:
        for threshold in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3):
            gate.threshold, gate.dropped, gate.total = threshold, 0, 0
            loss = mean_loss(model, wins)
            rows.append({"threshold": threshold, "expert_evaluations_saved": round(gate.dropped / gate.total, 4),
                         "perplexity_increase": round(math.exp(loss - base_loss) - 1, 5)})
    finally:
        gate.remove()
    return rows


@torch.no_grad()
def sample_answers(model, tok, max_new_tokens: int = 60) -> list[dict]:
    end = tok.convert_tokens_to_ids("<|end|>")
    answers = []
    for question in SAMPLE_QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=[end, tok.eos_token_id], pad_token_id=tok.pad_token_id)
        answers.append({"question": question,
                        "answer": tok.decode(out[0, len(prompt):], skip_special_tokens=False)})
    return answers


def quality_report(model, tok, train_ids, held, probe, held_text: str, args) -> dict:
    held_loss = mean_loss(model, held)
    train_loss = mean_loss(model, probe)
    shuffled = shuffled_windows(tok, held_text, args.ctx, len(held), args.seed)
    shuffled_loss = mean_loss(model, shuffled)
    return {
        "heldout_tokens_scored": int(held[:, 1:].numel()),
        "heldout_perplexity": round(math.exp(held_loss), 3),
        "train_sample_perplexity": round(math.exp(train_loss), 3),
        "unigram_perplexity": round(unigram_perplexity(train_ids, held, len(tok)), 3),
        "shuffled_words_perplexity": round(math.exp(shuffled_loss), 3),
        "uniform_router_entropy": round(math.log(model.config.num_local_experts), 4),
        "routing": routing_statistics(model, held),
        "second_expert_threshold": threshold_sweep(model, held, held_loss),
        "samples": sample_answers(model, tok),
    }


def plot_curve(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tokens = [c["tokens"] / 1e6 for c in curve]
    ax.plot(tokens, [c["train_loss_smoothed"] for c in curve], label="train (EMA)")
    evals = [c for c in curve if "heldout_loss" in c]
    ax.plot([c["tokens"] / 1e6 for c in evals], [c["heldout_loss"] for c in evals], "o-", label="held-out")
    ax.plot([c["tokens"] / 1e6 for c in evals], [c["train_probe_loss"] for c in evals], "s--",
            label="train sample (eval mode)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(top=min(8.5, max(c["train_loss_smoothed"] for c in curve)))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("adapmoe default model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_card(report: dict, meta: dict) -> str:
    rows = "\n".join(
        f"| {r['layer']} | {r['router_entropy']:.3f} | {r['second_weight_quantiles']['p10']:.3f} / "
        f"{r['second_weight_quantiles']['p50']:.3f} / {r['second_weight_quantiles']['p90']:.3f} | "
        f"{r['usage_max_over_uniform']:.2f} |" for r in report["routing"])
    sweep = "\n".join(f"| {r['threshold']} | {100 * r['expert_evaluations_saved']:.1f} % | "
                      f"{100 * r['perplexity_increase']:+.2f} % |" for r in report["second_expert_threshold"])
    samples = "\n\n".join(f"**{s['question']}**\n\n```text\n{s['answer']}\n```" for s in report["samples"])
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    c = meta["config"]
    template = CHAT_TEMPLATE.replace("\n", "\\n")
    return f"""# adapmoe default model

A small Mixtral-architecture Mixture-of-Experts language model, trained from scratch on this machine so
that adapmoe has a real (not random) MoE to run, profile and test without any download. It knows a little
about Python and the libraries it was trained on; it is a test subject, not an assistant.

## How it was made

```
{meta['command']}
```

- Script: `scripts/train_default_model.py` (deterministic: fixed seeds, sorted inputs, hash-based splits).
- Trained on CPU with {meta['threads']} thread(s): {meta['train_seconds'] / 60:.1f} min of training,
  {meta['total_seconds'] / 60:.1f} min end to end ({meta['steps']} steps of {meta['batch']} × {meta['ctx']} tokens,
  {meta['tokens_seen'] / 1e6:.2f} M tokens seen = {meta['epochs']:.2f} passes over the train split).
  The design target of about 45 minutes is for 2 threads.
- Data: only text present after install, read with `ast` from source files (never imported): the
  `pydoc_data` reference topics, standard-library docstrings, and docstrings of the installed
  dependencies; identical docstrings kept once. Versions: {versions}.
  Documents (one per module or topic): {meta['documents']}; characters per source: {meta['chars_by_source']}.
  About a third of the training text is question/answer pairs ("What does the json module do?" → the
  module's docstring) rendered with the chat template.
- Split by document (hash of the module path / topic key): train 90 %, calibration 5 %, held-out 5 %.
  `calibration.txt` and `heldout.txt` are plain documents of those splits separated by blank lines.
  Train: {meta['train_tokens']:,} tokens; held-out: {meta['heldout_tokens']:,} tokens.

## Architecture

`MixtralForCausalLM`: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_local_experts']}
experts per layer (intermediate {c['intermediate_size']}), top-{c['num_experts_per_tok']} routing,
{c['num_attention_heads']} query heads / {c['num_key_value_heads']} key-value heads (head dim {c['head_dim']}),
vocabulary {c['vocab_size']}, context {c['max_position_embeddings']} (trained on {meta['ctx']}-token windows),
untied `lm_head`, router load-balancing loss coefficient {c['router_aux_loss_coef']}.
{meta['parameters']:,} parameters ({meta['active_parameters']:,} active per token), stored in bfloat16 under the
hub's original tensor names (`model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight`, `…gate.weight`).
Reloading with `from_pretrained` was checked to give logits bit-equal to the trained model rounded to bfloat16.

Tokenizer: byte-level BPE, {len(meta['special_tokens'])} special tokens {meta['special_tokens']}.
Chat template: `{template}`

## Quality (from the saved checkpoint, {report['heldout_tokens_scored']:,} held-out tokens)

| measure | perplexity |
|---|---|
| held-out text | {report['heldout_perplexity']:.2f} |
| train sample (same size) | {report['train_sample_perplexity']:.2f} |
| unigram baseline (add-one, fitted on train) | {report['unigram_perplexity']:.2f} |
| held-out text with its words shuffled | {report['shuffled_words_perplexity']:.2f} |

Routing on held-out text (uniform entropy ln 8 = {report['uniform_router_entropy']:.3f}; second weight = the
lower of the two top-2 weights after renormalising; usage balance = busiest expert's share × 8):

| layer | router entropy | 2nd weight p10 / p50 / p90 | usage balance |
|---|---|---|---|
{rows}

Dropping the second expert where its weight is below one global threshold (top-1 always kept):

| threshold | expert evaluations saved | perplexity change |
|---|---|---|
{sweep}

Greedy answers (chat template, 60 new tokens at most), verbatim:

{samples}

Full numbers: `quality_report.json`; loss curve: `loss_curve.json`, `loss_curve.png`.
"""


# -- main -----------------------------------------------------------------------------------------------
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
    from transformers import MixtralForCausalLM

    config = model_config(tok, args)
    model = MixtralForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = params - expert_params * (8 - 2) // 8
    print(f"model: {params:,} parameters ({active:,} active), {params * 2 / 2**20:.1f} MiB in bfloat16", flush=True)
    t_train = time.time()
    curve = train(model, train_ids, held_eval, probe, args)
    train_seconds = time.time() - t_train
    model.eval()

    # 4. save in the hub layout and verify the reload
    save_checkpoint(model, tok, args.out)
    loaded = reload_and_verify(model, args.out, held)
    (args.out / "calibration.txt").write_text(calib_text, encoding="utf-8")
    (args.out / "heldout.txt").write_text(held_text, encoding="utf-8")
    (args.out / "loss_curve.json").write_text(json.dumps(curve) + "\n")
    plot_curve(curve, args.out / "loss_curve.png")

    # 5. quality report from the reloaded checkpoint
    report = quality_report(loaded, tok, train_ids, held, probe, held_text, args)
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
    (args.out / "MODEL_CARD.md").write_text(model_card(report, meta), encoding="utf-8")
    print(json.dumps(report, indent=2), flush=True)
    print(f"done in {time.time() - t_start:.0f} s → {args.out}", flush=True)


if __name__ == "__main__":
    main()
