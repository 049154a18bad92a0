"""Phase 5, the model card: MODEL_CARD.md written from the quality report and the run's metadata."""

from __future__ import annotations

from training.family import MIXTRAL, MoEFamily
from training.tokenizer import CHAT_TEMPLATE


def model_card(report: dict, meta: dict, family: MoEFamily = MIXTRAL) -> str:
    rows = "\n".join(
        f"| {r['layer']} | {r['router_entropy']:.3f} | {r['second_weight_quantiles']['p10']:.3f} / "
        f"{r['second_weight_quantiles']['p50']:.3f} / {r['second_weight_quantiles']['p90']:.3f} | "
        f"{r['usage_max_over_uniform']:.2f} |" for r in report["routing"])
    sweep = "\n".join(f"| {r['threshold']} | {100 * r['expert_evaluations_saved']:.1f} % | "
                      f"{100 * r['perplexity_increase']:+.2f} % |" for r in report["second_expert_threshold"])
    samples = "\n\n".join(f"**{s['question']}**\n\n```text\n{s['answer']}\n```" for s in report["samples"])
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    c = meta["config"]
    experts = c[family.experts_key]
    hub_experts = f"model.layers.N.{family.hub_moe_block}.experts.E.{'/'.join(sorted(family.hub_expert_weights))}"
    template = CHAT_TEMPLATE.replace("\n", "\\n")
    return f"""# adapmoe default model

A small {family.name}-architecture Mixture-of-Experts language model, trained from scratch on this machine so
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

`{family.architecture}`: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {experts}
experts per layer (intermediate {c[family.expert_intermediate_key]}), top-{c['num_experts_per_tok']} routing,
{c['num_attention_heads']} query heads / {c['num_key_value_heads']} key-value heads (head dim {c['head_dim']}),
vocabulary {c['vocab_size']}, context {c['max_position_embeddings']} (trained on {meta['ctx']}-token windows),
untied `lm_head`, router load-balancing loss coefficient {c['router_aux_loss_coef']}.
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

Routing on held-out text (uniform entropy ln {experts} = {report['uniform_router_entropy']:.3f}; second weight = the
lower of the two top-2 weights after renormalising; usage balance = busiest expert's share × {experts}):

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
