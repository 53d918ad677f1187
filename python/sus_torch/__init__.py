"""sus_torch: SUS backprop attention as a PyTorch CPU op.

    out = sus_torch.attention(q, k, v, causal=True)     # q: [B, S, H, D], float32/float64 CPU

The forward is exact softmax(scale·q·kᵀ + mask)·v. The backward is SUS (backward="sus"): the
attention weights W are replaced by an unbiased sparse sample W̃ (at most c kept entries per
query row), so dq, dk, dv are unbiased and cost O(n·c·d) instead of O(n²·d); or exact
(backward="dense", which keeps W: O(n²) memory per head). The op is torch.ops.sus.attention,
registered with an autograd kernel (TorchScript sees it too).
"""
import contextlib
import glob
import os

import torch

__all__ = ["attention", "override", "collect_stats", "last_call", "openmp_max_threads"]

_here = os.path.dirname(os.path.abspath(__file__))
_libs = sorted(glob.glob(os.path.join(_here, "_C*.so")))
if not _libs:
    raise ImportError(
        f"sus_torch: the compiled op (_C*.so) is not in {_here}; build it with "
        "'pip install --no-build-isolation ./python' or 'cd python && python3 setup.py build_ext --inplace'"
    )
torch.ops.load_library(_libs[0])


def _stream():
    """The rank under torch.distributed (0 otherwise): mixed into the mask seed, so that ranks
    seeded alike (torch.manual_seed(s) on every rank) still draw different masks."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


_override = {}


@contextlib.contextmanager
def override(**options):
    """Within the block every sus_torch.attention call uses these keywords (backward, c,
    budget, draw, seed, generator, or any sampler option) instead of its own: how a tool switches a
    model's attention between exact and SUS without editing the model
    (examples/torch/variance.py). Blocks nest; the innermost wins."""
    global _override
    saved = _override
    _override = {**saved, **options}
    try:
        yield
    finally:
        _override = saved


@contextlib.contextmanager
def collect_stats():
    """Collects, over the calls in the block, the SUS masks' kept entries ("nnz"), rows and
    visible (query, key) pairs under the causal options ("pairs"; attn_mask aside), and for
    every call that saved dense W (backward="dense") the mean attention spread exp(entropy of
    a row of W) per head ("spread": one list per call, in call order). Yields a dict filled
    when the block ends."""
    out = {}
    torch.ops.sus._take_stats(True)
    try:
        yield out
    finally:
        r = torch.ops.sus._take_stats(False)
        out.update(nnz=r[0], rows=r[1], pairs=r[2], spread=[])
        at = 4
        for _ in range(int(r[3])):
            heads, rows = int(r[at]), r[at + 1]
            out["spread"].append([x / rows if rows else float("nan") for x in r[at + 2:at + 2 + heads]])
            at += 2 + heads


def attention(q, k, v, *, causal=False, alignment="top_left", scale=None, attn_mask=None,
              cu_seqlens_q=None, cu_seqlens_k=None, backward="sus", c=32, budget="paper",
              draw="systematic", generator=None, layout="bshd", seed=None, **sampler_options):
    """Multi-head attention with a SUS (or exact) backward.

    q: [B, S_q, H_q, D], k: [B, S_k, H_kv, D], v: [B, S_k, H_kv, D_v] -> [B, S_q, H_q, D_v]
    (layout="bhsd": [B, H, S, D] each). float32 or float64, CPU, one dtype. Any strides with
    unit stride on the last dimension are read in place (views of a fused qkv projection,
    transposes): nothing is copied. H_q a multiple of H_kv: grouped-query attention (query
    head h uses key/value head h // (H_q // H_kv)).

    causal, alignment: causal mask; "top_left" (query i sees keys j <= i) or "bottom_right"
        (j <= i + S_k - S_q) when S_q != S_k. A query that sees no key gets zero output.
    scale: softmax scale, default 1/sqrt(D).
    attn_mask: bool (True: attend) or additive (q's dtype, -inf: masked), broadcastable to
        [B, H_q, S_q, S_k]; not with cu_seqlens.
    cu_seqlens_q, cu_seqlens_k: varlen batch; q, k, v are then [total, H, D] and sequence b is
        rows cu[b]:cu[b+1] (int32/int64, B + 1 offsets from 0 to total).
    backward: "sus" (saves the sampled masks, O(S_q·c) per head) or "dense" (saves W, exact).
    c, budget ("paper" | "waterfill"), draw ("systematic" | "independent"), **sampler_options:
        the sampler (sus::SamplerOptions; an option the library adds appears as a keyword).
    generator: the torch.Generator the mask seed is drawn from (default: torch's default CPU
        generator, so torch.manual_seed reproduces a run; every call draws a fresh seed).
        Under torch.distributed the rank is mixed into the seed: ranks draw different masks.
    seed: an explicit mask seed (int), instead of a draw from the generator.
    Threads: torch.get_num_threads(); results are bitwise the same for any thread count.
    """
    if _override:
        chosen = {"backward": backward, "c": c, "budget": budget, "draw": draw, "seed": seed,
                  "generator": generator, **sampler_options}
        chosen.update(_override)
        backward, seed, generator = chosen.pop("backward"), chosen.pop("seed"), chosen.pop("generator")
        c, budget, draw = chosen.pop("c"), chosen.pop("budget"), chosen.pop("draw")
        sampler_options = chosen
    options = {"c": c, "budget": budget, "draw": draw}
    options.update(sampler_options)
    sampler = ",".join(f"{key}={value}" for key, value in options.items())
    return torch.ops.sus.attention(
        q, k, v, attn_mask=attn_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        causal=causal, alignment=alignment, scale=None if scale is None else float(scale),
        backward=backward, sampler=sampler, seed=seed, generator=generator, stream=_stream(),
        layout=layout)


def last_call():
    """What the last op calls handed to the library (for tests and debugging): thread counts
    and the data pointers of the forward's q, k, v and the backward's q, k, v, out, grad_out."""
    r = torch.ops.sus._last_call()
    return {"forward_threads": r[0], "backward_threads": r[1],
            "forward_ptrs": {"q": r[2], "k": r[3], "v": r[4]},
            "backward_ptrs": {"q": r[5], "k": r[6], "v": r[7], "out": r[8], "grad_out": r[9]},
            "seed": r[10]}


def openmp_max_threads():
    """omp_get_max_threads() as the op sees it; 0 if it was built without OpenMP."""
    return torch.ops.sus._openmp_max_threads()
