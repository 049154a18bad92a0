"""`make_profile()`: the library function behind `adapmoe profile`: picks the text, the method and the
budget, collects, computes the statistics, optionally validates on held-out text, writes the file.
`ensure_profile()`: the same with defaults, for commands that need a profile the store lacks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapmoe_cli import budget as budgets
from adapmoe_cli.conversation import load_tokenizer
from adapmoe_cli.errors import UsageError
from adapmoe_cli.perplexity import read_text_tokens, spread_windows
from adapmoe_cli.profiling.collect import collect, drop_losses, expert_statistics
from adapmoe_cli.profiling.profile_file import default_path, model_identity, write_profile
from adapmoe_cli.profiling.trace import layer_stats, spearman
from adapmoe_cli.progress import Steps, within
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.settings import Settings, replace
from adapmoe_cli.store import Store


@dataclass
class ProfileRequest:
    text: Path
    text_label: str
    tokens: int  # calibration tokens to use …
    window: int
    method: str = "auto"  # auto | gradient | forward
    min_tokens: int | None = None  # … or as many as the text holds, if at least this many (None: all of them)
    validate_text: Path | None = None
    validate_label: str = ""
    out: Path | None = None


def make_profile(store: Store, settings: Settings, req: ProfileRequest, progress: Steps | None = None) -> Path:
    shape = store.shape
    method = req.method
    if method == "auto":
        method = "gradient" if budgets.fits(store.cache_shape) else "forward"
    # the gradient method needs every expert resident; the forward method runs in the user's budget
    budget = (budgets.all_experts(store.cache_shape) if method == "gradient"
              else budgets.resolve(settings.cache.budget, store.cache_shape))
    if req.window < 2:
        raise UsageError("--window must be at least 2 tokens")
    # the profile is what a predicting eviction policy would read: profile with LRU
    lru = replace(settings, cache=replace(settings.cache, policy="lru"))
    with Engine(store, lru, budget) as engine:
        tok = load_tokenizer(store)
        ids = read_text_tokens(tok, req.text, min_tokens=req.min_tokens or req.tokens, max_tokens=req.tokens)
        trace, sens = collect(engine, ids, req.window, method, within(progress, f"{method} sensitivity"))
        # the expert statistics on windows spread over the whole text, not its first tokens (one document or
        # two): their means are what replaces a dropped expert on any text
        spread = sample(read_text_tokens(tok, req.text, min_tokens=req.min_tokens or req.tokens), req.tokens,
                        req.window)
        experts = expert_statistics(engine, spread, req.window, within(progress, "expert statistics"))
        layers = layer_stats(trace, shape.num_experts)
        for i, entry in enumerate(layers):
            entry["sensitivity"] = sens.fisher[i]
            entry["predicted_drop_loss"] = sens.predicted[i]
            entry["mean_second_weight_sq"] = sens.mean_w2_sq[i]
            if sens.second_order:
                entry["second_order_drop_loss"] = sens.second_order[i]
                entry["first_order_drop_loss"] = sens.first_order[i]
        data: dict[str, Any] = {
            "model": model_identity(store),
            "method": method,
            "calibration": {"text": req.text_label, "tokens": len(ids), "window": req.window},
            "layers": layers,
        }
        if req.validate_text is not None:
            held = read_text_tokens(tok, req.validate_text, min_tokens=req.window, max_tokens=req.tokens)
            measured = drop_losses(engine, held, req.window, progress=within(progress, "validating"))
            val: dict[str, Any] = {"text": req.validate_label, "tokens": len(held),
                                   "measured_drop_loss": measured,
                                   "spearman": {"predicted": spearman(sens.predicted, measured)}}
            if sens.second_order:
                val["spearman"]["second_order"] = spearman(sens.second_order, measured)
                val["spearman"]["first_order"] = spearman(sens.first_order, measured)
            data["validation"] = val
    return write_profile(req.out or default_path(store), data, trace, experts)



def sample(text: list[int], tokens: int, window: int) -> list[int]:
    """`tokens` tokens of a text as `window`-token windows spread evenly over all of it, back to back; all of
    it when it is no longer."""
    if len(text) <= tokens or tokens < window:
        return text[:tokens]
    return [t for piece in spread_windows(text, tokens // window * window, window) for t in piece]


def ensure_profile(store: Store, settings: Settings, text: Path, label: str, progress: Steps | None = None
                   ) -> Path | None:
    """Profile the store with `text` (up to 8192 tokens, windows of 256) if it has no profile yet; the
    path written, or None when there was one."""
    if default_path(store).exists():
        return None
    return make_profile(store, settings, ProfileRequest(text, label, 8192, 256, min_tokens=256), progress)
