"""How well a layer's router, applied to the hidden state entering an earlier layer's experts, predicts the
experts it will pick — the question behind prefetching more than one layer ahead (docs/performance.md,
"Prefetching further ahead").

    python scripts/measure_prediction_distance.py [MODEL_DIR] [--tokens 4096] [--max-distance 4]

The model is transformers' own (float32), run over held-out text in 256-token windows. For each distance
d, every layer l and token: the top-k of router l+d on the hidden state entering layer l's experts against
the top-k layer l+d actually picks. Two recalls: over every expert layer l+d uses, and over the ones it
did not use for the previous token (a stand-in for the experts a cache is missing: the only ones a
prefetch can help with). No adaptive gate. Prints one line per distance."""

from __future__ import annotations

import argparse

import torch
import transformers

from adapmoe_cli.model_arg import default_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a Mixtral-style transformers checkpoint directory (default: the "
                    "embedded model); the text is the embedded model's held-out split either way")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--max-distance", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = args.model or default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = (default_model_dir() / "heldout.txt").read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    blocks = [layer.mlp for layer in model.model.layers]
    k = model.config.num_experts_per_tok
    entering: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda _m, a, i=i: entering.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
    routers = [block.gate.weight.float() for block in blocks]
    n_layers = len(blocks)
    # [distance] → [right over all used, all used, right over newly used, newly used]
    counts = {d: [0, 0, 0, 0] for d in range(1, args.max_distance + 1)}
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, 256):
            model(ids[:, start:start + 256])
            used = [torch.topk(entering[i] @ routers[i].T, k).indices for i in range(n_layers)]
            for d, c in counts.items():
                for i in range(n_layers - d):
                    pred = torch.topk(entering[i] @ routers[i + d].T, k).indices
                    actual = used[i + d]
                    right = (actual[:, :, None] == pred[:, None, :]).any(-1)  # [T, k]
                    new = ~(actual[1:, :, None] == actual[:-1, None, :]).any(-1)  # not used by the previous token
                    c[0] += int(right.sum())
                    c[1] += right.numel()
                    c[2] += int((right[1:] & new).sum())
                    c[3] += int(new.sum())
    print(f"{model.config.model_type}, {n_layers} layers, top-{k}, {ids.shape[1]} held-out tokens")
    for d, (r, n, rn, nn) in counts.items():
        print(f"distance {d}: recall {r / n:.3f} over every expert used, {rn / nn:.3f} over those the previous "
              f"token did not use ({nn} of {n})")


if __name__ == "__main__":
    main()
