"""Acceptance 1 and 2: the dense path is the exact gradient.

1. torch.autograd.gradcheck in float64 (finite differences, eps 1e-6, atol 1e-5, rtol 1e-3:
   gradcheck's defaults) on every problem of ref.CASES: causal with both alignments, GQA/MQA,
   cross attention, varlen, bool and additive masks.
2. Forward and dense backward against PyTorch autograd of the reference in float32:
   |sus - ref| <= 1e-5 + 1e-5·|ref| elementwise, for the same problems.
"""
import pytest
import torch

import sus_torch
from ref import CASES, make_case


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_dense(name):
    (q, k, v), kw, _ = make_case(name, torch.float64)
    fn = lambda q, k, v: sus_torch.attention(q, k, v, backward="dense", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-3)


def assert_close(got, want, what, atol=1e-5, rtol=1e-5):
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert (err <= bound).all(), f"{what}: max |diff| {err.max().item():.3g} (bound {atol} + {rtol}·|ref|)"


@pytest.mark.parametrize("name", CASES)
def test_dense_matches_torch_autograd_float32(name):
    (q, k, v), kw, ref = make_case(name, torch.float32)
    out = sus_torch.attention(q, k, v, backward="dense", **kw)
    want = ref(q, k, v)
    assert_close(out, want, f"{name} forward")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(want, (q, k, v), g)
    for x, a, b in zip("qkv", got, exp):
        assert_close(a, b, f"{name} d{x}")


def test_fully_masked_rows_are_zero_not_nan():
    # bottom_right with n_q > n_k: queries 0 and 1 see no key.
    (q, k, v), kw, _ = make_case("causal_bottom_right", torch.float32)
    out = sus_torch.attention(q, k, v, backward="sus", c=2, **kw)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    dq, = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(dq).all() and torch.equal(dq[:, :2], torch.zeros_like(dq[:, :2]))


def test_inference_mode_forward():
    # Without autograd the CPU kernel runs the forward alone (nothing saved).
    (q, k, v), kw, ref = make_case("gqa", torch.float32)
    with torch.inference_mode():
        out = sus_torch.attention(q, k, v, **kw)
    assert_close(out, ref(q, k, v).detach(), "inference_mode forward")


@torch.jit.script
def scripted_attention(q, k, v):
    return torch.ops.sus.attention(q, k, v, causal=True, backward="dense")


def test_torchscript_calls_the_op_with_autograd():
    (q, k, v), _, ref = make_case("causal_top_left", torch.float64)
    out = scripted_attention(q, k, v)
    want = ref(q, k, v)
    assert torch.allclose(out, want, atol=1e-12, rtol=1e-12)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    exp = torch.autograd.grad(want.sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-12, rtol=1e-12) for a, b in zip(got, exp))


@pytest.mark.parametrize("shape", [(0, 8, 2, 4), (1, 0, 2, 4)])
def test_empty_batch_or_sequence(shape):
    q = torch.randn(*shape, requires_grad=True)
    out = sus_torch.attention(q, q.detach(), q.detach(), causal=True)
    assert out.shape == shape
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert dq.shape == shape


def test_no_grad_keeps_only_the_log_sum_exp():
    # Under torch.no_grad nothing is saved for a backward: no SUS mask is sampled.
    (q, k, v), kw, ref = make_case("gqa", torch.float32)
    with torch.no_grad(), sus_torch.collect_stats() as st:
        out = sus_torch.attention(q, k, v, c=2, **kw)
    assert st["nnz"] == 0 and not out.requires_grad
    assert_close(out, ref(q, k, v).detach(), "no_grad forward")
    with sus_torch.collect_stats() as st:
        sus_torch.attention(q, k, v, c=2, **kw)
    assert st["nnz"] > 0  # with grad mode on, the masks are sampled in the forward
