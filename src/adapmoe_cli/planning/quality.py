"""The adaptive gate's quality: perplexity as a function of the gate (`gate_perplexity`), the same against
the ungated model with an upper confidence bound of the increase (`gate_quality`), and the search for
the largest gate scale whose bound stays within a quality budget (`search_scale`, bisection in
`gate_rules.find_scale`). Used by `plan-cache`, `eval --quality-budget` and `bench`.

The bound (`increase_bound`): per scored token t, d_t = loss_t(gated) − loss_t(ungated); the increase is
exp(mean d) − 1 and its bound exp(mean d + z · sd · sqrt(2 / W)) − 1, z = `CONFIDENCE_Z` (one-sided 95 %),
sd the spread of the W scored windows' mean d: a bound on what another text of as many windows would
show (the difference of two such means has twice one's variance). Each window is one sample, not each
token: what the gate costs differs from document to document more than tokens' independence would say
(embedded model, gate at the shipped scale: the sd of 256-token windows' means is 1.3 points on the
calibration split, where independent tokens would give 1.0), and the text a user serves is other
documents. A search that spent the whole budget on the estimate would spend its noise too; one bounded
per token, on 4,096 tokens, measured +1.06 % on the whole held-out split at a 1 % budget (docs/gating.md)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from adapmoe_cli import budget as budgets
from adapmoe_cli.conversation import load_tokenizer
from adapmoe_cli.errors import UsageError
from adapmoe_cli.perplexity import evaluate, read_text_tokens, spread_windows
from adapmoe_cli.planning import CALIBRATION_TOKENS, gate_rules
from adapmoe_cli.planning.gate_rules import GateQuality
from adapmoe_cli.profiling.profile_file import default_path, read_profile
from adapmoe_cli.progress import Steps, within
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import Settings
from adapmoe_cli.store import Store

SEARCH_EVALUATIONS = gate_rules.SEARCH_ITERATIONS + 2  # the ungated text, the largest scale, the bisection
CONFIDENCE_Z = 1.645  # one-sided 95 % upper bound of the perplexity increase


class Scored(NamedTuple):
    """One gate's pass over the scored text."""

    losses: torch.Tensor  # each scored token's loss [n], window after window
    experts_per_token: float
    windows: tuple[int, ...]  # how many of `losses` each window scored


@contextlib.contextmanager
def token_losses(store: Store, settings: Settings, text: Path, tokens: int
                  ) -> Iterator[Callable[[GatePolicy], Scored]]:
    """gate → its `Scored` pass on `tokens` tokens of `text`, in windows spread evenly over the whole text
    (its first tokens alone are one document or two, not a sample of it). Perplexity does not depend on
    the cache budget, so the engine holds every expert when they fit (each pass is then fast), else the
    user's."""
    if tokens < 2:  # (a perplexity needs a token to predict the next one)
        raise UsageError(f"the quality search needs at least 2 calibration tokens, got {tokens}")
    shape = store.cache_shape
    full = budgets.fits(shape)
    budget = budgets.all_experts(shape) if full else budgets.resolve(settings.cache.budget, shape)
    with Engine(store, settings, budget) as engine:
        ids = read_text_tokens(load_tokenizer(store), text, min_tokens=64)
        window = int(min(256, store.config.get("max_position_embeddings", 256)))
        pieces = spread_windows(ids, tokens, window)

        def losses(gate: GatePolicy) -> Scored:
            engine.use_gate(gate)
            before = engine.stats.copy()
            nll = [x for x in (evaluate(engine, piece, window).token_nll for piece in pieces) if x is not None]
            return Scored(torch.cat(nll), engine.stats.delta(before).experts_per_token,
                          tuple(x.numel() for x in nll))

        yield losses


@contextlib.contextmanager
def gate_perplexity(store: Store, settings: Settings, text: Path, tokens: int = CALIBRATION_TOKENS
                    ) -> Iterator[Callable[[GatePolicy], float]]:
    """A function gate → perplexity on `tokens` tokens of `text`."""
    with token_losses(store, settings, text, tokens) as losses:
        yield lambda gate: math.exp(float(losses(gate).losses.mean()))


