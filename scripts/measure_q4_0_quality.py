"""What llama.cpp's Q4_0 costs the embedded model's quality, next to our int4 experts (the 4-bit comparison
of docs/bench.md compares speed; this is the quality half). Needs the llama.cpp build
(scripts/build_llamacpp.py): its gguf-py reads and dequantizes the GGUF.

  python scripts/measure_q4_0_quality.py [--model embedded] [--tokens 8192]

The model's store is exported as a checkpoint, its experts replaced by llama.cpp's Q4_0 experts of the same
model (`gguf_for(store, "q4_0")`: llama.cpp's converter, then `llama-quantize`), dequantized by gguf-py;
the dense weights stay the store's, as they do in our int4 store. That checkpoint is sharded and scored
on the held-out text with the bench's measure (ungated perplexity on `--tokens` tokens), beside the native
store and our int4-g64 store (HQQ's scales and zeros). Prints the three and writes them as JSON (--out)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapmoe_cli.experts_format import parse_format
from adapmoe_cli.model_arg import default_text, open_model
from adapmoe_cli.peers import llamacpp
from adapmoe_cli.planning.quality import gate_perplexity
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import load_settings
from adapmoe_cli.store import Store
from adapmoe_cli.store.export import export_checkpoint
from adapmoe_cli.store.writer import shard

#: GGUF's stacked expert tensors → our parts (gate = w1, up = w3, down = w2)
GGUF_PARTS = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}


def q4_0_experts(gguf: Path, tree: Path) -> dict[tuple[int, int, str], torch.Tensor]:
    """(layer, expert, part) → that expert part dequantized from the GGUF by gguf-py (llama.cpp's own)."""
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(gguf).tensors:
        name = t.name.split(".")
        if len(name) == 4 and name[0] == "blk" and name[2] in GGUF_PARTS:
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()  # [experts, out, in]
            for e in range(w.shape[0]):
                out[(int(name[1]), e, GGUF_PARTS[name[2]])] = w[e]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    settings = load_settings()
    native = open_model(a.model)
    int4 = open_model(a.model, experts_format=parse_format("int4"))
    llama = llamacpp.require()
    experts = q4_0_experts(llamacpp.gguf_for(native, "q4_0", note=print), llama.tree)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = export_checkpoint(native, Path(tmp) / "checkpoint")
        fam, replaced = native.family, 0
        for f in sorted(ckpt.glob("*.safetensors")):
            tensors = load_file(f)
            for (layer, expert, part), w in experts.items():
                name = fam.expert_tensor_name(layer, expert, part)
                if name in tensors:
                    assert tensors[name].shape == w.shape, (name, tensors[name].shape, w.shape)
                    tensors[name] = w.to(tensors[name].dtype).contiguous()
                    replaced += 1
            save_file(tensors, f, metadata={"format": "pt"})
        if replaced != len(experts) or replaced != 3 * len(native.experts):
            raise SystemExit(f"replaced {replaced} expert parts of {3 * len(native.experts)}: names do not match")
        shard(ckpt, Path(tmp) / "store")
        q4 = Store.open(Path(tmp) / "store")
        results = {}
        for label, store in (("native", native), ("int4-g64 (ours, HQQ)", int4), ("Q4_0 (llama.cpp)", q4)):
            with gate_perplexity(store, settings, default_text("heldout"), a.tokens) as ppl:
                results[label] = ppl(GatePolicy.off())
    base = results["native"]
    for label, p in results.items():
        print(f"{label:22s} held-out perplexity {p:.3f} ({p / base - 1:+.2%})")
    if a.out:
        a.out.write_text(json.dumps({"tokens": a.tokens, "perplexity": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
