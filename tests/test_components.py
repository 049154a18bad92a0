"""Unit tests of the runtime's pieces on plain data: eviction policies over expert ids, the slot cache,
the loader's queue (de-duplication, demand before prefetch, promotion, cancellation), the budget, the
policy registry and settings."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from adapmoe_cli import budget as budgets
from adapmoe_cli.budget import BudgetRequest, CacheShape, even_quotas
from adapmoe_cli.errors import UsageError
from adapmoe_cli.policies import POLICIES, get, parse_policies, policy_budget
from adapmoe_cli.runtime.cache import ExpertCache
from adapmoe_cli.runtime.eviction import LFU, LRU
from adapmoe_cli.runtime.loader import DEMAND, PREFETCH, InstantLoader, Loader
from adapmoe_cli.runtime.manager import ExpertManager
from adapmoe_cli.runtime.prefetch import PrefetchAdmission
from adapmoe_cli.settings import load_settings
from adapmoe_cli.store import Store
from adapmoe_cli.store.reader import ExpertReader, aligned_buffer, expert_views
from adapmoe_cli.synthetic import TinySpec


def test_lru_evicts_least_recent_and_respects_keep():
    p = LRU()
    for e in (1, 2, 3):
        p.insert(e)
    p.touch(1)
    assert p.victim() == 2
    assert p.victim(keep={2}) == 3
    assert p.victim(keep={1, 2, 3}) is None
    p.remove(2)
    assert list(p.residents()) == [3, 1]


def test_lfu_prefers_rarely_used_then_oldest():
    p = LFU()
    for e in (1, 2, 3):
        p.insert(e)
    for e in (1, 1, 3):
        p.touch(e)
    assert p.victim() == 2
    p.touch(2), p.touch(2)
    assert p.victim() == 3  # counts 2,2,1
    p.remove(3)
    p.insert(3)  # frequency survives eviction
    assert p.victim() == 3


def test_cache_reserve_evicts_within_layer_and_never_grows():
    cache = ExpertCache({0: 2, 1: 1}, stride=4096)
    assert cache.num_slots == 3 and cache.capacity_bytes == 3 * 4096
    assert cache.reserve(0, 5) == (0, None)
    cache.mark_ready(0, 5)
    assert cache.reserve(0, 6)[1] is None
    assert cache.is_loading(0, 6) and cache.is_ready(0, 5)
    assert cache.reserve(0, 7, keep={5, 6}) is None  # both kept
    cache.touch(0, 5)
    slot, ev = cache.reserve(0, 7)  # LRU order: 6 (reserved after 5, but 5 was used since)
    assert ev == 6 and cache.slot(0, 6) is None and cache.is_loading(0, 7)
    # a loading expert can be evicted too: the cache's contents never depend on I/O timing
    slot2, ev2 = cache.reserve(0, 8, keep={5})
    assert ev2 == 7 and slot2 == slot
    cache.release(0, 8)
    assert cache.slot(0, 8) is None
    assert cache.reserve(1, 5) is not None  # layers have their own slots
    assert cache.num_slots == 3


def test_a_layers_slots_are_one_arena_and_it_settles_once_every_expert_is_read():
    """What a compiled step reads to compute a layer in its graph (moe_block.OffloadedExperts._from_slots): the
    layer's slots as one tensor per part, each expert's place in it, and whether the layer is settled —
    every expert of it with a read slot — which any slot changing hands takes back."""
    import torch

    def views(buf):
        return {"w": {"": torch.frombuffer(buf, dtype=torch.float32, count=6, offset=8).view(2, 3)}}

    cache = ExpertCache({0: 3, 1: 2}, stride=4096, make_views=views, experts=3)
    stacked = cache.stacked(0)["w"][""]
    assert stacked.shape == (3, 2, 3)
    for i in range(3):  # slot i's view is row i of the stack: the same bytes
        cache.views[i]["w"][""].copy_(torch.full((2, 3), float(i + 1)))
    assert [float(stacked[i].sum()) for i in range(3)] == [6.0, 12.0, 18.0]
    for e in (2, 0):
        cache.reserve(0, e)
    assert not cache.holds_all(0) and not cache.settle(0)
    cache.reserve(0, 1)
    assert cache.holds_all(0) and not cache.settle(0)  # every expert has a slot, not every one is read
    for e in range(3):
        cache.mark_ready(0, e)
    assert cache.settle(0) and cache.settled_layers == {0}
    assert cache.place[0].tolist() == [1, 2, 0]  # expert → its slot in the layer, in the order reserved
    cache.release(0, 1)
    assert cache.settled_layers == set() and not cache.holds_all(0) and not cache.settle(0)
    assert not cache.settle(1)  # two slots for three experts: never
    assert ExpertCache({0: 1}, stride=0).stacked(0) is None  # bookkeeping only (the planner's replay)


def test_even_quotas():
    assert even_quotas([0, 1, 2], 7, 8) == {0: 3, 1: 2, 2: 2}
    assert even_quotas([0, 1], 16, 8) == {0: 8, 1: 8}


class GatedReader(ExpertReader):
    """A real reader whose first read waits for a signal, so the queue order behind it can be observed;
    `order` lists each expert when its first chunk is read, `chunks` every chunk."""

    def __init__(self, store):
        super().__init__(store)
        self.gate = threading.Event()
        self.started = threading.Event()
        self.order: list[tuple[int, int]] = []
        self.chunks: list[tuple[int, int, int]] = []

    def read_range(self, layer, expert, buf, start, stop):
        self.started.set()
        self.gate.wait()
        if start == 0:
            self.order.append((layer, expert))
        self.chunks.append((layer, expert, start))
        return super().read_range(layer, expert, buf, start, stop)


def test_loader_orders_dedupes_promotes_and_cancels(make_store):
    store = Store.open(make_store(TinySpec(num_local_experts=5, num_hidden_layers=2), dtype=torch.float32))
    reader = GatedReader(store)
    loader = Loader(reader)
    bufs = [aligned_buffer(store.slot_bytes) for _ in range(6)]
    first = loader.submit(0, 0, bufs[0], PREFETCH)
    assert reader.started.wait(5)
    b = loader.submit(0, 1, bufs[1], PREFETCH)
    c = loader.submit(0, 2, bufs[2], PREFETCH)
    d = loader.submit(1, 0, bufs[3], DEMAND)
    e = loader.submit(1, 1, bufs[4], PREFETCH)
    assert loader.submit(0, 1, bufs[5], PREFETCH) is b  # de-duplicated
    assert loader.submit(1, 1, bufs[5], DEMAND) is e  # ... and promoted by a demand for it
    loader.promote(c)
    assert loader.cancel(b) is True
    assert loader.cancel(first) is False  # already reading
    reader.gate.set()
    for r in (first, c, d, e):
        loader.wait(r)
    assert reader.order == [(0, 0), (1, 0), (1, 1), (0, 2)]
    assert not b.done.is_set() and b.cancelled
    # bytes arrived: the views equal the store's own expert
    views = expert_views(bufs[3], store.experts[(1, 0)])
    with ExpertReader(store) as plain:
        other = aligned_buffer(store.slot_bytes)
        plain.read_into(1, 0, other)
        for name, t in expert_views(other, store.experts[(1, 0)]).items():
            assert torch.equal(views[name], t)
    # w1 and w3 back to back: one [2I, H] view of the same bytes (no copy), as the runtime computes them
    fused = expert_views(bufs[3], store.experts[(1, 0)], fused=True)
    assert torch.equal(fused["w13"], torch.cat([views["w1"], views["w3"]]))
    assert fused["w13"].data_ptr() == views["w1"].data_ptr()
    assert "w13" not in views
    loader.close()


def _chunked_loader(make_store, monkeypatch):
    """A tiny store whose experts the loader reads in several 4 KiB chunks, its gated reader and loader."""
    import adapmoe_cli.runtime.loader as loader_mod

    monkeypatch.setattr(loader_mod, "CHUNK_BYTES", 4096)
    store = Store.open(make_store(TinySpec(num_local_experts=5, num_hidden_layers=2), dtype=torch.float32))
    chunks = -(-store.experts[(0, 0)].length // 4096)
    assert chunks > 3
    reader = GatedReader(store)
    return store, reader, Loader(reader), chunks


def _holds(store, buf, key):
    """`buf` holds exactly the store's bytes of expert `key`."""
    with ExpertReader(store) as plain:
        other = aligned_buffer(store.slot_bytes)
        plain.read_into(*key, other)
        for name, t in expert_views(other, store.experts[key]).items():
            assert torch.equal(expert_views(buf, store.experts[key])[name], t)


