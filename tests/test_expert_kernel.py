"""The compiled step's expert kernel (runtime/expert_kernel.py) against the eager arithmetic it replaces
(`moe_block.expert_output` with `F.linear`): Mixtral's layout (w1 and w3 fused as w13, SiLU) and GPT-OSS's
(separate w1 and w3, biases, the clamped SwiGLU); parts it does not take (a fallback copy's functions,
quantized parts, another layout) are left to the eager path, and a compiler that fails says so once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adapmoe_cli.runtime.expert_kernel import ExpertKernel
from adapmoe_cli.runtime.moe_block import expert_output, gated_activation

H, INTER = 24, 40


def _linear(x: torch.Tensor, part: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(x, part[""])


def _parts(fused: bool, biases: bool, seed: int = 0, inter: int = INTER) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w1, w3, w2 = (torch.randn(inter, H, generator=g) / H**0.5, torch.randn(inter, H, generator=g) / H**0.5,
                  torch.randn(H, inter, generator=g) / inter**0.5)  # scaled as trained weights are
    parts = {"w13": torch.cat([w1, w3])} if fused else {"w1": w1, "w3": w3}
    parts["w2"] = w2
    if biases:
        parts.update(b1=torch.randn(inter, generator=g), b3=torch.randn(inter, generator=g),
                     b2=torch.randn(H, generator=g))
    return {k: {"": v} for k, v in parts.items()}


@pytest.mark.parametrize(("layout", "inter", "dtype"), [
    ("mixtral", INTER, torch.float32), ("gpt-oss", INTER, torch.float32), ("mixtral", 6000, torch.float32),
    ("mixtral", 4099, torch.float32), ("mixtral", INTER, torch.bfloat16), ("gpt-oss", INTER, torch.bfloat16)])
def test_the_kernel_computes_what_the_eager_expert_computes(layout, inter, dtype):
    """(w2's sum over an intermediate size of 6,000 is made in two pieces, over the prime 4,099 in one; in
    bfloat16 the kernel rounds once where the eager ops round each, so they agree to about one of its steps)"""
    if layout == "mixtral":
        glu, fused, biases = gated_activation("act", SimpleNamespace(act_fn=torch.nn.SiLU())), True, False
    else:
        glu = gated_activation("clamped_swiglu", SimpleNamespace(alpha=1.702, limit=7.0))
        fused, biases = False, True
    kernel = ExpertKernel(glu, biases)
    for seed in range(3):  # one compile, then the same kernel for other experts of the layout
        w = {k: {"": t[""].to(dtype)} for k, t in _parts(fused, biases, seed, inter).items()}
        x = torch.randn(1, H, generator=torch.Generator().manual_seed(10 + seed)).to(dtype)
        scale = torch.tensor(0.37, dtype=dtype)
        got = kernel(x, w, scale)
        want = expert_output(_linear, glu, biases, x, w) * scale
        assert got is not None and got.shape == (1, H) and got.dtype == x.dtype
        if dtype is torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # (within a few of bfloat16's steps of the largest number)
            assert (got.float() - want.float()).abs().max() <= 4 * torch.finfo(dtype).eps * want.float().abs().max()
        assert not torch.equal(got, torch.zeros_like(got))
    assert kernel.failure is None


def test_parts_it_does_not_take_are_left_to_the_eager_path():
    glu = gated_activation("act", SimpleNamespace(act_fn=torch.nn.SiLU()))
    kernel = ExpertKernel(glu, False)
    x, scale = torch.randn(1, H), torch.tensor(1.0)
    w = _parts(True, False)
    assert kernel(x, w, scale) is not None
    fallback = {k: (lambda v, t=t: F.linear(v, t[""])) for k, t in w.items()}  # a fallback copy's parts
    assert kernel(x, fallback, scale) is None
    quantized = {k: {".q": t[""], ".s": t[""][:, :1]} for k, t in w.items()}
    assert kernel(x, quantized, scale) is None
    other = {"w13": {"": torch.randn(2 * INTER + 2, H)}, "w2": {"": torch.randn(H, INTER + 1)}}  # another layout
    assert kernel(x, other, scale) is None
    assert kernel(x, w, scale) is not None and kernel.failure is None


def test_each_slots_parts_are_checked_once_and_still_computed_right(monkeypatch):
    """A slot's views are made once, so the kernel checks a views dict's parts on its first call only (the
    check cost ~5 µs of each call: adapmoe at half the experts 3.8 % faster, docs/performance.md); what it
    answers does not change: each expert's own product, and None for parts it does not take, every time."""
    glu = gated_activation("act", SimpleNamespace(act_fn=torch.nn.SiLU()))
    kernel = ExpertKernel(glu, False)
    checks = []
    real = kernel._parts
    monkeypatch.setattr(kernel, "_parts", lambda w, keys: checks.append(id(w)) or real(w, keys))
    slots = [_parts(True, False, seed) for seed in range(3)]
    fallback = {k: (lambda v, t=t: F.linear(v, t[""])) for k, t in slots[0].items()}
    x, scale = torch.randn(1, H), torch.tensor(0.5)
    for _ in range(3):
        for w in slots:
            want = (expert_output(_linear, glu, False, x, w) * scale).to(x.dtype)
            torch.testing.assert_close(kernel(x, w, scale), want, rtol=1e-4, atol=1e-5)
        assert kernel(x, fallback, scale) is None
    assert sorted(checks) == sorted(map(id, [*slots, fallback]))


def test_a_compiler_that_fails_is_said_once_and_experts_run_eagerly(monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx_inner", broken)
    notes: list[str] = []
    kernel = ExpertKernel(gated_activation("act", SimpleNamespace(act_fn=torch.nn.SiLU())), False, notes.append)
    w, x, scale = _parts(True, False), torch.randn(1, H), torch.tensor(1.0)
    assert kernel(x, w, scale) is None and kernel(x, w, scale) is None
    assert len(notes) == 1 and "expert kernel" in notes[0] and "no C++ compiler" in notes[0]


def test_a_kernel_whose_first_output_is_wrong_is_not_used(monkeypatch):
    """The compiled module's first output is checked against the eager arithmetic (a compiler, or a calling
    convention of another torch, that computes something else): then experts are computed eagerly."""
    from torch._inductor import compile_fx

    real = compile_fx.compile_fx_inner

    def off_by_a_little(*args, **kwargs):
        run = real(*args, **kwargs).current_callable
        return lambda inputs: [run(inputs)[0] * 1.01]

    monkeypatch.setattr(compile_fx, "compile_fx_inner", off_by_a_little)
    notes: list[str] = []
    kernel = ExpertKernel(gated_activation("act", SimpleNamespace(act_fn=torch.nn.SiLU())), False, notes.append)
    w, x, scale = _parts(True, False), torch.randn(1, H), torch.tensor(1.0)
    assert kernel(x, w, scale) is None and kernel(x, w, scale) is None
    assert len(notes) == 1 and "differs from the eager arithmetic" in notes[0]
