"""Acceptance 4: no copies. q, k, v as views of one fused qkv projection, as transposes, or in
the bhsd layout give the same outputs and gradients as contiguous bshd inputs (bitwise: the
kernels read the same values in the same order), and reach the library in place:
- the pointers the op handed to sus::HeadsView (sus_torch.last_call(), recorded by the C++
  side at the call) are the tensors' own data_ptr, in the forward and in the backward;
- the torch profiler records no copy op (aten::copy_, contiguous, clone, ...) inside the op.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import sus_torch

COPY_OPS = {"aten::copy_", "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy", "aten::reshape",
            "aten::_reshape_alias", "aten::empty_like", "aten::resize_"}


def run(q, k, v, G, **kw):
    out = sus_torch.attention(q, k, v, seed=123, **kw)
    return out, torch.autograd.grad(out, (q, k, v), G)


def grads_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backward", ["sus", "dense"])
def test_fused_qkv_views(backward):
    B, S, Hq, Hkv, D = 2, 33, 4, 2, 16
    g = torch.Generator().manual_seed(0)
    # One projection output [B, S, (H_q + 2·H_kv)·D], split along the last dim: the GQA layout.
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D, generator=g).requires_grad_()
    q, k, v = qkv.view(B, S, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=2)
    assert not q.is_contiguous() and not k.is_contiguous()
    G = torch.randn(B, S, Hq, D, generator=g)
    kw = dict(causal=True, backward=backward, c=4)
    out, (dq, dk, dv) = run(q, k, v, G, **kw)
    info = sus_torch.last_call()
    assert info["forward_ptrs"] == {"q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr()}
    assert info["backward_ptrs"]["q"] == q.data_ptr() and info["backward_ptrs"]["v"] == v.data_ptr()
    assert info["backward_ptrs"]["out"] == out.data_ptr()
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c, grads_c = run(qc, kc, vc, G, **kw)
    assert torch.equal(out, out_c)
    assert grads_equal((dq, dk, dv), grads_c)
    # The gradient reaches the fused tensor through the views.
    (dqkv,) = torch.autograd.grad(sus_torch.attention(q, k, v, seed=123, **kw), (qkv,), G)
    assert torch.equal(dqkv.view(B, S, -1, D), torch.cat(grads_c, dim=2))


@pytest.mark.parametrize("backward", ["sus", "dense"])
def test_bhsd_and_transposed_views(backward):
    B, S, H, D = 2, 40, 3, 8
    g = torch.Generator().manual_seed(1)
    qh, kh, vh = (torch.randn(B, H, S, D, generator=g).requires_grad_() for _ in range(3))
    G = torch.randn(B, H, S, D, generator=g)
    kw = dict(causal=True, backward=backward, c=4)
    out_h, grads_h = run(qh, kh, vh, G, layout="bhsd", **kw)
    assert sus_torch.last_call()["forward_ptrs"] == {"q": qh.data_ptr(), "k": kh.data_ptr(), "v": vh.data_ptr()}
    assert out_h.shape == (B, H, S, D)
    # The same memory as a bshd view (a transpose) ...
    qt, kt, vt = (t.transpose(1, 2) for t in (qh, kh, vh))
    out_t, grads_t = run(qt, kt, vt, G.transpose(1, 2), **kw)
    assert sus_torch.last_call()["forward_ptrs"]["q"] == qh.data_ptr()
    # ... and contiguous bshd copies all give the same bits.
    qc, kc, vc = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (qh, kh, vh))
    out_c, grads_c = run(qc, kc, vc, G.transpose(1, 2).contiguous(), **kw)
    assert torch.equal(out_h.transpose(1, 2), out_c) and torch.equal(out_t, out_c)
    assert grads_equal([x.transpose(1, 2) for x in grads_h], grads_c)
    assert grads_equal(grads_t, grads_c)


def test_profiler_sees_no_copy():
    B, S, Hq, Hkv, D = 1, 64, 4, 1, 16
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D).requires_grad_()
    q, k, v = qkv.view(B, S, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=2)
    G = torch.randn(B, S, Hq, D)  # contiguous: the backward reads it in place too
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = sus_torch.attention(q, k, v, causal=True)
        torch.autograd.grad(out, (q, k, v), G)
    names = {e.name for e in prof.events()}
    assert "sus::attention" in names, sorted(names)  # the profiler does see the op's dispatch
    assert not names & COPY_OPS, sorted(names & COPY_OPS)
    assert sus_torch.last_call()["backward_ptrs"]["grad_out"] == G.data_ptr()