def test_a_demand_load_overtakes_a_prefetch_being_read(make_store, monkeypatch):
    """A prefetch is read in chunks; a demand load queued meanwhile is read whole before the prefetch's next
    chunk, then the prefetch resumes where it stopped, and both buffers hold exactly the store's bytes. A
    prefetch promoted while being read no longer steps aside."""
    store, reader, loader, chunks = _chunked_loader(make_store, monkeypatch)
    bufs = [aligned_buffer(store.slot_bytes) for _ in range(3)]
    pre = loader.submit(0, 0, bufs[0], PREFETCH)
    assert reader.started.wait(5)
    demand = loader.submit(1, 3, bufs[1], DEMAND)
    reader.gate.set()
    loader.wait(demand)
    loader.wait(pre)
    firsts = [c for c in reader.chunks if c[:2] == (0, 0)]
    assert reader.chunks[0] == (0, 0, 0) and reader.chunks[1] == (1, 3, 0)  # stepped aside after one chunk
    assert [c[2] for c in firsts] == [i * 4096 for i in range(chunks)]  # resumed where it stopped, no re-read
    assert len([c for c in reader.chunks if c[:2] == (1, 3)]) == 1  # the demand load: one read, whole
    _holds(store, bufs[0], (0, 0))
    _holds(store, bufs[1], (1, 3))
    # promoted while being read: a later demand waits for it
    reader.chunks.clear()
    reader.gate.clear()
    reader.started.clear()
    pre = loader.submit(0, 1, bufs[0], PREFETCH)
    assert reader.started.wait(5)
    loader.promote(pre)
    demand = loader.submit(1, 4, bufs[1], DEMAND)
    reader.gate.set()
    loader.wait(demand)
    loader.wait(pre)
    assert reader.chunks[-1] == (1, 4, 0) and {c[:2] for c in reader.chunks[:-1]} == {(0, 1)}
    assert len(reader.chunks) == 3  # its first chunk, then the rest at once (a demand reads whole)
    loader.close()


