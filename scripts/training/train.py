"""Phase 3, the model and its training: the config of a `MoEFamily` model, token windows and batches, the
evaluation loss, and AdamW with warm-up and cosine decay."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from training.family import MIXTRAL, MoEFamily


def model_config(tok, args: argparse.Namespace, family: MoEFamily = MIXTRAL, experts: int = 8, top_k: int = 2):
    return family.config(**dict(family.extra_config),
        vocab_size=len(tok), hidden_size=args.hidden, **{family.expert_intermediate_key: args.intermediate},
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, **{family.experts_key: experts}, num_experts_per_tok=top_k,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        output_router_logits=True, router_aux_loss_coef=args.aux_coef, attention_dropout=args.dropout,
        initializer_range=0.02, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, per_layer: bool = True) -> torch.Tensor:
    """Switch-Transformer load balancing, E · Σ_e f_e · P_e (f_e: share of the top-k choices that go to expert
    e, P_e: its mean router probability), computed per layer and averaged over layers. transformers' own
    loss pools every layer's tokens before counting, so it only balances experts summed over layers: the
    first embedded model, trained with it, used 2 of its 8 experts for 84 % of layer 0's choices.
    `per_layer=False` pools as transformers does (kept to compare)."""
    logits = router_logits if per_layer else (torch.cat(router_logits),)
    losses = []
    for layer in logits:  # [N, E]
        probs = torch.softmax(layer.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        share = torch.zeros_like(probs).scatter_(-1, chosen, 1.0).mean(0) / top_k  # f_e, sums to 1
        losses.append(probs.shape[-1] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def parameter_counts(model, family: MoEFamily = MIXTRAL) -> tuple[int, int]:
    """(all parameters, parameters active per token: the non-expert ones plus top-k of the experts)."""
    experts, top_k = family.num_experts(model.config), model.config.num_experts_per_tok
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return params, params - expert_params * (experts - top_k) // experts


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
        aux = balance_loss(out.router_logits, model.config.num_experts_per_tok, args.balance == "per-layer")
        loss = lm + coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lm_value = float(lm.detach())
        smooth = lm_value if smooth is None else 0.98 * smooth + 0.02 * lm_value
        entry = {"step": step, "tokens": step * args.batch * args.ctx, "train_loss": lm_value,
                 "train_loss_smoothed": smooth, "aux_loss": float(aux.detach()), "lr": sched.get_last_lr()[0],
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
