"""Writes random-weight checkpoints in the Hugging Face hub's exact layout (config.json, sharded
`model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`, tokenizer files with a chat
template, generation config). Tests and benchmarks use them where a real model is too big; the
loading code that reads them is the one real checkpoints go through."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route every token to a few "
    "experts; the others stay on disk. A cache keeps the experts that are used often in memory, and a "
    "prefetcher loads the next layer's experts while this layer computes. def main(): return 0\n"
    "What does the json module do? It encodes and decodes JSON documents. import os, sys, re\n"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a synthetic Mixtral; every field is a parameter so tests cover odd sizes."""

    num_hidden_layers: int = 2
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    hidden_size: int = 64
    intermediate_size: int = 96
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 320
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False

    def config(self, dtype: str = "bfloat16") -> dict[str, Any]:
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **asdict(self),
            "head_dim": self.hidden_size // self.num_attention_heads,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "router_aux_loss_coef": 0.02,
            "output_router_logits": False,
            "torch_dtype": dtype,
        }


def hub_tensor_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """Hub name → shape, in the order the hub's Mixtral files list them."""
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    hd = h // spec.num_attention_heads
    q, kv = spec.num_attention_heads * hd, spec.num_key_value_heads * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(spec.num_hidden_layers):
        p = f"model.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        for e in range(spec.num_local_experts):
            out[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = (i, h)
            out[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = (h, i)
            out[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = (i, h)
        out[f"{p}.block_sparse_moe.gate.weight"] = (spec.num_local_experts, h)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        out[f"{p}.self_attn.k_proj.weight"] = (kv, h)
        out[f"{p}.self_attn.o_proj.weight"] = (h, q)
        out[f"{p}.self_attn.q_proj.weight"] = (q, h)
        out[f"{p}.self_attn.v_proj.weight"] = (kv, h)
    out["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def _random(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if ".gate." in name:  # routers: larger so routing is decisive, as in trained models
        return torch.randn(shape, generator=gen) * (2.0 / shape[-1] ** 0.5)
    return torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def write_checkpoint(
    out: Path,
    spec: TinySpec = TinySpec(),
    dtype: torch.dtype = torch.bfloat16,
    num_shards: int = 2,
    seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """Write a random checkpoint into `out`. With ≥ 2 shards, one expert's w1/w2/w3 straddle a file
    boundary, as in real Mixtral shards."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dname = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    (out / "config.json").write_text(json.dumps(spec.config(dname), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, 6], "do_sample": False}, indent=2)
    )
    shapes = hub_tensor_shapes(spec)
    names = list(shapes)
    # split points: equal byte shares, moved onto the w2 of the expert there, so w1 | w2 w3 straddle
    sizes = [torch.Size(s).numel() for s in shapes.values()]
    total, cuts, acc = sum(sizes), [], 0
    for idx, n in enumerate(sizes):
        acc += n
        if len(cuts) < num_shards - 1 and acc >= total * (len(cuts) + 1) / num_shards:
            j = idx
            while j < len(names) and not names[j].endswith(".w2.weight"):
                j += 1
            cuts.append(min(j, len(names) - 1) if j < len(names) else idx + 1)
    bounds = [0, *cuts, len(names)]
    gen = torch.Generator().manual_seed(seed)
    weight_map, total_bytes = {}, 0
    for k in range(num_shards):
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: _random(n, shapes[n], gen).to(dtype) for n in names[bounds[k] : bounds[k + 1]]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total_bytes += t.numel() * t.element_size()
        del part
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        write_tokenizer(out, min(spec.vocab_size, 400))
    return out


#: tiny configs of each supported family, odd where the family allows it: experts not a power of two,
#: one KV head, dense first layers or dense layers between sparse ones, k > 2, groups in the router
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 48},
    "phimoe": {"num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 48},
    "qwen2_moe": {"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 48,
                  "shared_expert_intermediate_size": 80, "intermediate_size": 96, "mlp_only_layers": [1]},
    "qwen3_moe": {"num_experts": 10, "num_experts_per_tok": 4, "moe_intermediate_size": 48,
                  "intermediate_size": 96, "norm_topk_prob": True},
    "olmoe": {"num_experts": 6, "num_experts_per_tok": 3, "intermediate_size": 48},
    "deepseek_v2": {"n_routed_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 48,
                    "intermediate_size": 96, "first_k_dense_replace": 1, "n_shared_experts": 1,
                    "routed_scaling_factor": 1.5, "kv_lora_rank": 16, "q_lora_rank": None,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16},
    "deepseek_v3": {"n_routed_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 48,
                    "intermediate_size": 96, "first_k_dense_replace": 1, "n_shared_experts": 1,
                    "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 16,
                    "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                    "head_dim": 8},
    "glm4_moe": {"n_routed_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 48,
                 "intermediate_size": 96, "first_k_dense_replace": 1, "n_shared_experts": 1,
                 "n_group": 1, "topk_group": 1},
    # sliding and full attention alternate, sinks, biases, yarn as published (a context the factor fits)
    "gpt_oss": {"num_local_experts": 6, "num_experts_per_tok": 3, "intermediate_size": 48, "sliding_window": 8,
                "max_position_embeddings": 131072},
}
_TINY_COMMON = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 16, "vocab_size": 320, "max_position_embeddings": 256, "bos_token_id": 1,
                "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}


def _to_mxfp4(out: Path) -> None:
    """Rewrite a saved GPT-OSS checkpoint's stacked experts (gate_up_proj [E, H, 2I], down_proj [E, I, H])
    as MXFP4 blocks and scales over the transposed rows, as openai/gpt-oss-* are published."""
    from safetensors.torch import load_file, save_file

    from adapmoe_cli.experts_format import quantize_mxfp4

    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for fname in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, t in load_file(out / fname).items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = quantize_mxfp4(t.transpose(1, 2))  # [E, out, in/2], [E, out, in/32]
                tensors[name + "_blocks"] = blocks.reshape(*scales.shape, 16)
                tensors[name + "_scales"] = scales
            else:
                tensors[name] = t
        save_file(tensors, out / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _randomise(model: Any, gen: torch.Generator) -> None:
    """Weights of the scale trained models have (decisive routing, unit-ish activations): transformers'
    own initialisation leaves routers at zero or near it."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not name.endswith(("inv_freq", "original_inv_freq")):
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    new = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
                elif name.endswith(("bias", "e_score_correction_bias")) or t.dim() < 2:
                    new = 0.1 * torch.randn(t.shape, generator=gen)
                elif name.endswith((".mlp.gate.weight", ".mlp.router.weight")):
                    new = torch.randn(t.shape, generator=gen) * (2.0 / t.shape[-1] ** 0.5)
                else:
                    new = torch.randn(t.shape, generator=gen) * (1.0 / t.shape[-1] ** 0.5)
                t.copy_(new.to(t.dtype))


def write_family_checkpoint(out: Path, model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                            max_shard_size: str = "200KB", mxfp4: bool = False, **overrides: Any) -> Path:
    """A random checkpoint of `model_type` made by transformers itself: its config class (TINY_FAMILIES
    and `overrides`), its model class, `save_pretrained` (the hub's names, sharded with the index file),
    plus the tokenizer files. What the family tests shard and compare against. `mxfp4` (gpt_oss): the experts
    rewritten as the hub publishes GPT-OSS — `_blocks` and `_scales` (`quantize_mxfp4`) with a
    `quantization_config` — and the rest in `dtype`."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = Path(out)
    cfg = CONFIG_MAPPING[model_type](**{**_TINY_COMMON, **TINY_FAMILIES[model_type], **overrides})
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    gen = torch.Generator().manual_seed(seed)
    model = cls(cfg)
    _randomise(model, gen)
    model.to(dtype).save_pretrained(str(out), max_shard_size=max_shard_size)
    if mxfp4:
        _to_mxfp4(out)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, 6], "do_sample": False}, indent=2))
    write_tokenizer(out, cfg.vocab_size)
    return out
