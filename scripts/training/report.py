"""Phase 5, the quality report from the reloaded checkpoint: perplexity against unigram and word-shuffled
baselines, routing statistics, a second-expert threshold sweep, greedy sample answers, and the loss plot."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from training.family import MIXTRAL, MoEFamily
from training.tokenizer import encode
from training.train import mean_loss, windows

SAMPLE_QUESTIONS = [
    "What does the json module do?",
    "What does os.path.join do?",
    "Explain the with statement in Python.",
    "What is a generator?",
    "What does the collections module do?",
]
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


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
    """Per layer: mean router entropy, quantiles of the share beyond the top-1 (1 − s_1, s_j = the chosen
    weights renormalised to sum to 1: at top-2 the paper's second weight) and of the second share s_2,
    and each expert's share of the top-k choices."""
    top_k = model.config.num_experts_per_tok
    logits_per_layer: list[list[torch.Tensor]] = []
    for i in range(0, len(wins), 8):
        out = model(input_ids=wins[i:i + 8, :-1], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):  # [B*T, E]
            if len(logits_per_layer) <= layer:
                logits_per_layer.append([])
            logits_per_layer[layer].append(logits.float())
    qs = torch.tensor(QUANTILES, dtype=torch.float64)

    def quantiles(x: torch.Tensor) -> dict[str, float]:
        return {f"p{int(k * 100)}": round(v, 4) for k, v in zip(QUANTILES, torch.quantile(x.double(), qs).tolist(),
                                                                  strict=True)}

    rows = []
    for layer, chunks in enumerate(logits_per_layer):
        p = torch.softmax(torch.cat(chunks), -1)  # [N, E]
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
        top, idx = torch.topk(p, top_k, -1)
        shares = top / top.sum(-1, keepdim=True)
        usage = torch.bincount(idx.flatten(), minlength=p.shape[-1]).double()
        usage = usage / usage.sum()
        rows.append({"layer": layer, "router_entropy": round(entropy, 4),
                     "second_weight_quantiles": quantiles(shares[:, 1]),
                     "beyond_top1_quantiles": quantiles(1 - shares[:, 0]),
                     "expert_usage": [round(u, 4) for u in usage.tolist()],
                     "usage_max_over_uniform": round(float(usage.max()) * p.shape[-1], 3)})
    return rows


class ShareGate:
    """Forward hooks on every router that drop each chosen expert but the top-1 whose share of the chosen
    weights is below `threshold` (adapmoe's gate at one global threshold, docs/gating.md), counting the
    expert evaluations saved. A renormalising router gives the kept experts the whole total, in proportion."""

    def __init__(self, model, renormalises: bool = True) -> None:
        self.threshold = 0.0
        self.renormalises = renormalises
        self.dropped = 0
        self.total = 0
        self.handles = [layer.mlp.gate.register_forward_hook(self.hook) for layer in model.model.layers]

    def hook(self, module, inputs, output):
        logits, weights, index = output  # [N, E], [N, k], [N, k]
        order = torch.argsort(weights, dim=-1, descending=True, stable=True)
        weights, index = weights.gather(-1, order), index.gather(-1, order)
        shares = weights / weights.sum(-1, keepdim=True)
        drop = shares < self.threshold
        drop[:, 0] = False
        self.dropped += int(drop.sum())
        self.total += index.numel()
        kept = weights.masked_fill(drop, 0.0)
        if self.renormalises:
            kept = kept * (weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
        return logits, kept, index.masked_fill(drop, module.num_experts)  # the experts module skips that id

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def threshold_sweep(model, wins: torch.Tensor, base_loss: float, renormalises: bool = True) -> list[dict]:
    top_k = model.config.num_experts_per_tok
    gate = ShareGate(model, renormalises)
    rows = []
    grid = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3) if top_k == 2 else (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15)
    try:
        for threshold in grid:
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


def quality_report(model, tok, train_ids, held, probe, held_text: str, args,
                   family: MoEFamily = MIXTRAL) -> dict:
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
        "uniform_router_entropy": round(math.log(family.num_experts(model.config)), 4),
        "routing": routing_statistics(model, held),
        "second_expert_threshold": threshold_sweep(model, held, held_loss, family.renormalises),
        "samples": sample_answers(model, tok),
    }


def plot_curve(curve: list[dict], path: Path, title: str = "adapmoe embedded model") -> None:
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
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
