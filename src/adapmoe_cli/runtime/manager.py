"""Brings the experts a layer needs into the cache and keeps the books. Called by the MoE blocks on the
compute thread; owns the cache (slots, policies) and talks to the loader (reads). Counts hits, prefetch
hits, misses, wasted and dropped prefetches and stall time in `Stats` as they happen.

Per layer call (one forward of one MoE layer):
1. settle loads that finished since the last call, tell the layer's eviction policy and the prefetch
   admission what the call needs (`observe`, `outcome`), account this layer's prefetches;
2. queue demand loads for every missing needed expert that can get a slot without evicting a needed one
   (mispredicted prefetches stay cached; their reads, if still queued, move behind everything else); then
   the next layer's prefetches (`then_prefetch`), so none is read ahead of this layer's demand loads, and
   only those the admission (runtime/prefetch.py) lets through;
3. when every needed expert has a slot: count and touch them in ascending order, then compute those
   already in memory first and the others as their reads finish (compute overlaps the loads; the books
   do not depend on timing); else, for each in ascending order, wait until it is resident (loading it
   now if step 2 could not) and compute. Then release them for eviction.
With a `fallback` (a resident low-bit copy of every expert, HOBBIT's idea), a miss does not wait: it is
computed at once from the copy while its read goes on, so the next use finds it resident. Only demand
misses take the copy — a prefetched expert still being read is waited for — so which experts use it
depends on the routing alone, never on I/O timing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from adapmoe_cli.runtime.cache import ExpertCache
from adapmoe_cli.runtime.loader import DEMAND, PREFETCH, ExpertLoader, LoadRequest
from adapmoe_cli.runtime.prefetch import PrefetchAdmission
from adapmoe_cli.runtime.stats import Stats

ORIGIN_RESIDENT, ORIGIN_PREFETCH, ORIGIN_DEMAND = "resident", "prefetch", "demand"


class ExpertManager:
    def __init__(self, cache: ExpertCache, loader: ExpertLoader, stats: Stats | None = None,
                 admission: PrefetchAdmission | None = None):
        """`admission`: which predicted experts are prefetched (runtime/prefetch.py); None: every one."""
        self.cache = cache
        self.admission = admission
        self.loader = loader
        self.stats = stats or Stats()
        self._pending: dict[tuple[int, int], LoadRequest] = {}
        self._prefetched: dict[int, dict[int, LoadRequest]] = {}  # layer → expert → request
        self._abandoned: list[LoadRequest] = []  # useless prefetches whose read had already started
        #: observers of each layer call: (layer, needed experts); the profiler and tests record traces
        self.on_layer: list[Callable[[int, list[int]], None]] = []
        #: (layer, expert) → the weights a missed expert is computed with while it loads, or None: wait
        self.fallback: Callable[[int, int], Any] | None = None

    # -- loads -------------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Mark finished reads resident (only the compute thread changes cache state)."""
        for key, req in list(self._pending.items()):
            if req.done.is_set():
                self._finish(key, req)
        for req in [r for r in self._abandoned if r.done.is_set()]:
            self._abandoned.remove(req)
            if req.error is None:
                self.stats.loads += 1
                self.stats.bytes_read += req.nbytes

    def _finish(self, key: tuple[int, int], req: LoadRequest) -> None:
        del self._pending[key]
        if req.error is not None:
            self.cache.release(*key)
            raise req.error
        self.cache.mark_ready(*key)
        self.stats.loads += 1
        self.stats.bytes_read += req.nbytes

    def _load(self, layer: int, expert: int, priority: int, keep: Iterable[int]) -> LoadRequest | None:
        got = self.cache.reserve(layer, expert, keep=set(keep))
        if got is None:
            return None
        slot, evicted = got
        if evicted is not None and (layer, evicted) in self._pending:
            # evicted before its read finished: forget it; a started read completes before the next
            # read into the same buffer (one I/O worker, one read at a time)
            old = self._pending.pop((layer, evicted))
            if self.loader.cancel(old):
                self.stats.prefetches_dropped += 1
            else:
                self._abandoned.append(old)
        req = self.loader.submit(layer, expert, self.cache.buffers[slot], priority)
        self._pending[(layer, expert)] = req
        return req

    def _wait(self, layer: int, expert: int) -> None:
        req = self._pending.get((layer, expert))
        if req is None:
            return
        self.loader.promote(req)
        self.stats.stall_s += self.loader.wait(req)
        self._finish((layer, expert), req)

    # -- prefetch ----------------------------------------------------------------------------------
    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Start loading predicted experts of `layer` (`experts` in the prediction's rank order) that have no
        slot and that the admission lets through, without evicting each other."""
        ranked = list(dict.fromkeys(experts))
        candidates = [(r, e) for r, e in enumerate(ranked) if self.cache.slot(layer, e) is None]
        chosen = self.admission.choose(layer, candidates) if self.admission else [e for _, e in candidates]
        mine = self._prefetched.setdefault(layer, {})
        for e in chosen:
            req = self._load(layer, e, PREFETCH, keep=ranked)
            if req is None:
                break
            mine[e] = req
            self.stats.prefetches_issued += 1

    # -- one layer ---------------------------------------------------------------------------------
    def run_layer(self, layer: int, needed: list[int], compute: Callable[[int, Any], None], tokens: int = 0,
                  activations: int = 0, then_prefetch: tuple[int, list[int]] | None = None) -> None:
        """Make each expert in `needed` (ascending) resident in turn and call `compute(expert, views)`.
        `tokens` went through the layer and `activations` (token, expert) pairs are computed (counted).
        `then_prefetch`: (next layer, its predicted experts in rank order), prefetched once this layer's
        demand loads are queued, so a prefetch read never starts ahead of them."""
        self.stats.layer_tokens += tokens
        self.stats.expert_activations += activations
        self._settle()
        self.cache.policies[layer].observe(needed)
        if self.admission is not None:
            self.admission.outcome(layer, needed)
        for fn in self.on_layer:
            fn(layer, needed)
        prefetched = self._prefetched.pop(layer, {})
        need = set(needed)
        for e, req in prefetched.items():
            if e not in need:
                # mispredicted: the expert stays cached; its read, if still queued, goes to the back
                self.stats.wasted_prefetches += 1
                self.loader.demote(req)
        origin: dict[int, str] = {}
        for e in needed:
            if e in prefetched and self.cache.slot(layer, e) is not None:
                origin[e] = ORIGIN_PREFETCH
            elif self.cache.slot(layer, e) is not None:
                origin[e] = ORIGIN_RESIDENT
            else:
                origin[e] = ORIGIN_DEMAND
                self._load(layer, e, DEMAND, keep=need)
        if then_prefetch is not None:
            self.prefetch(*then_prefetch)
        if all(self.cache.slot(layer, e) is not None for e in needed):
            self._run_resident_first(layer, needed, origin, compute)
        else:
            self._run_in_order(layer, needed, origin, compute)
        if not self.cache.policies[layer].retains:
            for e in self.cache.resident(layer):
                self.cache.release(layer, e)

    _COUNT = {ORIGIN_RESIDENT: "_hit", ORIGIN_PREFETCH: "_pf_hit", ORIGIN_DEMAND: "_miss"}

    def _run_resident_first(self, layer: int, needed: list[int], origin: dict[int, str],
                            compute: Callable[[int, Any], None]) -> None:
        """Every needed expert has a slot (resident or being read): the books are kept in ascending order,
        as always, but the experts already in memory are computed first, while the others load."""
        for e in needed:
            getattr(self, self._COUNT[origin[e]])()
            self.cache.touch(layer, e)
        ready = [e for e in needed if (layer, e) not in self._pending or self._pending[(layer, e)].done.is_set()]
        for e in ready + [e for e in needed if e not in ready]:
            if not self._compute_fallback(layer, e, origin[e], compute):
                self._wait(layer, e)
                compute(e, self.cache.views[self.cache.slot(layer, e)])

    def _compute_fallback(self, layer: int, expert: int, origin: str, compute: Callable[[int, Any], None]) -> bool:
        """A demand miss computed from the fallback copy (its read goes on); False when there is none."""
        if self.fallback is None or origin != ORIGIN_DEMAND:
            return False
        self.stats.fallbacks += 1
        compute(expert, self.fallback(layer, expert))
        return True

    def _run_in_order(self, layer: int, needed: list[int], origin: dict[int, str],
                      compute: Callable[[int, Any], None]) -> None:
        """Fewer slots than needed experts: each in ascending order, loading it when its turn comes."""
        remaining = set(needed)
        for e in needed:
            if self.cache.slot(layer, e) is None:
                # no slot could be had without evicting a needed expert: take one now
                origin[e] = ORIGIN_DEMAND
                req = self._load(layer, e, DEMAND, keep=remaining - {e})
                if req is None:  # every slot holds a needed expert: evict one, to be reloaded later
                    req = self._load(layer, e, DEMAND, keep=())
                    assert req is not None, "a layer with at least one slot can always load"
            getattr(self, self._COUNT[origin[e]])()
            self.cache.touch(layer, e)
            if not self._compute_fallback(layer, e, origin[e], compute):
                self._wait(layer, e)
                compute(e, self.cache.views[self.cache.slot(layer, e)])
            remaining.discard(e)

    def _hit(self) -> None:
        self.stats.hits += 1
        self.stats.expert_uses += 1

    def _pf_hit(self) -> None:
        self.stats.prefetch_hits += 1
        self.stats.expert_uses += 1

    def _miss(self) -> None:
        self.stats.misses += 1
        self.stats.expert_uses += 1

    def preload(self, layer: int, experts: Iterable[int]) -> None:
        """Load experts ahead of use and wait for them (the `resident` benchmark policy)."""
        for e in experts:
            if self.cache.slot(layer, e) is None and self._load(layer, e, DEMAND, keep=()) is not None:
                self._wait(layer, e)

    def drain(self) -> None:
        """Wait for every outstanding read and settle it (before closing, between measured runs)."""
        for key in list(self._pending):
            self._wait(*key)
        for req in self._abandoned:
            req.done.wait()
        self._settle()

    def close(self) -> None:
        for req in list(self._pending.values()):
            self.loader.cancel(req)
        for req in list(self._pending.values()):
            if req.started:
                req.done.wait()
        self._pending.clear()
        self.loader.close()
        self.cache.close()