def test_an_abandoned_read_runs_to_its_end_before_its_buffer_is_read_again(make_store, monkeypatch):
    """A prefetch whose slot is taken back while its read is under way (its expert evicted for a demand load
    into the same buffer) no longer steps aside for that demand load: it is read to its end first, then the
    demand load, whose bytes stay as read. (It used to step aside and then resume into the buffer,
    overwriting the demand load's expert with the end of its own, unchecked.)"""
    store, reader, loader, chunks = _chunked_loader(make_store, monkeypatch)
    buf = aligned_buffer(store.slot_bytes)
    pre = loader.submit(0, 0, buf, PREFETCH)
    assert reader.started.wait(5)  # its first chunk is being read
    assert loader.cancel(pre) is False  # started: it cannot be taken back
    demand = loader.submit(0, 3, buf, DEMAND)  # the same slot, for another expert
    reader.gate.set()
    loader.wait(demand)
    assert pre.done.is_set() and pre.error is None  # read whole and checked before the demand load began
    assert reader.chunks == [(0, 0, i * 4096) for i in range(chunks)] + [(0, 3, 0)]
    _holds(store, buf, (0, 3))
    loader.close()


def test_settings_layering(tmp_path: Path):
    s = load_settings()
    assert s.prefetch is True and s.cache.policy == "auto"
    preset = tmp_path / "p.yaml"
    assert s.cache.budget == BudgetRequest() and not s.cache.budget.explicit  # configs/default.yaml: auto
    preset.write_text("cache:\n  budget: 2GiB\nprefetch: false\ngeneration:\n  temperature: 0.5\n")
    s = load_settings(preset)
    assert s.cache.budget == BudgetRequest(bytes=2 * 1024**3) and not s.prefetch and s.generation.temperature == 0.5
    s = load_settings(preset, {"cache.budget": 12, "prefetch": True})
    assert s.cache.budget == BudgetRequest(slots=12) and s.prefetch
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache:\n  slots: 3\n")
    with pytest.raises(UsageError, match="unknown setting cache.slots"):
        load_settings(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="temperature"):
        load_settings(overrides={"generation.temperature": -1})


SHAPE = CacheShape(layers=(0, 1, 2, 3), num_experts=8, top_k=2, slot_bytes=1 << 20, dense_bytes=5 << 20)