WINDOW = 256  # tokens a sample of `increase_bound` spans when the text was scored as one piece


def increase_bound(d: torch.Tensor, windows: Sequence[int], z: float = CONFIDENCE_Z) -> float:
    """One-sided upper bound of the increase exp(mean d) − 1 that another text of as many windows would
    show, from the per-token loss differences `d` scored in `windows` (their lengths, in order), each
    window one sample: the difference of two such means has twice the variance of one. A text scored as
    one piece is cut into `WINDOW`-token samples; one too short for two is bounded with each token one."""
    parts = torch.split(d, list(windows)) if len(windows) > 1 else torch.split(d, WINDOW)
    samples = torch.stack([p.mean() for p in parts]) if len(parts) > 1 else d
    sd = float(samples.std()) if samples.numel() > 1 else 0.0
    return math.exp(float(d.mean()) + z * sd * math.sqrt(2 / samples.numel())) - 1


@contextlib.contextmanager
def gate_quality(store: Store, settings: Settings, text: Path, tokens: int = CALIBRATION_TOKENS,
                 z: float = CONFIDENCE_Z) -> Iterator[Callable[[GatePolicy], GateQuality]]:
    """A function gate → its `GateQuality` on `tokens` tokens of `text` (the ungated pass made once)."""
    with token_losses(store, settings, text, tokens) as losses:
        base: list[Scored] = []

        def quality(gate: GatePolicy) -> GateQuality:
            if not base:
                base.append(losses(GatePolicy.off()))
            b = base[0]
            gated = losses(gate) if gate.thresholds else b
            d = gated.losses - b.losses  # [n]
            return GateQuality(math.exp(float(gated.losses.mean())), math.exp(float(b.losses.mean())),
                               increase_bound(d, b.windows, z), gated.experts_per_token, b.experts_per_token)

        yield quality


def counted(quality: Callable[[GatePolicy], GateQuality], progress: Steps | None
            ) -> Callable[[GatePolicy], GateQuality]:
    """`quality`, reporting each evaluation of the search as a step (at most `SEARCH_EVALUATIONS`)."""
    done = [0]

    def each(gate: GatePolicy) -> GateQuality:
        value = quality(gate)
        done[0] += 1
        within(progress, "searching the gate scale")(done[0], SEARCH_EVALUATIONS)
        return value

    return each


def search_scale(store: Store, settings: Settings, quality_budget: float, text: Path,
                 tokens: int = CALIBRATION_TOKENS, progress: Steps | None = None) -> gate_rules.ScaleSearch:
    """The largest gate scale (rule `settings.gate.rule`) whose perplexity increase on `text` stays within
    `quality_budget` (e.g. 0.01) of the ungated perplexity, with the margin of `gate_quality`'s bound."""
    prof = read_profile(default_path(store), store)
    with gate_quality(store, settings, text, tokens) as quality:
        return gate_rules.find_scale(settings.gate.rule, prof.layers, quality_budget, counted(quality, progress),
                                     top_k=store.shape.top_k,
                                     stats=prof.expert_stats_for(settings.gate.rule, store.shape.top_k))


FALLBACK_TOKENS = 1024  # held-out tokens the miss fallback's cost is measured on, one at a time


def fallback_cost(store: Store, settings: Settings, text: Path, budget: budgets.Budget, gate: GatePolicy,
                  fallback: Store, tokens: int = FALLBACK_TOKENS) -> float:
    """What computing misses with `fallback`'s low-bit copies costs at this cache (`budget`, the settings'
    eviction and prefetch, `gate`): the relative perplexity increase over the same run without it, both fed
    the text one token at a time (`stepwise_nll`: which experts miss depends on the cache's state)."""
    from adapmoe_cli.perplexity import stepwise_nll

    ids = read_text_tokens(load_tokenizer(store), text, min_tokens=64)[:tokens]
    losses = []
    for fb in (None, fallback):
        with Engine(store, settings, budget, gate=gate, fallback=fb) as engine:
            losses.append(stepwise_nll(engine, ids))
    return math.exp(float(losses[1].mean() - losses[0].mean())) - 1
