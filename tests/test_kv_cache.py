"""The decode's KV cache (runtime/kv_cache.py): transformers' own model gives the same logits with it as with
transformers' `DynamicCache`, step after step, through cropping and reordering, while its buffers are
allocated a handful of times instead of once a token; the compiled step writes into it in place, through a
growth, with one graph, and room made for a step that did not run compiled holds nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

from adapmoe_cli.runtime.generate import new_kv_cache
from adapmoe_cli.runtime.kv_cache import MIN_ROOM, GrowingCache, GrowingLayer
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import ref_greedy, reference_models, runtime_engine

SPEC = TinySpec(max_position_embeddings=1024)


def _model(make_checkpoint: Callable[..., Path]):
    return reference_models(make_checkpoint, {"tiny": SPEC})("tiny")


def _step(model, ids: list[int], kv) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), cache=kv, use_cache=True).logits[0, -1]


def test_same_logits_as_transformers_cache_and_few_allocations(make_checkpoint):
    model = _model(make_checkpoint)
    ours, theirs = GrowingCache(model.config), DynamicCache(config=model.config)
    assert all(type(layer) is GrowingLayer for layer in ours.layers)
    prompt = [5, 9, 2, 33, 7, 11, 4, 8]
    a, b = _step(model, prompt, ours), _step(model, prompt, theirs)
    places = set()
    for _ in range(MIN_ROOM + 100):  # past the first buffer's end
        assert torch.equal(a, b)
        token = int(a.argmax())
        a, b = _step(model, [token], ours), _step(model, [token], theirs)
        places.add(ours.layers[0].keys.data_ptr())
    assert torch.equal(a, b)
    n = len(prompt) + MIN_ROOM + 100
    assert ours.get_seq_length() == theirs.get_seq_length() == n
    for layer, ref in zip(ours.layers, theirs.layers, strict=True):
        assert layer.grown == 2  # the prompt's buffer, then one with room for a quarter more
        assert layer.buffers[0].shape[-2] >= n and torch.equal(layer.keys, ref.keys)
    assert len(places) == 2  # the keys moved once, not once a token


def test_cropped_and_reordered_caches_go_on_like_transformers(make_checkpoint):
    model = _model(make_checkpoint)
    ours, theirs = GrowingCache(model.config), DynamicCache(config=model.config)
    prompt = list(range(3, 43))
    assert torch.equal(_step(model, prompt, ours), _step(model, prompt, theirs))
    for cache in (ours, theirs):  # a conversation cut back to a shared prefix (generate.PrefixKV.settle)
        for layer in cache.layers:
            layer.crop(-15)
    assert torch.equal(_step(model, [7, 8, 9], ours), _step(model, [7, 8, 9], theirs))
    grown = [layer.grown for layer in ours.layers]
    for cache in (ours, theirs):  # new tensors in the keys' place: taken over at the next update
        cache.reorder_cache(torch.tensor([0]))
    for token in (4, 6, 10):
        assert torch.equal(_step(model, [token], ours), _step(model, [token], theirs))
    assert [layer.grown for layer in ours.layers] == [g + 1 for g in grown]
    for layer, ref in zip(ours.layers, theirs.layers, strict=True):
        assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
    for cache in (ours, theirs):  # emptied (its buffers let go), then used again
        cache.reset()
    assert all(layer.buffers is None for layer in ours.layers)
    assert torch.equal(_step(model, prompt[:9], ours), _step(model, prompt[:9], theirs))
    assert [layer.grown for layer in ours.layers] == [1] * len(ours.layers)


def _conversation(engine, store: Store) -> list[list[int]]:
    """Chat's turns on the engine: each keeps the KV cache and feeds only what is new (generate.PrefixKV: a crop,
    an eager prompt, then decode steps)."""
    from adapmoe_cli.conversation import Conversation, load_tokenizer
    from adapmoe_cli.settings import GenerationSettings

    conv = Conversation(engine, load_tokenizer(store), GenerationSettings(max_new_tokens=12), raw=True)
    answers = [list(conv.send(text))[-1].token_ids for text in ("one two", " three", " four five")]
    assert conv.context_used == conv._kv.kv.get_seq_length()
    return answers


def test_a_compiled_step_writes_in_place_through_growths_and_compiles_once(make_store, make_checkpoint):
    """The compiled decode step writes each position into the buffers the eager prompt made (no copy of the
    cache a token), past a growth, compiling one graph: transformers' tokens, the buffers grown twice; a
    compiled conversation's turns, reusing the cache, answer as the eager engine's."""
    import torch._dynamo.utils

    store = Store.open(make_store(SPEC, dtype=torch.float32))
    ref = _model(make_checkpoint)
    prompt = [5, 9, 2, 33, 7, 11, 4, 8]
    n = MIN_ROOM + 40  # past the prompt's buffer
    with torch.no_grad():
        expected = ref_greedy(ref, prompt, n)
    with runtime_engine(store, {"compile": True}) as engine:
        kv = new_kv_cache(engine)
        assert type(kv) is GrowingCache
        frames = torch._dynamo.utils.counters["frames"]["total"]
        places, tokens = set(), []
        with torch.inference_mode():
            token = engine.decode(torch.tensor([prompt]), kv).logits[0, -1].argmax()
            tokens.append(int(token))
            for _ in range(n - 1):
                token = engine.decode(token.view(1, 1), kv).logits[0, -1].argmax()
                tokens.append(int(token))
                places.add(kv.layers[0].keys.data_ptr())
        assert engine.decode.failure is None and engine.decode.compile_s is not None
        assert torch._dynamo.utils.counters["frames"]["total"] - frames == 1  # one graph, through the growth
        assert engine.decode.unguarded_steps >= n - 4  # the growth failed no guard
        compiled_answers = _conversation(engine, store)
    with runtime_engine(store) as engine:
        assert compiled_answers == _conversation(engine, store)
    assert tokens == expected
    assert kv.get_seq_length() == len(prompt) + n - 1
    for layer in kv.layers:
        assert layer.grown == 2 and layer.keys.shape[-2] == len(prompt) + n - 1
    assert len(places) == 2  # the keys moved once, not once a token


def test_a_step_that_does_not_run_compiled_leaves_the_cache_as_it_was(make_checkpoint):
    """Room made for a compiled step that then runs eagerly (it could not compile) or raises holds nothing: the
    cache goes on like transformers', with an eager step or after a crop."""
    model = _model(make_checkpoint)
    ours, theirs = GrowingCache(model.config), DynamicCache(config=model.config)
    prompt = list(range(3, 13))
    assert torch.equal(_step(model, prompt, ours), _step(model, prompt, theirs))
    assert ours.reserve(1) and ours.get_seq_length() == len(prompt)
    assert all(layer.keys.shape[-2] == len(prompt) and layer.step.shape[0] == len(prompt) + 1
               for layer in ours.layers)
    assert torch.equal(_step(model, [7], ours), _step(model, [7], theirs))
    assert ours.reserve(1)
    for cache in (ours, theirs):
        for layer in cache.layers:
            layer.crop(-4)
    assert torch.equal(_step(model, [8, 9], ours), _step(model, [8, 9], theirs))
    assert ours.get_seq_length() == theirs.get_seq_length() == len(prompt) + 1 - 4 + 2
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(ours.layers, theirs.layers, strict=True))
    assert not GrowingCache(model.config).reserve(1)  # nothing held yet: the step runs eagerly
