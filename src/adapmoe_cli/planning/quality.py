"""The adaptive gate's quality: perplexity as a function of the gate on calibration text
(`gate_perplexity`), and the search for the largest gate scale within a quality budget (`search_scale`,
bisection in `gate_rules.find_scale`). Used by `plan-cache`, `eval --quality-budget` and `bench`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from adapmoe_cli import budget as budgets
from adapmoe_cli.conversation import load_tokenizer
from adapmoe_cli.perplexity import evaluate, read_text_tokens
from adapmoe_cli.planning import gate_rules
from adapmoe_cli.profiling.profile_file import default_path, read_profile
from adapmoe_cli.progress import Steps, within
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.settings import Settings
from adapmoe_cli.store import Store

CALIBRATION_TOKENS = 4096  # tokens of calibration text the quality search scores each gate on
SEARCH_EVALUATIONS = gate_rules.SEARCH_ITERATIONS + 2  # the ungated text, the largest scale, the bisection


@contextlib.contextmanager
def gate_perplexity(store: Store, settings: Settings, text: Path, tokens: int = CALIBRATION_TOKENS
                    ) -> Iterator[Callable[[GatePolicy], float]]:
    """A function gate → perplexity on `tokens` tokens of `text`. Perplexity does not depend on the cache
    budget, so the engine holds every expert when they fit (each pass is then fast), else the user's."""
    shape = store.cache_shape
    full = budgets.fits(shape)
    budget = budgets.all_experts(shape) if full else budgets.resolve(settings.cache.budget, shape)
    with Engine(store, settings, budget) as engine:
        ids = read_text_tokens(load_tokenizer(store), text, min_tokens=64, max_tokens=tokens)
        window = int(min(256, store.config.get("max_position_embeddings", 256)))

        def perplexity(gate: GatePolicy) -> float:
            engine.use_gate(gate)
            return evaluate(engine, ids, window).perplexity

        yield perplexity


def counted(perplexity: Callable[[GatePolicy], float], progress: Steps | None) -> Callable[[GatePolicy], float]:
    """`perplexity`, reporting each evaluation of the search as a step (at most `SEARCH_EVALUATIONS`)."""
    done = [0]

    def each(gate: GatePolicy) -> float:
        value = perplexity(gate)
        done[0] += 1
        within(progress, "searching the gate scale")(done[0], SEARCH_EVALUATIONS)
        return value

    return each


def search_scale(store: Store, settings: Settings, quality_budget: float, text: Path,
                 tokens: int = CALIBRATION_TOKENS, progress: Steps | None = None) -> gate_rules.ScaleSearch:
    """The largest gate scale (rule `settings.gate.rule`) whose perplexity on `text` stays within
    `quality_budget` (e.g. 0.01) of the ungated perplexity."""
    layers = read_profile(default_path(store), store).layers
    with gate_perplexity(store, settings, text, tokens) as perplexity:
        return gate_rules.find_scale(settings.gate.rule, layers, quality_budget, counted(perplexity, progress))
