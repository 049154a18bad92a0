"""The named offloading policies, each a configuration of the one runtime: how many slots and how they are
split over the layers, which eviction policy, what is prefetched, whether the adaptive gate routes and
whether the cache starts full. `bench` runs them on the real runtime and `simulate` on a simulated clock;
both read this registry, and `policy_budget` is the one function from a policy to slots per layer. The
limits (`belady`, `oracle`) know the future, so only the simulator runs them. No tensors, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
    prefetch: str = "none"  # none | predicted (the next layer's router on this layer's input) | oracle
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


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("naive", "no cache across tokens: every needed expert is loaded on demand", slots="topk",
           eviction="none"),
    Policy("lru", "per-layer LRU, even split, no prefetch"),
    Policy("lru+prefetch", "mixtral-offloading: per-layer LRU, even split, next-layer prefetch of the top-k",
           prefetch="predicted"),
    Policy("lfu", "per-layer LFU, even split, no prefetch", eviction="lfu"),
    Policy("planned", "LRU with the DP slot plan and prefetch, no adaptive gate", split="plan", prefetch="predicted"),
    Policy("adapmoe", "adaptive gate at the quality budget, gate-aware prefetch, DP slot plan", split="plan",
           prefetch="predicted", gate=True),
    Policy("resident", "every expert in memory (upper bound)", slots="all", preload=True),
    Policy("lru+prefetch+fallback", "HOBBIT's idea on lru+prefetch: a resident low-bit copy of every expert "
           "(--fallback-format, out of the budget) computes a missed expert while the full one loads",
           prefetch="predicted", fallback=True),
    Policy("adapmoe+fallback", "adapmoe with the same resident low-bit copy for misses", split="plan",
           prefetch="predicted", gate=True, fallback=True),
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


def parse_policies(text: str, limits: bool = False, peers: bool = False) -> list[str]:
    """Comma-separated names. `limits`: the simulator's, which may name the limits and always adds them;
    `peers`: the bench's, which may name other programs (`PEERS`)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    # the simulator runs the limits and not the fallback (it does not model the copy's compute)
    runs = (lambda p: p.is_limit or not p.fallback) if limits else (lambda p: not p.is_limit)
    known = [n for n, p in POLICIES.items() if runs(p)] + (list(PEERS) if peers else [])
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"unknown policy {unknown[0] if unknown else '(none)'}; known: {', '.join(known)}")
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