@pytest.mark.parametrize(("text", "want"), [
    ("12", BudgetRequest(slots=12)), (" 12 ", BudgetRequest(slots=12)), ("25%", BudgetRequest(fraction=0.25)),
    ("6MiB", BudgetRequest(bytes=6 << 20)), ("2G", BudgetRequest(bytes=2 << 30)), ("auto", BudgetRequest()),
])
def test_budget_words(text: str, want: BudgetRequest):
    assert BudgetRequest.parse(text) == want


@pytest.mark.parametrize(("req", "slots"), [
    (BudgetRequest(slots=12), 12), (BudgetRequest(bytes=(12 << 20) + 5), 12), (BudgetRequest(fraction=0.25), 8),
    (BudgetRequest(fraction=0.5), 16), (BudgetRequest(fraction=0.01), 4),  # a share never gives less than 1 a layer
    (BudgetRequest(slots=99), 32), (BudgetRequest(bytes=1 << 30), 32),  # more than the model: capped at it
])
def test_budget_slots_from_each_kind_of_request(req: BudgetRequest, slots: int):
    budget = budgets.resolve(req, SHAPE)
    assert budget.total == slots and budget.bytes == slots << 20
    assert budget.quotas == even_quotas(SHAPE.layers, slots, 8)


@pytest.mark.parametrize(("req", "message"), [
    (BudgetRequest(slots=3, flag="--cache-experts"), r"below one per MoE layer .* give --cache-experts 4 or more"),
    (BudgetRequest(bytes=3 << 20, flag="--memory"), r"below one per MoE layer .* give --memory 4.00MiB or more"),
    (BudgetRequest(slots=3, flag="--budget"), r"give --budget 4 or more"),  # the flag the user typed, always
])
def test_budget_range_is_checked_with_one_message(req: BudgetRequest, message: str):
    with pytest.raises(UsageError, match=message):
        budgets.resolve(req, SHAPE)


def test_auto_budget_fills_the_memory_available(monkeypatch: pytest.MonkeyPatch):
    # 80 % of what is available, less the dense weights, in whole slots; capped at the model
    monkeypatch.setattr(budgets, "_available", lambda: 20 << 20)  # 16 MiB usable - 5 MiB dense = 11 slots
    assert budgets.resolve(BudgetRequest(), SHAPE).total == 11
    monkeypatch.setattr(budgets, "_available", lambda: 1 << 40)
    big = budgets.resolve(BudgetRequest(), SHAPE)
    assert big.total == 32 and "every expert" in big.source
    monkeypatch.setattr(budgets, "_available", lambda: 8 << 20)  # 6.4 MiB: the dense weights and 1 slot
    with pytest.raises(UsageError, match="only 8.00 MiB of memory is available"):
        budgets.resolve(BudgetRequest(), SHAPE)


@pytest.mark.parametrize(("text", "message"), [
    ("0.5", "cannot read cache.budget"), ("lots", "cannot parse size"), ("0%", "above 0%"), ("150%", "at most 100%"),
    ("0", "at least 1 slot"),
])
def test_budget_words_refused(text: str, message: str):
    with pytest.raises(UsageError, match=message):
        BudgetRequest.parse(text)


def test_plans_are_validated():
    assert budgets.planned(SHAPE, {0: 1, 1: 8, 2: 2, 3: 3}, "plan").total == 14
    with pytest.raises(UsageError, match="MoE layers"):
        budgets.planned(SHAPE, {0: 1, 1: 8}, "plan")
    with pytest.raises(UsageError, match="more than 8"):
        budgets.planned(SHAPE, {0: 1, 1: 9, 2: 2, 3: 3}, "plan")


def test_every_policy_gets_its_slots_from_one_function():
    plan = {0: 1, 1: 5, 2: 3, 3: 3}
    asked: list[bool] = []

    def plan_for(gated: bool) -> dict[int, int]:
        asked.append(gated)
        return plan

    got = {n: dict(policy_budget(p, SHAPE, 12, plan_for).quotas) for n, p in POLICIES.items()}
    assert got["naive"] == {layer: 2 for layer in SHAPE.layers}
    assert got["resident"] == {layer: 8 for layer in SHAPE.layers}
    assert got["planned"] == got["adapmoe"] == got["adapmoe+fallback"] == plan and asked == [False, True, True]
    for name in ("lru", "lru+prefetch", "lru+prefetch+fallback", "lfu", "belady", "oracle"):
        assert got[name] == {layer: 3 for layer in SHAPE.layers}


