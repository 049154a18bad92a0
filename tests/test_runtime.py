"""The offloading runtime against transformers' own model for the same checkpoint (`AutoModelForCausalLM`,
whatever the family): greedy tokens equal and logits within 1e-4 in float32, at every budget from one
slot per layer to all, with and without prefetch, on odd shapes, and over a multi-turn conversation that
keeps the KV cache; hits and misses equal a textbook LRU over the routing the runtime saw."""

from __future__ import annotations

import os

import pytest
import torch

from adapmoe_cli.conversation import Conversation, load_tokenizer
from adapmoe_cli.errors import UsageError
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.settings import GenerationSettings
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import (
    greedy,
    o_direct_allowed,
    open_fds_under,
    ref_greedy,
    reference_models,
    runtime_engine,
    textbook_lru,
)

SHAPES = {
    "default": TinySpec(),
    "odd": TinySpec(num_hidden_layers=3, num_local_experts=5, num_attention_heads=4, num_key_value_heads=1,
                    hidden_size=48, intermediate_size=80),
}
PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 12]


@pytest.fixture(scope="module")
def reference(make_checkpoint):
    return reference_models(make_checkpoint, SHAPES)


def _engine(make_store, name: str, slots_per_layer: int | None, prefetch: bool, **kw) -> Engine:
    spec = SHAPES[name]
    store = Store.open(make_store(spec, dtype=torch.float32))
    total = (slots_per_layer or spec.num_local_experts) * spec.num_hidden_layers
    # prefetch_precision 0: every prediction is read (the mechanics under test; the admission has its own tests)
    return runtime_engine(store, {"cache.budget": total, "prefetch": prefetch, "prefetch_precision": 0.0, **kw})


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("prefetch", [False, True], ids=["no-prefetch", "prefetch"])
@pytest.mark.parametrize("slots", ["one", "half", "all"])
def test_greedy_tokens_and_logits_match_transformers(make_store, reference, name, prefetch, slots):
    spec = SHAPES[name]
    per_layer = {"one": 1, "half": spec.num_local_experts // 2, "all": spec.num_local_experts}[slots]
    ref = reference(name)
    with _engine(make_store, name, per_layer, prefetch) as eng:
        assert greedy(eng, PROMPT, 24) == ref_greedy(ref, PROMPT, 24)
        with torch.no_grad():
            ours = eng.model(torch.tensor([PROMPT])).logits
            theirs = ref(torch.tensor([PROMPT])).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        # resident expert memory is exactly the slots it was given, never more
        assert eng.cache.num_slots == per_layer * spec.num_hidden_layers
        assert eng.cache.capacity_bytes == eng.cache.num_slots * eng.store.slot_bytes
        s = eng.stats
        assert s.expert_uses == s.hits + s.prefetch_hits + s.misses
        assert s.bytes_read == s.loads * eng.store.slot_bytes
        if not prefetch:
            assert s.prefetches_issued == 0 and s.prefetch_hits == 0
        if slots == "all":
            # every expert is loaded at most once when all fit
            assert s.loads <= spec.num_hidden_layers * spec.num_local_experts


def test_prefill_loads_each_needed_expert_once(make_store, reference):
    """With one slot per layer, a prompt's prefill loads each layer's needed experts once, not per token."""
    ref = reference("odd")
    with torch.no_grad():
        out = ref(torch.tensor([PROMPT]), output_router_logits=True)
    spec = SHAPES["odd"]
    distinct = [
        len(set(torch.topk(logits, spec.num_experts_per_tok, dim=-1).indices.flatten().tolist()))
        for logits in out.router_logits
    ]
    with _engine(make_store, "odd", 1, prefetch=False) as eng, torch.no_grad():
        eng.model(torch.tensor([PROMPT]))
        assert eng.stats.loads == sum(distinct)
        assert eng.stats.misses == sum(distinct)
        assert eng.stats.expert_activations == len(PROMPT) * spec.num_hidden_layers * spec.num_experts_per_tok


def test_prefetch_is_counted_and_used(make_store):
    """With room for prefetches, some needed experts arrive by prefetch; every issued one is accounted."""
    with _engine(make_store, "odd", 3, prefetch=True) as eng:
        greedy(eng, PROMPT, 24)
        eng.manager.drain()
        s = eng.stats
        assert s.prefetches_issued > 0
        assert s.prefetch_hits > 0
        # every prefetch is judged once, at the layer it was made for
        assert s.prefetch_hits + s.wasted_prefetches == s.prefetches_issued


@pytest.mark.parametrize("slots", [3, None], ids=["some-slots", "all-slots"])
def test_the_next_layer_is_predicted_only_while_a_prefetch_could_load_something(make_store, slots, monkeypatch):
    """The next layer's router runs for prefetch only while that layer has experts without a slot: with
    every one in memory the prediction would change nothing (skipping it: 10 % of a resident step)."""
    from adapmoe_cli.runtime.moe_block import OffloadedExperts

    calls = []
    original = OffloadedExperts._predicted
    monkeypatch.setattr(OffloadedExperts, "_predicted", lambda self, x: calls.append(self.layer) or original(self, x))
    with _engine(make_store, "odd", slots, prefetch=True) as eng:
        greedy(eng, PROMPT, 24)  # every expert used at least once: with all slots, each has one now
        layers = list(eng.store.shape.moe_layers)
        full = all(eng.cache.holds_all(layer) for layer in layers)
        calls.clear()
        greedy(eng, PROMPT, 8)  # the prompt, then 7 decode steps that may predict
    assert full == (slots is None)
    assert len(calls) == (0 if full else 7 * (len(layers) - 1))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_lru_order_equals_a_textbook_lru(make_store, policy):
    """The runtime's hits and misses over the routing it saw equal a textbook LRU's (one-token prompt and
    top-2 within 3 slots, so every call fits); LFU, evicting by other rules, must differ."""
    spec = SHAPES["odd"]
    with _engine(make_store, "odd", 3, prefetch=False, **{"cache.policy": policy}) as eng:
        calls: dict[int, list[list[int]]] = {layer: [] for layer in range(spec.num_hidden_layers)}
        eng.manager.on_layer.append(lambda layer, needed: calls[layer].append(list(needed)))
        greedy(eng, PROMPT[:1], 40)
        books = [textbook_lru(calls[layer], 3) for layer in calls]
        got = (eng.stats.hits, eng.stats.misses)
        want = (sum(b[0] for b in books), sum(b[1] for b in books))
        if policy == "lru":
            assert got == want
            for layer, (_, _, order) in zip(calls, books, strict=True):
                assert set(eng.cache.resident(layer)) == set(order)
        else:
            assert got != want  # the routing evicts often enough for the policy to matter
        assert want[1] > spec.num_hidden_layers * spec.num_local_experts  # experts were evicted and reloaded


def test_engine_reads_experts_with_o_direct(make_store):
    """The descriptors the engine itself opened on the expert files (found in /proc, not asked of the
    reader) carry O_DIRECT wherever the file system allows it, `Engine.direct_io` says the same, and
    closing the engine closes them."""
    store = make_store(SHAPES["odd"], dtype=torch.float32)
    expected = o_direct_allowed(store / "experts")
    before = open_fds_under(store / "experts")
    with _engine(make_store, "odd", 2, prefetch=True) as eng:
        greedy(eng, PROMPT, 4)
        assert eng.direct_io() is expected
        mine = {fd: flags for fd, flags in open_fds_under(store / "experts").items() if fd not in before}
        assert eng.stats.loads > 0 and len(mine) == SHAPES["odd"].num_hidden_layers  # one per layer file
        assert all(bool(flags & os.O_DIRECT) is expected for flags in mine.values()), mine
    assert not set(mine) & set(open_fds_under(store / "experts"))


def test_multi_turn_conversation_keeps_kv_cache_and_matches(make_store, make_checkpoint, reference):
    spec = SHAPES["default"]
    ref = reference("default")
    gen = GenerationSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    with _engine(make_store, "default", 2, prefetch=True) as eng:
        tok = load_tokenizer(eng.store)
        conv = Conversation(eng, tok, gen, system="You are terse.")
        for turn, user in enumerate(["What does the json module do?", "And os?", "Thanks. One more?"]):
            msgs = [*conv.template_messages(), {"role": "user", "content": user}]
            prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
            tokens_before = eng.stats.tokens
            answer = list(conv.send(user))
            ours = answer[-1].token_ids
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=[2, 6], pad_token_id=0)[0, len(prompt):].tolist()
            assert ours == expected, f"turn {turn}"
            fed = answer[0].prompt_tokens
            if turn > 0:
                assert fed < len(prompt), "later turns must reuse the cached prefix"
            assert eng.stats.tokens - tokens_before == fed + len(ours) - 1
        assert len(conv.messages) == 1 + 2 * 3
    del spec


