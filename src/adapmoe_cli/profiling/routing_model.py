"""Fits the `RoutingModel` the predicting eviction policies (`markov`, `learned`; runtime/eviction.py) use,
from a routing trace: per layer, how often expert e is needed at the call after one that needed a
(smoothed by e's popularity), and the learned score's weights — a logistic regression of "needed at the
next call" on the policy's own features, computed by the policy's own code over the trace's calls, so
what is fitted is what the runtime scores. A store's model is fitted on its profile's trace (the
calibration text), never on what it is then measured on; `for_store` caches it per profile file."""

from __future__ import annotations

import numpy as np
import torch

from adapmoe_cli.errors import ProfileError
from adapmoe_cli.planning.replay import Routing
from adapmoe_cli.runtime.eviction import FEATURES, NEEDS_ROUTING, Learned, RoutingModel, check_name

#: pseudo-count of the popularity prior in each transition row
SMOOTHING = 1.0
#: calls per layer the learned weights are fitted on (the trace's first), and at most this many
#: (call, expert) examples in all, to keep fitting under a second and a few MiB whatever the model
MAX_FIT_CALLS = 2048
MAX_EXAMPLES = 1 << 16


def fit(routing: Routing, num_experts: int, source: str) -> RoutingModel:
    """The routing model of `routing`'s steps (each step one call per layer)."""
    width = max((len(c) for row in routing.needed for c in row), default=1) or 1
    ids = torch.full((len(routing.needed), len(routing.layers), width), -1, dtype=torch.int32)
    for t, row in enumerate(routing.needed):
        for i, experts in enumerate(row):
            ids[t, i, : len(experts)] = torch.tensor(experts, dtype=torch.int32)
    return fit_ids(ids, routing.layers, num_experts, source)


def fit_ids(ids: torch.Tensor, layers: list[int], num_experts: int, source: str) -> RoutingModel:
    """The routing model of calls given as expert ids [calls, layers, k] (-1: none), one call per row: the
    transition counts by bincount over each layer's (this call, next call) pairs, so memory stays that of
    the ids whatever the number of experts."""
    steps, E = ids.shape[0], num_experts
    if steps < 2:
        raise ProfileError(f"{source} holds {steps} call(s): the eviction policies need at least two to learn from")
    transition = np.empty((len(layers), E, E))
    popularity = np.empty((len(layers), E))
    for i in range(len(layers)):
        col = ids[:, i, :].long()
        pop = torch.bincount(col[col >= 0], minlength=E).double() / steps  # uses per call
        cur, nxt = col[:-1, :, None], col[1:, None, :]
        valid = (cur >= 0) & (nxt >= 0)
        pairs = torch.bincount((cur * E + nxt)[valid], minlength=E * E).double().view(E, E)
        seen = torch.bincount(col[:-1][col[:-1] >= 0], minlength=E).double()
        transition[i] = ((pairs + SMOOTHING * pop[None, :]) / (seen[:, None] + SMOOTHING)).numpy()
        popularity[i] = pop.numpy()
    unfitted = (0.0,) * (len(FEATURES) + 1)
    model = RoutingModel(tuple(layers), E, transition, popularity, unfitted, source)
    x, y = _examples(ids[: MAX_FIT_CALLS + 1], model)
    return RoutingModel(model.layers, E, transition, popularity, _logistic(x, y), source)


def _examples(ids: torch.Tensor, model: RoutingModel) -> tuple[np.ndarray, np.ndarray]:
    """Every expert's features after a call (the policy's own `feature_matrix`), labelled by whether the
    layer's next call needs it: over the calls of `ids` (the trace's first MAX_FIT_CALLS + 1), every
    `stride`-th call recorded so that the examples stay within MAX_EXAMPLES rows (one array, preallocated)."""
    calls = [[[e for e in c if e >= 0] for c in row] for row in ids.tolist()]
    n, E, L = len(calls) - 1, model.num_experts, len(model.layers)
    stride = -(-n * E * L // MAX_EXAMPLES)
    kept = range(0, n, stride)
    x = np.empty((L * len(kept) * E, len(FEATURES)))
    y = np.zeros(len(x))
    at = 0
    for i, layer in enumerate(model.layers):
        policy = Learned(model, layer)
        for t in range(n):
            policy.observe(calls[t][i])
            if t % stride == 0:
                x[at: at + E] = policy.feature_matrix()
                y[[at + e for e in calls[t + 1][i]]] = 1.0
                at += E
    return x, y


def _logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-4, steps: int = 50) -> tuple[float, ...]:
    """Weights (one per feature, then a bias) of an L2-regularised logistic regression, by Newton's method
    (seven parameters: a 7×7 solve a step, no autograd, memory of a few columns)."""
    xb = np.concatenate([x, np.ones((len(x), 1))], 1)
    w = np.zeros(xb.shape[1])
    penalty = np.full(len(w), ridge)
    penalty[-1] = 0.0  # the bias is not shrunk
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30.0, 30.0)))  # a trace where every expert is always
        # needed (top-k = all) has labels of one kind: the bias grows, the probabilities stay finite
        grad = xb.T @ (p - y) / len(y) + penalty * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / len(y) + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return tuple(float(v) for v in w)


#: what `auto` means: the predicting policy when the store has a profile to predict from, else LRU
AUTO_WITH_PROFILE, AUTO_WITHOUT = "markov", "lru"


def eviction_for(store, policy: str) -> tuple[str, RoutingModel | None]:
    """The eviction policy a store runs with and what it predicts from when it predicts (`markov`,
    `learned`: the store's profile). `auto`: markov when the store has a usable profile, else lru (the
    chat command `/show` says which); asking for markov/learned without one is an error naming the
    command that makes it."""
    from adapmoe_cli.profiling.profile_file import default_path

    if policy == "auto":
        if not default_path(store).exists():
            return AUTO_WITHOUT, None
        try:
            return AUTO_WITH_PROFILE, for_store(store)
        except ProfileError:  # unreadable or another model's: the plan and gate say so where they read it
            return AUTO_WITHOUT, None
    return policy, (for_store(store) if check_name(policy) in NEEDS_ROUTING else None)


def for_store(store) -> RoutingModel:
    """The model fitted on the store's profile trace (ProfileError naming the command when it has none, or
    when the profile is another model's); fitted once per profile file and process."""
    from adapmoe_cli.profiling.profile_file import default_path, read_profile

    path = default_path(store)
    if not path.exists():
        raise ProfileError(f"the eviction policies markov and learned predict from the store's routing profile, and "
                           f"{store.path} has none: run `adapmoe profile {store.path}` first")
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _FITTED:
        trace = read_profile(path, store).trace()  # one row per calibration token: one call per layer
        _FITTED.clear()
        _FITTED[key] = fit_ids(trace.ids, trace.layers, store.shape.num_experts,
                               f"the profile {path} ({trace.num_tokens} tokens)")
    return _FITTED[key]


_FITTED: dict[tuple[str, int], RoutingModel] = {}