def test_policy_names_runtime_and_limits():
    assert parse_policies("lru, adapmoe") == ["lru", "adapmoe"]
    assert parse_policies("lru", limits=True) == ["lru", "belady", "oracle"]
    with pytest.raises(UsageError, match="unknown policy belady"):
        parse_policies("lru,belady")  # the runtime cannot know the future
    with pytest.raises(UsageError, match="unknown policy nope"):
        parse_policies("nope", limits=True)


# -- prefetch admission (runtime/prefetch.py) ----------------------------------------------------------------
def test_admission_learns_each_layer_and_rank_from_every_candidate():
    adm = PrefetchAdmission(0.85)
    assert adm.precision(1, 0) == 0.5  # Laplace's prior: nothing seen yet
    assert adm.choose(1, [(0, 3), (1, 5)]) == []  # below 0.85: nothing read, both remembered
    adm.outcome(1, [3, 6])  # rank 0 was needed, rank 1 was not
    assert adm.table() == {"1:0": [1, 1], "1:1": [1, 0]}
    for _ in range(20):  # rank 0 always right, rank 1 always wrong — learnt though never read
        adm.choose(1, [(1, 5), (0, 3)])
        adm.outcome(1, [3])
    assert adm.precision(1, 0) == 22 / 23 and adm.precision(1, 1) == 1 / 23
    assert adm.choose(1, [(1, 5), (0, 3)]) == [3]  # in rank order, only the rank that proved right
    assert adm.choose(2, [(0, 3)]) == []  # another layer has its own counts
    adm.outcome(7, [1])  # a layer with nothing predicted: nothing scored
    assert "7:0" not in adm.table()
    assert PrefetchAdmission(0.0).choose(1, [(1, 5), (0, 3)]) == [3, 5]  # 0: every prediction (lru+prefetch)
    with pytest.raises(ValueError):
        PrefetchAdmission(1.5)


class _RecordingLoader(InstantLoader):
    def __init__(self) -> None:
        super().__init__(0)
        self.order: list[tuple[int, int, int]] = []

    def submit(self, layer, expert, buffer, priority):
        self.order.append((layer, expert, priority))
        return super().submit(layer, expert, buffer, priority)


def test_a_prefetch_is_queued_after_the_layers_demand_loads_and_only_when_admitted():
    loader = _RecordingLoader()
    manager = ExpertManager(ExpertCache({0: 2, 1: 2}, stride=0), loader, admission=PrefetchAdmission(0.6))
    computed: list[int] = []
    manager.run_layer(0, [2, 4], lambda e, _: computed.append(e), then_prefetch=(1, [6, 1]))
    # this layer's demand loads reach the loader before the next layer's prediction would
    assert [o for o in loader.order if o[2] == DEMAND] == [(0, 2, DEMAND), (0, 4, DEMAND)] and computed == [2, 4]
    assert manager.stats.prefetches_issued == 0  # rank 0 and 1 of layer 1: 0.5 < 0.6, not read
    for _ in range(3):  # layer 1 keeps needing its rank-0 prediction (6), never the rank-1 one (1)
        manager.run_layer(1, [6], lambda e, _: None)
        manager.run_layer(0, [2, 4], lambda e, _: None, then_prefetch=(1, [6, 1]))
    assert manager.admission.table()["1:1"] == [3, 0]
    # 6 stayed resident after its demand load, so it is no candidate; once evicted it is read by prefetch
    manager.run_layer(1, [3, 5], lambda e, _: None)
    loader.order.clear()
    manager.run_layer(0, [2, 4], lambda e, _: None, then_prefetch=(1, [6, 1]))
    assert loader.order == [(1, 6, PREFETCH)] and manager.stats.prefetches_issued == 1
    manager.close()


def test_prefetch_options_of_a_policy_row():
    assert get("adapmoe").prefetch == "admitted" and get("lru+prefetch").prefetch == "predicted"
    assert get("adapmoe:no-prefetch").prefetch == "none" and get("adapmoe:no-prefetch").eviction == "markov"
    both = get("lru:prefetch-admitted:markov")
    assert (both.prefetch, both.eviction, both.name) == ("admitted", "markov", "lru:prefetch-admitted:markov")
    for bad in ("naive:no-prefetch", "resident:prefetch-all", "lru:sometimes"):
        with pytest.raises(UsageError, match="cannot run"):
            get(bad)
    with pytest.raises(UsageError, match="prefetch_precision must be between 0 and 1"):
        load_settings(overrides={"prefetch_precision": 1.2})
