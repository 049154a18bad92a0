"""`evaluate_model()`: the library function behind `adapmoe eval` — perplexity of a text on the offloading
runtime (`perplexity.py`), experts per token and each layer's single-expert ratio, with the gate the
store's plan, `--gate-scale` or a quality-budget search (`planning/quality.py`) gives. After a search, the
evaluated text's own increase (against the ungated model, one more pass) is reported next to the
calibration figure the search saw."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapmoe_cli.conversation import load_tokenizer
from adapmoe_cli.model_arg import default_text
from adapmoe_cli.perplexity import evaluate, read_text_tokens
from adapmoe_cli.planning import CALIBRATION_TOKENS
from adapmoe_cli.planning.quality import search_scale
from adapmoe_cli.planning.resolve import open_engine
from adapmoe_cli.progress import Steps, within
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.moe_block import LayerRecord
from adapmoe_cli.settings import Settings, replace
from adapmoe_cli.store import Store


@dataclass(frozen=True)
class EvalRequest:
    text: Path | None = None  # default: the embedded model's held-out split
    tokens: int | None = None  # score at most this many
    window: int = 256
    stride: int | None = None  # new tokens per window (default: window / 2)
    quality_budget: float | None = None  # search the gate scale within this increase first
    calibration: Path | None = None  # text for that search (default: the embedded calibration split)
    calibration_tokens: int = CALIBRATION_TOKENS  # tokens of it the search scores each gate on


def evaluate_model(store: Store, settings: Settings, req: EvalRequest, note: Callable[[str], None] | None = None,
                   progress: Steps | None = None) -> dict[str, Any]:
    """The documented `eval --json` object. `note` hears where the budget and gate came from."""
    say = note or (lambda _msg: None)
    search = None
    if req.quality_budget is not None:
        search = search_scale(store, settings, req.quality_budget, req.calibration or default_text("calibration"),
                              req.calibration_tokens, progress=progress)
        say(search.unreachable_text(req.quality_budget) or f"gate scale {search.scale:.4g}: calibration perplexity "
            f"{search.increase:+.2%} (95% bound {search.bound:+.2%})")
        settings = replace(settings, gate=replace(settings.gate, scale=search.scale))
    window = min(req.window, int(store.config.get("max_position_embeddings", req.window)))
    layers = list(store.shape.moe_layers)
    single = {layer: 0 for layer in layers}
    seen = {layer: 0 for layer in layers}

    def count(rec: LayerRecord) -> None:
        single[rec.layer] += int((rec.keep.sum(-1) == 1).sum())
        seen[rec.layer] += int(rec.keep.shape[0])

    ids = read_text_tokens(load_tokenizer(store), req.text or default_text("heldout"), min_tokens=2,
                           max_tokens=req.tokens)
    with open_engine(store, settings, note=say) as engine:
        engine.observers.callbacks.append(count)
        stride = req.stride if req.stride is not None else max(1, window // 2)
        res = evaluate(engine, ids, window, stride, progress=within(progress, "perplexity"))
        gate = engine.gate
        if search is not None:
            engine.use_gate(GatePolicy.off())
            ungated = evaluate(engine, ids, window, stride).perplexity
    out = {
        "perplexity": res.perplexity,
        "loss": res.loss,
        "tokens": res.tokens,
        "experts_per_token": res.stats.experts_per_token,
        "top_k": store.shape.top_k,
        "single_expert_ratio": {str(layer): single[layer] / seen[layer] if seen[layer] else 0.0 for layer in layers},
        "gate": {"rule": gate.rule, "mode": gate.mode,
                 "scale": gate.scale, "thresholds": {str(k): v for k, v in gate.thresholds.items()}},
        "window": window,
    }
    if search is not None:
        out["quality_search"] = {
            "budget": req.quality_budget, "scale": search.scale,
            "calibration": {"increase": search.increase, "increase_bound": search.bound},
            "evaluated": {"increase": res.perplexity / ungated - 1, "ungated_perplexity": ungated},
            "reachable": search.reachable, "unreachable": search.unreachable_text(req.quality_budget),
        }
    return out