def test_interrupted_answer_leaves_a_consistent_cache(make_store, reference):
    """Stopping an answer midway (as Ctrl-C does) keeps the conversation usable and exact."""
    ref = reference("default")
    gen = GenerationSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    with _engine(make_store, "default", 2, prefetch=True) as eng:
        tok = load_tokenizer(eng.store)
        conv = Conversation(eng, tok, gen)
        stream = conv.send("first question")
        next(stream), next(stream), next(stream)
        stream.close()  # what a KeyboardInterrupt in the consumer does to the generator
        assert conv.messages[-1]["stats"]["finish_reason"] == "interrupted"
        msgs = [*conv.template_messages(), {"role": "user", "content": "second"}]
        prompt = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
        ours = list(conv.send("second"))[-1].token_ids
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                eos_token_id=[2, 6], pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == expected


@pytest.mark.parametrize("overrides,match", [
    ({"cache.budget": 1}, "below one per MoE layer"),
    ({"cache.budget": "1KiB"}, "below one per MoE layer"),
    ({"device": "tpu"}, "unsupported device"),
    ({"cache.budget": "lots"}, "cannot parse size"),
])
def test_bad_budgets_are_refused(make_store, overrides, match):
    with pytest.raises(UsageError, match=match):
        runtime_engine(Store.open(make_store(TinySpec(), dtype=torch.float32)), overrides)


