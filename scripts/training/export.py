"""Phase 4, export: the trained model in its family's original hub layout (per-expert tensor names, bfloat16)
with config, generation config and tokenizer, reloaded with `from_pretrained` and checked bit-exact."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from training.family import MIXTRAL, MoEFamily
from training.tokenizer import save_tokenizer


def hub_state_dict(model, family: MoEFamily = MIXTRAL) -> dict[str, torch.Tensor]:
    """transformers 5's fused in-memory experts → the hub's original per-expert names of `family`, bfloat16."""
    gate, up, down = family.hub_expert_weights
    tensors = {}
    for name, value in model.state_dict().items():
        parts = name.split(".")
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: first I rows gate (w1), next I up (w3)
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                base = family.hub_expert_prefix(parts[2], e)
                tensors[f"{base}.{gate}.weight"] = value[e, :inter]  # [I, H]
                tensors[f"{base}.{up}.weight"] = value[e, inter:]  # [I, H]
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            for e in range(value.shape[0]):
                tensors[f"{family.hub_expert_prefix(parts[2], e)}.{down}.weight"] = value[e]  # [H, I]
        else:
            tensors[family.hub_name(name)] = value
    return {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in sorted(tensors.items())}


def save_checkpoint(model, tok, out: Path, family: MoEFamily = MIXTRAL) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    save_file(hub_state_dict(model, family), str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600; the file ships in the package
    config = model.config
    config.output_router_logits = False  # trained with it on; inference should not pay for the aux loss
    config.architectures = [family.architecture]
    config.dtype = torch.bfloat16
    config.save_pretrained(str(out))
    end = tok.convert_tokens_to_ids("<|end|>")
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[end, tok.eos_token_id],
                     pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=128).save_pretrained(str(out))
    save_tokenizer(tok, out)


def reload_and_verify(model, out: Path, held: torch.Tensor, family: MoEFamily = MIXTRAL):
    """Load the saved files as a user would; require no missing/unexpected weights and logits bit-equal to
    the trained model rounded to bfloat16 and run in float32."""
    loaded, info = family.model_class().from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
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
