"""The eager decode's KV cache (runtime/kv_cache.py): transformers' own model gives the same logits with it as
with transformers' `DynamicCache`, step after step, through cropping and reordering, while its buffers are
allocated a handful of times instead of once a token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

from adapmoe_cli.runtime.generate import new_kv_cache
from adapmoe_cli.runtime.kv_cache import MIN_ROOM, GrowingCache, GrowingLayer
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import reference_models, runtime_engine

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


def test_an_eager_engine_gets_the_growing_cache_a_compiled_one_transformers(make_store):
    store = Store.open(make_store(SPEC))
    with runtime_engine(store) as engine:
        assert type(new_kv_cache(engine)) is GrowingCache
    with runtime_engine(store, {"compile": True}) as engine:
        assert type(new_kv_cache(engine)) is DynamicCache
