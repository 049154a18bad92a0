"""A decoded token's attention with its grouped-query heads packed (runtime/attention.py) is transformers'
`sdpa` attention: the same outputs, masked or not, a model's same logits and greedy tokens; the packed
path is the one a decode step takes, and what it does not cover goes to transformers' own function."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, MixtralConfig, MixtralForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adapmoe_cli.runtime import attention
from adapmoe_cli.runtime.attention import packed_sdpa_forward, use_packed_attention
from adapmoe_cli.store import Store
from adapmoe_cli.synthetic import TinySpec
from tests.helpers import runtime_engine


@pytest.fixture
def packed_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The query shapes the packed path handed to SDPA."""
    calls: list[tuple[int, ...]] = []

    def sdpa(query, *args, **kwargs):
        calls.append(tuple(query.shape))
        return F.scaled_dot_product_attention(query, *args, **kwargs)

    monkeypatch.setattr(attention, "F", types.SimpleNamespace(scaled_dot_product_attention=sdpa))
    return calls


def _model(seed: int) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=96, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return MixtralForCausalLM(cfg).eval()


def test_a_model_with_packed_attention_gives_transformers_logits_and_tokens(packed_calls):
    theirs, ours = _model(0), _model(0)
    assert use_packed_attention(ours) and ours.config._attn_implementation == "adapmoe_sdpa"
    assert theirs.config._attn_implementation == "sdpa"
    ids = {name: [3, 17, 42, 8, 11] for name in ("theirs", "ours")}
    caches = {name: DynamicCache(config=m.config) for name, m in (("theirs", theirs), ("ours", ours))}
    with torch.inference_mode():
        for step in range(40):
            logits = {}
            for name, model in (("theirs", theirs), ("ours", ours)):
                feed = ids[name] if step == 0 else ids[name][-1:]
                logits[name] = model(input_ids=torch.tensor([feed]), cache=caches[name],
                                     use_cache=True).logits[0, -1]
                ids[name].append(int(logits[name].argmax()))
            torch.testing.assert_close(logits["ours"], logits["theirs"], rtol=0, atol=1e-5)
    assert ids["ours"] == ids["theirs"]
    # 39 decode steps × 2 layers went packed (6 query heads on 2 key/value heads: 3 per head); the prompt did not
    assert packed_calls == [(1, 2, 3, 16)] * (39 * 2)


def test_packed_attention_equals_transformers_sdpa_with_and_without_masks(packed_calls):
    _ = use_packed_attention(_model(1))  # binds transformers' function for what is not packed
    torch.manual_seed(2)
    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    q, k, v = torch.randn(1, 6, 1, 32), torch.randn(1, 2, 37, 32), torch.randn(1, 2, 37, 32)
    shared = torch.rand(1, 1, 1, 37) > 0.3
    per_head = torch.rand(1, 6, 1, 37) > 0.3
    per_head[..., 0] = True  # no head without a position to attend to
    for mask in (None, shared, per_head):
        ours, _ = packed_sdpa_forward(module, q, k, v, mask, scaling=0.2)
        theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert packed_calls == [(1, 2, 3, 32)] * 3
    # not packed: a prompt; keys with every head, as multi-head latent attention hands them over whatever
    # its config's key/value heads
    prompt = torch.randn(1, 6, 5, 32)
    mla_k, mla_v = torch.randn(1, 6, 37, 32), torch.randn(1, 6, 37, 32)
    for args in ((prompt, k, v, None), (q, mla_k, mla_v, None)):
        ours, _ = packed_sdpa_forward(module, *args, scaling=0.2)
        theirs, _ = sdpa_attention_forward(module, *args, scaling=0.2)
        assert torch.equal(ours, theirs)
    assert len(packed_calls) == 3


def test_the_engine_runs_packed_attention(make_store):
    store = Store.open(make_store(TinySpec(), dtype=torch.float32))
    with runtime_engine(store) as engine:
        assert engine.model.config._attn_implementation == "adapmoe_sdpa"
