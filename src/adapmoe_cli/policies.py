"""The named offloading policies, each a configuration of the one runtime: how many slots and how they are
split over the layers, which eviction policy, what is prefetched, whether the adaptive gate routes and
whether the cache starts full. `bench` runs them on the real runtime and `simulate` on a simulated clock;
both read this registry, and `policy_budget` is the one function from a policy to slots per layer. The
limits (`belady`, `oracle`) know the future, so only the simulator runs them. `NAME:EVICTION` names a row
with another eviction policy of runtime/eviction.py (`adapmoe:markov`). No tensors, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from adapmoe_cli import budget as budgets
from adapmoe_cli.budget import Budget, CacheShape
from adapmoe_cli.errors import UsageError


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    slots: str = "budget"  # budget | topk (top-k per layer) | all
    split: str = "even"  # even | plan (the DP cache plan for the budget)
    eviction: str = "lru"  # a policy of runtime/eviction.py, or belady (the simulator's limit)
    #: none | predicted (the next layer's router on this layer's input: every prediction, mixtral-offloading's
    #: rule) | admitted (the predictions that have proven right often enough, runtime/prefetch.py) | oracle
    prefetch: str = "none"
    gate: bool = False  # route with the adaptive gate
    preload: bool = False  # every expert loaded before the first token
    fallback: bool = False  # a resident low-bit copy of every expert computes misses (the runtime only)

    @property
    def is_limit(self) -> bool:
        """Knows the future: the simulator can run it, the runtime cannot."""
        return self.eviction == "belady" or self.prefetch == "oracle"

    @property
    def prefetches(self) -> bool:
        return self.prefetch != "none"

    def prefetch_precision(self, admitted: float) -> float:
        """The admission's precision this row runs with (runtime/prefetch.py): `admitted` (the settings') for
        an admitted prefetch, 0 — every prediction — otherwise."""
        return admitted if self.prefetch == "admitted" else 0.0


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("naive", "no cache across tokens: every needed expert is loaded on demand", slots="topk",
           eviction="none"),
    Policy("lru", "per-layer LRU, even split, no prefetch"),
    Policy("lru+prefetch", "mixtral-offloading: per-layer LRU, even split, next-layer prefetch of the top-k",
           prefetch="predicted"),
    Policy("lfu", "per-layer LFU, even split, no prefetch", eviction="lfu"),
    Policy("lrfu", "per-layer LRFU (frequency decayed per call), even split, no prefetch", eviction="lrfu"),
    Policy("markov", "evict the expert least likely needed next (the profile's transition statistics), even "
           "split, no prefetch", eviction="markov"),
    Policy("learned", "evict the lowest learned score (weights fitted on the profile's trace), even split, no "
           "prefetch", eviction="learned"),
    Policy("planned", "LRU with the DP slot plan and admitted prefetch, no adaptive gate", split="plan",
           prefetch="admitted"),
    Policy("adapmoe", "adaptive gate at the quality budget, gate-aware admitted prefetch, DP slot plan, markov "
           "eviction", split="plan", prefetch="admitted", gate=True, eviction="markov"),
    Policy("resident", "every expert in memory (upper bound)", slots="all", preload=True),
    Policy("lru+prefetch+fallback", "HOBBIT's idea on lru+prefetch: a resident low-bit copy of every expert "
           "(--fallback-format, out of the budget) computes a missed expert while the full one loads",
           prefetch="predicted", fallback=True),
    Policy("adapmoe+fallback", "adapmoe with the same resident low-bit copy for misses", split="plan",
           prefetch="admitted", gate=True, fallback=True, eviction="markov"),
    Policy("belady", "limit: Belady's optimal eviction (knows the future), even split, no prefetch",
           eviction="belady"),
    Policy("oracle", "limit: LRU, even split, prefetch of exactly the next layer's experts", prefetch="oracle"),
)}
LIMITS = tuple(n for n, p in POLICIES.items() if p.is_limit)
#: other programs `bench` runs on the same model, prompts and memory cap (peers/): not configurations of
#: our runtime, so the simulator does not know them
PEERS: dict[str, str] = {
    "llama.cpp": "llama.cpp's llama-completion, weights memory-mapped from a GGUF of the same model and width, "
                 "under the same memory cap as the policies (when one is given)",
    "llama.cpp-uncapped": "the same, never capped: its ceiling",
}
BENCH_DEFAULT = ("naive", "lru", "lru+prefetch", "adapmoe", "resident")
SIMULATE_DEFAULT = ("naive", "lru", "lru+prefetch", "planned", "adapmoe", "resident")


#: `ROW:OPTION` options that change what a row prefetches (the others name an eviction policy)
PREFETCH_OPTIONS = {"no-prefetch": "none", "prefetch-all": "predicted", "prefetch-admitted": "admitted"}


def get(name: str) -> Policy:
    """A registry row, or `ROW:OPTION[:OPTION]` — that row with another eviction policy (`adapmoe:lru`) or
    another prefetch (`PREFETCH_OPTIONS`: `adapmoe:no-prefetch`, `lru:prefetch-admitted`); UsageError names
    the lists."""
    from adapmoe_cli.runtime.eviction import POLICIES as EVICTIONS

    row, *options = name.split(":")
    if row not in POLICIES:
        raise UsageError(f"unknown policy {row!r}; known: {', '.join(POLICIES)}")
    policy = POLICIES[row]
    for option in options:
        if option in PREFETCH_OPTIONS:
            if policy.is_limit or policy.slots == "all" or policy.eviction == "none":
                raise UsageError(f"cannot run {row!r} with {option!r}: give ROW:{option} with a row that caches "
                                 "within a budget")
            mode = PREFETCH_OPTIONS[option]
            policy = replace(policy, prefetch=mode, description=f"{policy.description}; prefetch: {mode}")
            continue
        if (option not in EVICTIONS or option == "none" or policy.eviction in ("none", "belady")
                or policy.slots == "all"):
            choices = ", ".join(e for e in EVICTIONS if e != "none")
            raise UsageError(f"cannot run {row!r} with eviction {option!r}: give ROW:EVICTION with a row that caches "
                             f"within a budget and one of {choices}, or ROW:{'|'.join(PREFETCH_OPTIONS)}")
        policy = replace(policy, eviction=option,
                         description=f"{policy.description}; {option} eviction instead of {policy.eviction}")
    return replace(policy, name=name)


def is_policy(name: str) -> bool:
    try:
        get(name)
    except UsageError:
        return False
    return True


def parse_policies(text: str, limits: bool = False, peers: bool = False) -> list[str]:
    """Comma-separated names. `limits`: the simulator's, which may name the limits and always adds them;
    `peers`: the bench's, which may name other programs (`PEERS`)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    # the simulator runs the limits and not the fallback (it does not model the copy's compute)
    runs = (lambda p: p.is_limit or not p.fallback) if limits else (lambda p: not p.is_limit)
    known = [n for n, p in POLICIES.items() if runs(p)] + (list(PEERS) if peers else [])
    for n in names:
        if ":" in n and n.partition(":")[0] in known:
            get(n)  # says what is wrong with the eviction part
    unknown = [n for n in names if n not in known and not (":" in n and n.partition(":")[0] in known)]
    if unknown or not names:
        raise UsageError(f"unknown policy {unknown[0] if unknown else '(none)'}; known: {', '.join(known)} "
                         "(ROW:EVICTION runs a row with another eviction policy)")
    return names + [n for n in LIMITS if n not in names] if limits else names


def policy_budget(policy: Policy, shape: CacheShape, total: int,
                  plan: Callable[[bool], Mapping[int, int]]) -> Budget:
    """Slots per layer of `policy` at a budget of `total` slots; `plan(gated)` gives the DP plan's slots for
    the routing with (or without) the adaptive gate, asked only by the policies that split by plan."""
    if policy.slots == "all":
        return budgets.all_experts(shape)
    if policy.slots == "topk":
        return budgets.per_layer(shape, shape.top_k, "top-k per layer")
    if policy.split == "plan":
        return budgets.planned(shape, plan(policy.gate), "DP plan")
    return budgets.even(shape, total)

