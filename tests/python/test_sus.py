"""Acceptance 3: the SUS backward through torch autograd.

- Keep-everything: budget="waterfill" with c >= n_k keeps every visible entry with q = 1, so
  W̃ = W and the SUS gradient equals the dense one (float64: 1e-12 + 1e-12·|ref|; float32:
  1e-5 + 1e-5·|ref|, the kernels sum in different orders).
- Unbiasedness: over N independent masks the mean SUS gradient of L = Σ out·G is within
  k·σ̂/√N of the exact one for every coordinate. Under the normal approximation of the mean,
  each coordinate fails with probability α/P (two-sided), so the test fails by chance with
  probability at most α = 1e-4 (Bonferroni over the P coordinates); fixed seeds make a run
  reproducible. Coordinates with no sampling variance (σ̂ = 0) must equal the exact gradient.
"""
import math
import statistics

import pytest
import torch

import sus_torch
from ref import make_case

ALPHA = 1e-4  # false-failure probability of each unbiasedness test


@pytest.mark.parametrize("name", ["gqa", "causal_bottom_right", "varlen", "bool_mask", "additive_mask", "cross"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("draw", ["systematic", "independent"])
def test_keep_everything_equals_dense(name, dtype, tol, draw):
    (q, k, v), kw, _ = make_case(name, dtype)
    g = torch.randn(sus_torch.attention(q, k, v, **kw).shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    dense = torch.autograd.grad(sus_torch.attention(q, k, v, backward="dense", **kw), (q, k, v), g)
    out = sus_torch.attention(q, k, v, backward="sus", budget="waterfill", c=64, draw=draw, seed=7, **kw)
    sus = torch.autograd.grad(out, (q, k, v), g)
    for x, a, b in zip("qkv", sus, dense):
        err = (a - b).abs()
        assert (err <= tol + tol * b.abs()).all(), f"d{x}: max |sus - dense| {err.max().item():.3g}"


def unbiased_case(name, seed):
    """A problem large enough that c = 2 drops most entries: n = 16 (varlen: 3 sequences)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    if name == "gqa":
        return (rnd(2, 16, 4, 8), rnd(2, 16, 2, 8), rnd(2, 16, 2, 8)), dict(causal=True)
    if name == "varlen":
        cu_q = torch.tensor([0, 10, 16, 30])
        cu_k = torch.tensor([0, 12, 18, 30])
        return (rnd(30, 4, 8), rnd(30, 2, 8), rnd(30, 2, 8)), dict(
            causal=True, alignment="bottom_right", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    raise KeyError(name)


@pytest.mark.parametrize("name,budget,draw", [("gqa", "paper", "systematic"), ("gqa", "paper", "independent"),
                                              ("varlen", "waterfill", "systematic"), ("varlen", "paper", "independent")])
def test_sus_gradient_is_unbiased(name, budget, draw):
    N = 3000
    (q, k, v), kw = unbiased_case(name, seed=11)
    out = sus_torch.attention(q, k, v, backward="dense", **kw)
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    exact = torch.cat([t.flatten() for t in torch.autograd.grad(out, (q, k, v), G)])
    gen = torch.Generator().manual_seed(13)
    total = torch.zeros_like(exact)
    total_sq = torch.zeros_like(exact)
    for _ in range(N):
        out = sus_torch.attention(q, k, v, backward="sus", c=2, budget=budget, draw=draw, generator=gen, **kw)
        g = torch.cat([t.flatten() for t in torch.autograd.grad(out, (q, k, v), G)])
        total += g
        total_sq += g * g
    mean = total / N
    var = (total_sq - N * mean * mean).clamp_min(0) / (N - 1)
    se = (var / N).sqrt()
    P = exact.numel()
    k_sigma = statistics.NormalDist().inv_cdf(1 - ALPHA / (2 * P))
    sampled = se > 1e-9 * (1 + exact.abs())
    # The masks must really drop entries: most coordinates carry sampling noise.
    assert sampled.float().mean() > 0.5, f"only {int(sampled.sum())} of {P} coordinates vary"
    z = ((mean - exact).abs() / se)[sampled]
    assert z.max() <= k_sigma, f"max z {z.max().item():.2f} > {k_sigma:.2f} (P = {P}, N = {N})"
    fixed = ~sampled
    assert ((mean - exact).abs()[fixed] <= 1e-10 * (1 + exact.abs()[fixed])).all()
    # Power: the same bound rejects a gradient biased by 2% (a wrong 1/q scaling would be far more).
    z_biased = ((mean - 1.02 * exact).abs() / se)[sampled]
    assert z_biased.max() > k_sigma, f"the bound cannot see a 2% bias (max z {z_biased.max().item():.2f})"
    print(f"{name}/{budget}/{draw}: P = {P}, N = {N}, max z = {z.max().item():.2f} <= {k_sigma:.2f} (2% bias: {z_biased.max().item():.1f}), "
          f"{int(sampled.sum())} sampled coordinates")


def test_seed_and_generator_give_fresh_masks():
    # Every call draws a new seed from the generator; an explicit seed repeats the masks.
    (q, k, v), kw = unbiased_case("gqa", seed=3)
    grads = []
    for seed in (None, None, 5, 5):
        out = sus_torch.attention(q, k, v, c=2, seed=seed, **kw)
        grads.append(torch.autograd.grad(out.sum(), (q,))[0])
    assert not torch.equal(grads[0], grads[1])
    assert torch.equal(grads[2], grads[3])
    assert math.isfinite(grads[0].abs().max().item())