def test_a_budget_larger_than_the_model_is_capped(make_store):
    with runtime_engine(Store.open(make_store(TinySpec(), dtype=torch.float32)), {"cache.budget": 9}) as eng:
        assert eng.cache.num_slots == 8 and "capped at the model's 8 experts" in eng.budget.source


def test_memory_budget_turns_into_slots(make_store):
    store = Store.open(make_store(TinySpec(), dtype=torch.float32))
    budget = 5 * store.slot_bytes + store.slot_bytes // 2
    with runtime_engine(store, {"cache.budget": f"{budget}B"}) as eng:
        assert eng.cache.num_slots == 5
        assert eng.cache.capacity_bytes <= budget
        assert sorted(eng.budget.quotas.values()) == [2, 3]


def test_starting_the_runtime_leaves_hqq_unimported(make_store):
    """transformers imports hqq (and with it torch's compiler stack, ~1 s) whenever it is installed; the
    engine keeps it from doing so (skeleton.without_transformers_hqq), in a process of its own."""
    import subprocess
    import sys

    child = ("import sys\nfrom pathlib import Path\nfrom adapmoe_cli.planning.resolve import open_engine\n"
             "from adapmoe_cli.settings import load_settings\nfrom adapmoe_cli.store import Store\n"
             f"with open_engine(Store.open(Path({str(make_store())!r})), load_settings()) as e:\n"
             "    pass\nprint('hqq' in sys.modules, 'transformers.cache_utils' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]  # transformers' caches loaded, hqq not
