"""The reference every sus_torch test compares with: softmax(scale·q·kᵀ + mask)·v written in
plain PyTorch (autograd gives its gradients), and the table of attention problems the tests run."""
import math

import torch


def reference(q, k, v, *, causal=False, alignment="top_left", scale=None, attn_mask=None):
    """q: [B, S_q, H_q, D], k: [B, S_k, H_kv, D], v: [B, S_k, H_kv, D_v] -> [B, S_q, H_q, D_v].
    GQA: query head h reads key/value head h // (H_q // H_kv). A query that sees no key gets 0."""
    B, S_q, H_q, D = q.shape
    S_k, H_kv = k.shape[1], k.shape[2]
    group = H_q // H_kv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = (1.0 / math.sqrt(D)) if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * s              # [B, H, S_q, S_k]
    visible = torch.ones(B, H_q, S_q, S_k, dtype=torch.bool)
    if causal:
        shift = 0 if alignment == "top_left" else S_k - S_q
        i = torch.arange(S_q).unsqueeze(1)
        j = torch.arange(S_k).unsqueeze(0)
        visible = visible & (j <= i + shift)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask
            visible = visible & (attn_mask != float("-inf"))
    none = ~visible.any(-1, keepdim=True)                             # rows that see no key
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(none, 0.0)
    w = torch.softmax(scores, dim=-1).masked_fill(none, 0.0)
    return torch.einsum("bhij,bjhd->bihd", w, v)


def reference_varlen(q, k, v, cu_q, cu_k, **kw):
    """Varlen: q [total_q, H, D] etc.; each sequence through reference() on its own."""
    outs = []
    for b in range(len(cu_q) - 1):
        sq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        sk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        outs.append(reference(q[sq].unsqueeze(0), k[sk].unsqueeze(0), v[sk].unsqueeze(0), **kw)[0])
    return torch.cat(outs, dim=0)


def make_case(name, dtype, seed=0):
    """(inputs, op keywords, reference function) of the named problem; inputs require grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    B, D = 2, 4
    kw = {}
    cu = None
    if name == "causal_top_left":              # square causal: the common case
        q, k, v = rnd(B, 6, 2, D), rnd(B, 6, 2, D), rnd(B, 6, 2, D)
        kw = dict(causal=True)
    elif name == "causal_top_left_cross":      # n_q < n_k, top-left: query i sees j <= i only
        q, k, v = rnd(B, 5, 2, D), rnd(B, 7, 2, D), rnd(B, 7, 2, D)
        kw = dict(causal=True, alignment="top_left")
    elif name == "causal_bottom_right":        # n_q > n_k: the first queries see no key (zero rows)
        q, k, v = rnd(B, 7, 2, D), rnd(B, 5, 2, D), rnd(B, 5, 2, D)
        kw = dict(causal=True, alignment="bottom_right")
    elif name == "causal_bottom_right_kv_longer":  # n_q < n_k: KV-cache style decoding window
        q, k, v = rnd(B, 4, 2, D), rnd(B, 7, 2, D), rnd(B, 7, 2, D)
        kw = dict(causal=True, alignment="bottom_right")
    elif name == "gqa":                        # H_q = 4 over H_kv = 2: dk, dv summed over a group
        q, k, v = rnd(B, 6, 4, D), rnd(B, 6, 2, D), rnd(B, 6, 2, D)
        kw = dict(causal=True)
    elif name == "mqa":                        # H_kv = 1
        q, k, v = rnd(B, 5, 3, D), rnd(B, 5, 1, D), rnd(B, 5, 1, D)
    elif name == "cross":                      # non-causal, n_q != n_k, D_v != D, custom scale
        q, k, v = rnd(B, 5, 2, D), rnd(B, 8, 2, D), rnd(B, 8, 2, 3)
        kw = dict(scale=0.7)
    elif name == "varlen":                     # three packed sequences, one of them empty on q
        cu_q = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
        cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int64)
        q, k, v = rnd(9, 4, D), rnd(11, 2, D), rnd(11, 2, D)
        kw = dict(causal=True, alignment="bottom_right", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        cu = (cu_q, cu_k)
    elif name == "bool_mask":                  # key padding [B, 1, 1, S_k] and a per-head row mask
        q, k, v = rnd(B, 6, 2, D), rnd(B, 7, 2, D), rnd(B, 7, 2, D)
        keep = torch.rand(B, 2, 6, 7, generator=g) > 0.3
        keep[0, 1, 2] = False                  # a fully masked row: zero output and gradient
        kw = dict(attn_mask=keep & torch.tensor([True] * 6 + [False]).view(1, 1, 1, 7))
    elif name == "key_padding_mask":           # [B, 1, 1, S_k], broadcast over heads and queries
        q, k, v = rnd(B, 6, 2, D), rnd(B, 6, 2, D), rnd(B, 6, 2, D)
        keep = torch.ones(B, 1, 1, 6, dtype=torch.bool)
        keep[1, ..., 4:] = False
        kw = dict(attn_mask=keep, causal=True)
    elif name == "additive_mask":              # [S_q, S_k] 2-D additive, -inf entries and biases
        q, k, v = rnd(B, 5, 2, D), rnd(B, 6, 2, D), rnd(B, 6, 2, D)
        add = torch.randn(5, 6, generator=g, dtype=dtype)
        add[1, 3] = float("-inf")
        add[4, :] = float("-inf")              # a fully masked row
        kw = dict(attn_mask=add)
    else:
        raise KeyError(name)
    if cu is None:
        def ref(q, k, v):
            return reference(q, k, v, **{x: y for x, y in kw.items()})
    else:
        def ref(q, k, v):
            rest = {x: y for x, y in kw.items() if not x.startswith("cu_seqlens")}
            return reference_varlen(q, k, v, cu[0], cu[1], **rest)
    return (q, k, v), kw, ref


CASES = ["causal_top_left", "causal_top_left_cross", "causal_bottom_right", "causal_bottom_right_kv_longer",
         "gqa", "mqa", "cross", "varlen", "bool_mask", "key_padding_mask", "additive_mask"]
