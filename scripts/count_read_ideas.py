"""Two ways of reading fewer experts, counted before building either (docs/performance.md, "Reading less,
counted"): a prefetch for the next token, and a cache bypass on a miss.

    python scripts/count_read_ideas.py

Counts only, no timing: every number is a count of reads, so the machine's speed does not enter. Each
trace is split in two: `markov`'s routing model (runtime/eviction.py: P(expert | the layer's last call)) is
fitted on the first half and the counts are taken on the second, as a store's model is fitted on its profile
and then used on other text.

- **Prefetch for the next token.** After layer l's call, the experts `markov` rates most likely for layer l's
  next call are read into the layer's slots when one beats the expert it would evict by a margin. Such a read
  has a whole token's compute to hide behind. Counted by the runtime's own `ExpertManager` replaying the
  trace (planning/replay.py, an instant loader: the planner's counts), with these reads added after each call.
- **Bypass on a miss.** One slot of the budget is kept as a scratch buffer shared by all layers (only one
  layer computes at a time); a missed expert less likely to be needed by the layer's next call than the expert
  it would evict is read into the scratch slot, used and dropped. The other slots are split as the plan splits
  a budget one slot smaller (the embedded model), or one layer gives one up (Mixtral's even split). Counted by
  a small simulation of the rule (below), whose count without the scratch slot is printed next to the
  manager's own for `markov` without prefetch: they agree, so the simulation follows the manager's eviction.

Traces: the embedded model's profile trace (its store's plan and gate, 32 slots) and the real Mixtral-8x7B
trace shipped with adapmoe (`mixtral-8x7b-instruct-h39s`: no predictions, so no one-layer-ahead prefetch;
4 and 5 slots a layer). "Waited" reads are those read during the token that needs them: demand misses and
the one-layer-ahead prefetch's hits, which the compiled step waits for nearly always on this machine's disk
("The stall at half the experts")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adapmoe_cli.model_arg import open_model
from adapmoe_cli.planning.plan_file import default_path as plan_path
from adapmoe_cli.planning.plan_file import read_plan
from adapmoe_cli.planning.replay import Routing, prepare, replay
from adapmoe_cli.profiling.profile_file import default_path as profile_path
from adapmoe_cli.profiling.profile_file import read_profile
from adapmoe_cli.profiling.routing_model import fit_ids
from adapmoe_cli.profiling.trace import Trace
from adapmoe_cli.runtime.cache import ExpertCache
from adapmoe_cli.runtime.eviction import RoutingModel
from adapmoe_cli.runtime.gating import GatePolicy
from adapmoe_cli.runtime.loader import PREFETCH, InstantLoader
from adapmoe_cli.runtime.manager import ExpertManager
from adapmoe_cli.runtime.prefetch import PrefetchAdmission
from adapmoe_cli.simulate.shipped import shipped_trace
from adapmoe_cli.simulate.traces import read_h39s


class NextTokenPrefetch(ExpertManager):
    """The runtime's manager plus, after each call of a layer, reads for that layer's next call."""

    def __init__(self, *args, margin: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin = margin
        self.early: dict[int, set[int]] = {}  # layer → experts read for its next call
        self.early_hits = 0  # of those, needed by that call

    def run_layer(self, layer, needed, compute, tokens=0, activations=0, then_prefetch=None):
        self.early_hits += len(self.early.pop(layer, set()) & set(needed))
        super().run_layer(layer, needed, compute, tokens, activations, then_prefetch)
        policy = self.cache.policies[layer]
        p = policy.next_call_probabilities()
        quota = self.cache.quotas[layer]
        likely = np.argsort(-p, kind="stable").tolist()[:quota]
        prefetched = self._prefetched.setdefault(layer, {})
        for u in likely:
            if self.cache.slot(layer, u) is not None:
                continue
            if sum(self.cache.slot(layer, e) is not None for e in range(len(p))) >= quota:  # no free slot
                victim = policy.victim(set(likely))
                if victim is None or p[u] - p[victim] <= self.margin:
                    break
            req = self._load(layer, u, PREFETCH, keep=likely)
            if req is None:
                break
            prefetched[u] = req
            self.early.setdefault(layer, set()).add(u)
            self.stats.prefetches_issued += 1


def counted(manager: ExpertManager, routing: Routing, layer_ahead: bool) -> dict[str, float]:
    replay(routing, manager, layer_ahead)
    s, n = manager.stats, len(routing.needed)
    early = getattr(manager, "early_hits", 0)
    manager.close()
    return {"misses": s.misses / n, "waited": (s.misses + s.prefetch_hits - early) / n,
            "reads": (s.misses + s.prefetches_issued) / n}


def bypass_reads(routing: Routing, model: RoutingModel, quotas: dict[int, int], bypass: bool) -> float:
    """Reads a token with `markov`'s rule (evict the resident expert least likely to be needed by the layer's
    next call, never one the call needs) and, with `bypass`, one scratch slot per call for a miss less likely
    to be needed next than that victim."""
    reads = 0
    for i, layer in enumerate(routing.layers):
        quota, transition, cache = quotas[layer], model.transition[i], []
        for row in routing.needed:
            need = row[i]
            p = transition[list(need)].mean(0) if need else model.popularity[i]
            scratch_free = bypass
            for e in need:
                if e in cache:
                    continue
                reads += 1
                if len(cache) < quota:
                    cache.append(e)
                    continue
                others = [c for c in cache if c not in need]
                victim = min(others, key=lambda c: p[c]) if others else None
                if scratch_free and (victim is None or p[e] < p[victim]):
                    scratch_free = False
                    continue
                cache.remove(victim if victim is not None else cache[0])
                cache.append(e)
    return reads / len(routing.needed)


def halves(trace: Trace) -> tuple[Trace, Trace]:
    n, t = trace.num_tokens, trace.tensors()
    cut = n // 2

    def part(a: int, b: int) -> Trace:
        return Trace.from_tensors({k: v[a:b] if v.dim() and v.shape[0] == n else v for k, v in t.items()})
    return part(0, cut), part(cut, n)


def report(name: str, routing: Routing, model: RoutingModel, quotas: dict[int, int], scratch_quotas: dict[int, int],
           layer_ahead: bool, admission: float) -> None:
    """`scratch_quotas`: the slots a layer with one slot of the budget kept as the scratch slot."""
    def manager(cls=ExpertManager, **kw) -> ExpertManager:
        return cls(ExpertCache(quotas, stride=0, policy="markov", routing=model), InstantLoader(0),
                   admission=PrefetchAdmission(admission), **kw)

    print(f"\n{name}: {len(routing.needed)} tokens counted, {sum(quotas.values())} slots {quotas}")
    print(f"  {'a token':58s} misses  waited  reads")
    rows = []
    if layer_ahead:
        rows.append(("markov, one-layer-ahead prefetch (adapmoe)", counted(manager(), routing, True)))
    rows.append(("markov, no prefetch", counted(manager(), routing, False)))
    for margin in (0.05, 0.15, 0.3):
        rows.append((f"+ prefetch for the next token, margin {margin}",
                     counted(manager(NextTokenPrefetch, margin=margin), routing, layer_ahead)))
    for label, c in rows:
        print(f"  {label:58s} {c['misses']:6.3f}  {c['waited']:6.3f}  {c['reads']:6.3f}")
    plain = bypass_reads(routing, model, quotas, bypass=False)
    scratch = bypass_reads(routing, model, scratch_quotas, bypass=True)
    print(f"  {'the simulation of markov, no prefetch (as the manager)':58s} {plain:6.3f}  {plain:6.3f}  {plain:6.3f}")
    print(f"  {'one slot a scratch slot, bypass on a miss, no prefetch':58s} {scratch:6.3f}  {scratch:6.3f}  "
          f"{scratch:6.3f}  ({scratch / plain:.2f} × markov's reads)")


def main() -> None:
    store = open_model(None)
    plan = read_plan(plan_path(store), store)
    fit_on, measure_on = halves(read_profile(profile_path(store), store).trace())
    model = fit_ids(fit_on.ids, fit_on.layers, store.shape.num_experts, "the profile's first half")
    report("embedded model (its plan, gate and admission)", prepare(measure_on, plan.gate), model, plan.quotas,
           plan.quotas_for(plan.budget_slots - 1), layer_ahead=True,
           admission=float(plan.data.get("prefetch_precision", 0.85)))

    sim = read_h39s(Path(shipped_trace("mixtral-8x7b-instruct-h39s")), prefill=False)
    fit_on, measure_on = halves(sim.trace)
    model = fit_ids(fit_on.ids, fit_on.layers, sim.num_experts, "the trace's first half")
    routing = prepare(measure_on, GatePolicy())  # ungated: the trace holds the experts used
    for per in (4, 5):
        quotas = {layer: per for layer in routing.layers}
        report(f"Mixtral-8x7B trace, {per} slots a layer", routing, model, quotas, {**quotas, 0: per - 1},
               layer_ahead=False, admission=0.85)


if __name__ == "__main__":
    main()
