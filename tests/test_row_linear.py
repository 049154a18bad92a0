"""One row's product eagerly (runtime/row_linear.py): the multiply-and-sum computes what `F.linear` does,
for the shapes transformers passes ([B, T, K], with a bias); the choice between the two ways is made once
per shape, from its first products timed both ways, by the rule, and kept."""

from __future__ import annotations

import pytest
import torch

from adapmoe_cli.runtime import row_linear


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(row_linear, "_chosen", {})
    monkeypatch.setattr(row_linear, "_trials", {})
    monkeypatch.setattr(row_linear, "_forced", None)


@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 4 * 48 * 7], ids=["one-piece", "in-pieces"])
def test_the_multiply_and_sum_computes_what_f_linear_does(fresh, monkeypatch, shape, bias, chunk):
    """In one piece, and in pieces of 7 rows (80 = 11 × 7 + 3) through the buffer."""
    if chunk is not None:
        monkeypatch.setattr(row_linear, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(80, 48, generator=g), torch.randn(*shape, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    monkeypatch.setattr(row_linear, "_forced", True)
    y = row_linear.linear(x, w, b)
    assert y.shape == (*shape[:-1], 80)
    assert torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-5)


def test_several_rows_other_dtypes_and_gradients_keep_f_linear(fresh, monkeypatch):
    monkeypatch.setattr(row_linear, "_forced", True)
    taken: list[tuple[int, ...]] = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(row_linear, "F", type("F", (), {"linear": staticmethod(
        lambda x, w, b=None: taken.append(tuple(x.shape)) or real(x, w, b))}))
    w = torch.randn(8, 4)
    row_linear.linear(torch.randn(3, 4), w)
    row_linear.linear(torch.randn(1, 4, dtype=torch.bfloat16), w.bfloat16())
    row_linear.linear(torch.randn(1, 4, requires_grad=True), w)
    row_linear.linear(torch.randn(1, 4), w)  # the only one the loop takes
    assert taken == [(3, 4), (1, 4), (1, 4)]


def test_the_rule_takes_the_loop_only_where_it_is_clearly_faster():
    assert row_linear.prefers_loop([1.0] * 4, [0.5] * 4)
    assert row_linear.prefers_loop([1.0] * 4, [0.85] * 4)
    assert not row_linear.prefers_loop([1.0] * 4, [0.9] * 4)  # within noise: BLAS stays
    assert not row_linear.prefers_loop([1.0] * 4, [2.0] * 4)
    # a few calls slowed by something else (a load's hashing) do not decide
    assert row_linear.prefers_loop([1.0] * 8, [0.5] * 5 + [20.0] * 3)
    assert not row_linear.prefers_loop([1.0] * 5 + [20.0] * 3, [1.2] * 8)


@pytest.mark.parametrize("loop_faster", [True, False])
def test_a_shapes_first_products_alternate_and_time_both_ways_then_one_is_kept(fresh, monkeypatch, loop_faster):
    """A shape's first products alternate between BLAS and the loop, `_TRIALS` of them timed after one of each
    (a clock on which the loop's calls take 0.5 s and BLAS's 1 s, or the other way round); then the faster one
    is chosen, once, for that shape only; every product, trial or not, is F.linear's."""
    ways: list[str] = []
    now = [0.0]
    real, real_loop = torch.nn.functional.linear, row_linear._loop

    def took(way: str) -> None:
        ways.append(way)
        now[0] += 0.5 if (way == "loop") == loop_faster else 1.0

    monkeypatch.setattr(row_linear, "_clock", lambda: now[0])
    monkeypatch.setattr(row_linear, "_loop", lambda x, w, b: took("loop") or real_loop(x, w, b))
    monkeypatch.setattr(row_linear, "F", type("F", (), {"linear": staticmethod(
        lambda x, w, b=None: took("blas") or real(x, w, b))}))
    g = torch.Generator().manual_seed(1)
    w, other = torch.randn(64, 8, generator=g), torch.randn(8, 64, generator=g)
    trials = row_linear._TRIALS + 2  # the first call each way is not timed
    for _ in range(trials + 6):
        x = torch.randn(1, 8, generator=g)
        assert torch.allclose(row_linear.linear(x, w), real(x, w), atol=1e-5)
    assert ways[:trials] == ["blas", "loop"] * (trials // 2)
    assert ways[trials:] == ["loop" if loop_faster else "blas"] * 6
    assert row_linear.chosen() == {"64x8": "multiply-and-sum" if loop_faster else "blas"}
    row_linear.linear(torch.randn(1, 64, generator=g), other)  # another shape starts its own trials
    assert ways[-1] == "blas" and set(row_linear.chosen()) == {"64x8"}


def test_a_real_run_makes_a_choice(fresh):
    w = torch.randn(64, 32)
    for _ in range(row_linear._TRIALS + 2):
        row_linear.linear(torch.randn(1, 32), w)
    assert set(row_linear.chosen()) == {"64x32"}
