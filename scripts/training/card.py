"""Phase 5, the model card: MODEL_CARD.md written from the quality report and the run's metadata."""

from __future__ import annotations

from training.family import MIXTRAL, MoEFamily
from training.tokenizer import CHAT_TEMPLATE


def model_card(report: dict, meta: dict, family: MoEFamily = MIXTRAL) -> str:
    rows = "\n".join(
        f"| {r['layer']} | {r['router_entropy']:.3f} | {r['beyond_top1_quantiles']['p10']:.3f} / "
        f"{r['beyond_top1_quantiles']['p50']:.3f} / {r['beyond_top1_quantiles']['p90']:.3f} | "
        f"{r['usage_max_over_uniform']:.2f} |" for r in report["routing"])
    sweep = "\n".join(f"| {r['threshold']} | {100 * r['expert_evaluations_saved']:.1f} % | "
                      f"{100 * r['perplexity_increase']:+.2f} % |" for r in report["second_expert_threshold"])
    samples = "\n\n".join(f"**{s['question']}**\n\n```text\n{s['answer']}\n```" for s in report["samples"])
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    c = meta["config"]
    experts = meta.get("experts") or c[family.experts_key]
    hub_experts = f"model.layers.N.{family.hub_moe_block}.experts.E.{'/'.join(sorted(family.hub_expert_weights))}"
    template = CHAT_TEMPLATE.replace("\n", "\\n")
    name = meta.get("name", "embedded")
    balance = ("computed per layer and averaged (`training/train.py` `balance_loss`)"
               if meta.get("balance", "pooled") == "per-layer" else "pooled over layers, as transformers computes it")
    texts = (f"The splits are the same documents as the model whose tokenizer it reuses "
             f"(`src/adapmoe_cli/{meta['texts_shared_with']}/`); adapmoe reads `calibration.txt` and "
             "`heldout.txt` from there."
             if meta.get("texts_shared_with") else
             "`calibration.txt` and `heldout.txt` are plain documents of those splits separated by blank lines.")
    return f"""# adapmoe embedded model `{name}`

A small {family.name}-architecture Mixture-of-Experts language model, trained from scratch on this machine so
that adapmoe has a real (not random) MoE to run, profile and test without any download: `adapmoe chat {name}`.
It knows a little about Python and the libraries it was trained on; it is a test subject, not an assistant.

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
  {texts}
  Train: {meta['train_tokens']:,} tokens; held-out: {meta['heldout_tokens']:,} tokens.

## Architecture

`{family.architecture}`: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {experts}
experts per layer (intermediate {c[family.expert_intermediate_key]}), top-{c['num_experts_per_tok']} routing,
{c['num_attention_heads']} query heads / {c['num_key_value_heads']} key-value heads (head dim {c['head_dim']}),
vocabulary {c['vocab_size']}, context {c['max_position_embeddings']} (trained on {meta['ctx']}-token windows),
untied `lm_head`, router load-balancing loss coefficient {c['router_aux_loss_coef']}, {balance}.
{meta['parameters']:,} parameters ({meta['active_parameters']:,} active per token), stored in bfloat16 under the
hub's original tensor names (`{hub_experts}.weight`, `…gate.weight`).
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

Routing on held-out text (uniform entropy ln {experts} = {report['uniform_router_entropy']:.3f}; beyond top-1 =
1 − the top-1's share of the top-{c['num_experts_per_tok']} weights, at top-2 the paper's second weight; usage
balance = busiest expert's share of the choices × {experts}, 1 when perfectly balanced):

| layer | router entropy | beyond top-1 p10 / p50 / p90 | usage balance |
|---|---|---|---|
{rows}

Dropping every chosen expert but the top-1 whose share of the chosen weights is below one global threshold:

| threshold | expert evaluations saved | perplexity change |
|---|---|---|
{sweep}

Greedy answers (chat template, 60 new tokens at most), verbatim:

{samples}

Full numbers: `quality_report.json`; loss curve: `loss_curve.json`, `loss_curve.png`.
"""
