"""What computing one expert costs per experts format and library, on the embedded model's expert shapes
(hidden 192, intermediate 256) and the full-size store's (intermediate 7424): the measurement behind the
kernels experts_format.py uses (docs/quantization.md).

Candidates per format: PyTorch's own CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`)
with bfloat16 and float32 activations; HQQ's dequantize-then-matmul (what its CPU path does); torchao's
weight-only configs when torchao is installed (it is not a dependency). One expert = gate, up and down
projections (SiLU between), 1 token (decode) and 64 tokens (prefill), 2 threads, best of 5 × 20 calls.

    python scripts/measure_quant_kernels.py [--json docs/quant-kernels.json]
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
import torch.nn.functional as F

from adapmoe_cli.experts_format import by_part, parse_format

warnings.filterwarnings("ignore")
SHAPES = {"embedded (I=256)": 256, "full-size (I=7424)": 7424}
HIDDEN = 192


def best_us(fn, calls: int = 20, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def expert(lin, x):
    return lin(F.silu(lin(x, "w1")) * lin(x, "w3"), "w2")


def measure(inter: int, tokens: int) -> dict[str, float | str]:
    g = torch.Generator().manual_seed(0)
    parts = {"w1": torch.randn(inter, HIDDEN, generator=g) * 0.02, "w3": torch.randn(inter, HIDDEN, generator=g) * 0.02,
             "w2": torch.randn(HIDDEN, inter, generator=g) * 0.02}
    x = torch.randn(tokens, HIDDEN, generator=g)
    out: dict[str, float | str] = {}
    def native(w: dict[str, torch.Tensor]):
        return lambda a, part: F.linear(a, w[part])

    def kernel(fmt, enc, act):
        return lambda a, part: fmt.linear(a, enc[part], act)

    def hqq_path(q):
        return lambda a, part: F.linear(a, Quantizer.dequantize(*q[part]).reshape(parts[part].shape))

    for dtype in (torch.float32, torch.bfloat16):
        lin, xd = native({k: t.to(dtype) for k, t in parts.items()}), x.to(dtype)
        out[f"native {str(dtype)[6:]}: F.linear"] = best_us(lambda lin=lin, xd=xd: expert(lin, xd))
    for name in ("int8", "int4", "int2", "mxfp4"):
        fmt = parse_format(name)
        enc = by_part({f"{k}{s}": t for k, w in parts.items() for s, t in fmt.encode(w, torch.float32).items()})
        for act in ("bfloat16", "model"):
            label = f"{fmt.label()}: PyTorch kernel, {'bfloat16' if act == 'bfloat16' else 'float32'} activations"
            lin = kernel(fmt, enc, act)
            out[label] = best_us(lambda lin=lin: expert(lin, x))
    from hqq.core.quantize import Quantizer

    for bits, group in ((4, 64), (2, 32)):
        q = {k: Quantizer.quantize(w, nbits=bits, group_size=group, optimize=True, axis=1, bitpack=True,
                                   compute_dtype=torch.float32, device="cpu") for k, w in parts.items()}
        lin = hqq_path(q)
        out[f"int{bits}-g{group}: HQQ dequantize + F.linear"] = best_us(lambda lin=lin: expert(lin, x), calls=5)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        out["torchao"] = "not installed (pip install torchao to include it)"
    else:
        mods = {p: torch.nn.Linear(v.shape[1], v.shape[0], bias=False).to(torch.bfloat16) for p, v in parts.items()}
        for p, m in mods.items():
            m.weight.data = parts[p].to(torch.bfloat16)
            quantize_(m, Int8WeightOnlyConfig())
        with torch.no_grad():
            out["int8: torchao Int8WeightOnlyConfig, bfloat16"] = best_us(lambda: expert(
                lambda a, part: mods[part](a), x.to(torch.bfloat16)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    result = {"torch": torch.__version__, "threads": 2, "unit": "microseconds per expert (w1, w3, w2)", "shapes": {}}
    for shape, inter in SHAPES.items():
        for tokens in (1, 64):
            key = f"{shape}, {tokens} token{'s' if tokens > 1 else ''}"
            result["shapes"][key] = measure(inter, tokens)
            print(key)
            for label, us in result["shapes"][key].items():
                print(f"  {label:55s} {us if isinstance(us, str) else f'{us:10.1f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
