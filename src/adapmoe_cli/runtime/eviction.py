"""Eviction policies: pure objects over expert ids of one layer, with no tensors, threads or clocks, so
the runtime's cache, the planner and the trace simulator run the very same code.

A policy is told when an expert becomes resident (`insert`), is used (`touch`) or leaves (`remove`), what
each call of its layer needs before that call loads anything (`observe`), and asked which resident expert
to give up (`victim`), never one in `keep`.

Beyond LRU and LFU (docs/cache.md): `lrfu` (frequency with exponential decay, a mix of both), `markov`
(the expert least likely to be needed by the layer's next call, from the routing statistics of the
store's profile: P(e | the experts of the last call)) and `learned` (a logistic score over a few counted
features — that probability, popularity, recency, decayed frequency, the last two calls — whose weights
are fitted on the profile's trace). The last two take a `RoutingModel` (profiling/routing_model.py makes
it); none touches a tensor."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class EvictionPolicy:
    name = "base"
    #: False: the layer forgets its experts after each call (no cache across tokens)
    retains = True

    def observe(self, needed: Sequence[int]) -> None:
        """A call of the layer needs these experts (told before it loads any of them)."""

    def insert(self, expert: int) -> None:
        raise NotImplementedError

    def touch(self, expert: int) -> None:
        raise NotImplementedError

    def remove(self, expert: int) -> None:
        raise NotImplementedError

    def victim(self, keep: Collection[int] = ()) -> int | None:
        """The resident expert to evict, skipping `keep`; None when every resident one is kept."""
        raise NotImplementedError

    def residents(self) -> Iterable[int]:
        raise NotImplementedError


class LRU(EvictionPolicy):
    """Least recently used first (mixtral-offloading's per-layer policy)."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def insert(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def touch(self, expert: int) -> None:
        if expert in self._order:
            self._order.move_to_end(expert)

    def remove(self, expert: int) -> None:
        self._order.pop(expert, None)

    def victim(self, keep: Collection[int] = ()) -> int | None:
        return next((e for e in self._order if e not in keep), None)

    def residents(self) -> Iterable[int]:
        return list(self._order)


class LFU(EvictionPolicy):
    """Least frequently used first (counts survive eviction, so popular experts win back their slot);
    ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._lru = LRU()

    def insert(self, expert: int) -> None:
        self._lru.insert(expert)

    def touch(self, expert: int) -> None:
        self._count[expert] = self._count.get(expert, 0) + 1
        self._lru.touch(expert)

    def remove(self, expert: int) -> None:
        self._lru.remove(expert)

    def victim(self, keep: Collection[int] = ()) -> int | None:
        count = self._count.get
        order = [e for e in self._lru.residents() if e not in keep]  # oldest first: min keeps the first of equals
        return min(order, key=lambda e: count(e, 0)) if order else None

    def residents(self) -> Iterable[int]:
        return self._lru.residents()


class NoCache(LRU):
    """Keep nothing between layer calls: every needed expert is loaded on demand (the naive baseline)."""

    name = "none"
    retains = False


#: the decay per layer call of `lrfu`'s frequencies (and of the `learned` score's frequency feature)
DECAY = 0.9
#: the learned score's features, in the order of `RoutingModel.weights` (a bias weight comes last)
FEATURES = ("next_call_probability", "popularity", "recency", "decayed_frequency", "in_last_call",
            "in_call_before")


@dataclass(frozen=True, eq=False)
class RoutingModel:
    """What `markov` and `learned` predict from, per MoE layer (index i of `layers`): `transition[i, a, e]`
    = P(e needed at the next call | a needed at this one), `popularity[i, e]` = e's uses per call (numpy
    arrays, read only), and the learned score's `weights` (one per FEATURES, then a bias). Fitted on a
    routing trace (profiling/routing_model.py); `source` says which."""

    layers: tuple[int, ...]
    num_experts: int
    transition: Any  # numpy float64 [layers, experts, experts]
    popularity: Any  # numpy float64 [layers, experts]
    weights: tuple[float, ...]
    source: str = ""

    def index(self, layer: int) -> int:
        return self.layers.index(layer)


class _Tracked(EvictionPolicy):
    """Residents in LRU order plus what the layer's calls showed: the last two calls' experts and each
    expert's decayed call count. Victim: the lowest `score`, the least recently used first among
    equals; scores hold for the whole call (nothing they depend on changes until the next `observe`), so
    each is computed once per call however many evictions the call makes."""

    def __init__(self) -> None:
        self._lru = LRU()
        self.calls = 0
        self.last: tuple[int, ...] = ()
        self.before: tuple[int, ...] = ()
        self._freq: dict[int, tuple[float, int]] = {}  # expert → (decayed count, as of that call)
        self._memo: dict[int, float] = {}

    def observe(self, needed: Sequence[int]) -> None:
        self.calls += 1
        self.before, self.last = self.last, tuple(needed)
        for e in self.last:
            self._freq[e] = (self.frequency(e) + 1.0, self.calls)
        self._memo = {}

    def frequency(self, expert: int) -> float:
        """Uses of `expert`, each weighted DECAY^(calls since)."""
        count, at = self._freq.get(expert, (0.0, 0))
        return count * DECAY ** (self.calls - at) if count else 0.0

    def insert(self, expert: int) -> None:
        self._lru.insert(expert)

    def touch(self, expert: int) -> None:
        self._lru.touch(expert)

    def remove(self, expert: int) -> None:
        self._lru.remove(expert)

    def residents(self) -> Iterable[int]:
        return self._lru.residents()

    def score(self, expert: int) -> float:
        raise NotImplementedError

    def victim(self, keep: Collection[int] = ()) -> int | None:
        best, low, memo = None, math.inf, self._memo
        for e in self._lru.residents():  # oldest first: strict < keeps the oldest among equals
            if e not in keep:
                s = memo.get(e)
                if s is None:
                    s = memo[e] = self.score(e)
                if s < low:
                    best, low = e, s
        return best


class LRFU(_Tracked):
    """Lowest decayed frequency first: each use counts DECAY^(layer calls since), so frequency and recency
    both weigh (LRFU, Lee et al. 2001)."""

    name = "lrfu"

    def score(self, expert: int) -> float:
        return self.frequency(expert)


class Markov(_Tracked):
    """Least likely to be needed by the layer's next call first: the mean of P(e | a) over the experts a
    of the last call (the profile's transition statistics); before any call, the expert's popularity.
    Up to 32 experts a candidate's sum is computed on its own; above, one vector per call that evicts."""

    name = "markov"

    def __init__(self, model: RoutingModel, layer: int) -> None:
        import numpy as np

        i = model.index(layer)
        super().__init__()
        self._np = np
        self._transition = model.transition[i]
        self._popularity = model.popularity[i]
        # few experts: a candidate's sum over the last call (Python floats) is cheaper than one vector a call
        self._per_candidate = model.num_experts <= 32
        self._rows = self._transition.tolist() if self._per_candidate else None
        self._next: list[float] | None = None

    def observe(self, needed: Sequence[int]) -> None:
        super().observe(needed)
        self._next = None

    def next_call_probabilities(self):  # -> numpy array [experts]
        if not self.last:
            return self._popularity
        return self._transition[list(self.last)].mean(0)

    def next_call_probability(self, expert: int) -> float:
        if self._per_candidate and self.last:
            rows = self._rows
            return sum(rows[a][expert] for a in self.last) / len(self.last)
        if self._next is None:
            self._next = self.next_call_probabilities().tolist()
        return self._next[expert]

    def score(self, expert: int) -> float:
        return self.next_call_probability(expert)


class Learned(Markov):
    """Lowest learned score first: features (FEATURES) · weights + bias, the weights fitted on the profile's
    trace to predict whether an expert is needed at the layer's next call. `feature_matrix` gives every
    expert's features at once (what the fit uses); `score` computes one candidate's from the same state."""

    name = "learned"

    def __init__(self, model: RoutingModel, layer: int) -> None:
        super().__init__(model, layer)
        w = model.weights
        self._w = w
        # the parts of the score that never change: popularity's term and the bias
        self._base = (self._popularity * w[1] + w[-1]).tolist()
        self._last_use: dict[int, int] = {}  # expert → the call it was last needed in

    def observe(self, needed: Sequence[int]) -> None:
        super().observe(needed)
        for e in self.last:
            self._last_use[e] = self.calls

    def recency(self, expert: int) -> float:
        """1 / (1 + calls since `expert` was last needed); 0 when never."""
        last = self._last_use.get(expert)
        return 0.0 if last is None else 1.0 / (1 + self.calls - last)

    def score(self, expert: int) -> float:
        w = self._w
        return (self._base[expert] + w[0] * self.next_call_probability(expert) + w[2] * self.recency(expert)
                + w[3] * (1 - DECAY) * self.frequency(expert) + (w[4] if expert in self.last else 0.0)
                + (w[5] if expert in self.before else 0.0))

    def feature_matrix(self):  # -> numpy array [experts, FEATURES]
        np = self._np
        n = len(self._popularity)
        m = np.zeros((n, len(FEATURES)))
        m[:, 0] = self.next_call_probabilities()
        m[:, 1] = self._popularity
        for e in self._last_use:
            m[e, 2], m[e, 3] = self.recency(e), (1 - DECAY) * self.frequency(e)
        m[list(self.last), 4] = 1.0
        m[list(self.before), 5] = 1.0
        return m


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU, "lrfu": LRFU, "markov": Markov,
                                             "learned": Learned, "none": NoCache}
#: the policies that predict from the store's routing statistics (a `RoutingModel`)
NEEDS_ROUTING = frozenset(n for n, c in POLICIES.items() if issubclass(c, Markov))


def check_name(name: str) -> str:
    from adapmoe_cli.errors import UsageError

    if name not in POLICIES:
        raise UsageError(f"unknown eviction policy {name!r}: choose one of auto, {', '.join(POLICIES)}")
    return name


def make_policy(name: str, layer: int = 0, routing: RoutingModel | None = None) -> EvictionPolicy:
    """A fresh policy for one layer; `markov`/`learned` need the `routing` model fitted for this store."""
    cls = POLICIES[check_name(name)]
    if name in NEEDS_ROUTING:
        if routing is None:
            from adapmoe_cli.errors import UsageError

            raise UsageError(f"eviction policy {name!r} predicts from the store's routing profile, and none was given")
        return cls(routing, layer)
    return cls()
