"""Acceptance 6: bad input raises a Python exception whose message names the argument; never a
crash, a hang or NaN. Each row of BAD is one case: (what it targets, call, exception type,
text the message must contain). The count is printed (pytest -s) and asserted below."""
import math

import pytest
import torch

import sus_torch


def t(*shape, dtype=torch.float32, **kw):
    return torch.randn(*shape, dtype=dtype, **kw)


q4, k4, v4 = t(2, 6, 4, 8), t(2, 6, 2, 8), t(2, 6, 2, 8)
cu_ok = torch.tensor([0, 2, 6])
att = sus_torch.attention

BAD = [
    # shapes
    ("q 3-D without cu_seqlens", lambda: att(t(6, 4, 8), k4, v4), ValueError, "'q' has shape"),
    ("k 5-D", lambda: att(q4, t(2, 6, 2, 8, 1), v4), ValueError, "'k' has shape"),
    ("v 2-D", lambda: att(q4, k4, t(6, 8)), ValueError, "'v' has shape"),
    ("H_q not a multiple of H_kv", lambda: att(t(2, 6, 3, 8), k4, v4), ValueError, "'k' has 2 heads and 'q' has 3"),
    ("k and v head counts differ", lambda: att(q4, k4, t(2, 6, 1, 8)), ValueError, "'v' has shape"),
    ("batch differs", lambda: att(q4, t(3, 6, 2, 8), t(3, 6, 2, 8)), ValueError, "'k' has shape"),
    ("head dim differs", lambda: att(q4, t(2, 6, 2, 5), v4), ValueError, "'k' has shape"),
    ("k and v lengths differ", lambda: att(q4, k4, t(2, 7, 2, 8)), ValueError, "'v' has shape"),
    # dtype and device
    ("float16", lambda: att(q4.half(), k4.half(), v4.half()), TypeError, "'q' has dtype Half"),
    ("bfloat16", lambda: att(q4.bfloat16(), k4, v4), TypeError, "'q' has dtype BFloat16"),
    ("int64", lambda: att(q4, k4.long(), v4), TypeError, "'k' has dtype Long"),
    ("q float32, v float64", lambda: att(q4, k4, v4.double()), TypeError, "'v' has dtype Double but 'q' has Float"),
    ("meta device", lambda: att(q4.to("meta"), k4, v4), ValueError, "'q' is on meta"),
    # strides
    ("k's heads overlap (expand)", lambda: att(q4, k4[:, :, :1].expand(2, 6, 2, 8), v4), ValueError,
     "'k' addresses some elements twice"),
    ("v's rows overlap (as_strided)", lambda: att(q4, k4, v4.flatten()[:100].as_strided((2, 6, 2, 8), (8, 4, 2, 1))),
     ValueError, "'v' addresses some elements twice"),
    ("q's head dim strided (transpose)", lambda: att(t(2, 6, 8, 4).transpose(2, 3), k4, v4), ValueError,
     "'q' has stride 4 along its last"),
    # cu_seqlens
    ("cu_seqlens_q not from 0", lambda: att(t(6, 4, 8), t(6, 2, 8), t(6, 2, 8), cu_seqlens_q=torch.tensor([1, 2, 6]),
                                             cu_seqlens_k=cu_ok), ValueError, "'cu_seqlens_q' must start with 0"),
    ("cu_seqlens_k decreasing", lambda: att(t(6, 4, 8), t(6, 2, 8), t(6, 2, 8), cu_seqlens_q=cu_ok,
                                            cu_seqlens_k=torch.tensor([0, 4, 3, 6])), ValueError, "'cu_seqlens_k'"),
    ("cu_seqlens_q past the end", lambda: att(t(6, 4, 8), t(6, 2, 8), t(6, 2, 8), cu_seqlens_q=torch.tensor([0, 2, 7]),
                                              cu_seqlens_k=cu_ok), ValueError, "'cu_seqlens_q' ends at 7"),
    ("only cu_seqlens_q", lambda: att(t(6, 4, 8), t(6, 2, 8), t(6, 2, 8), cu_seqlens_q=cu_ok), ValueError,
     "'cu_seqlens_q' and 'cu_seqlens_k'"),
    ("cu_seqlens float", lambda: att(t(6, 4, 8), t(6, 2, 8), t(6, 2, 8), cu_seqlens_q=cu_ok.float(),
                                     cu_seqlens_k=cu_ok), TypeError, "'cu_seqlens_q' must be int32 or int64"),
    ("cu_seqlens 2-D", lambda: att(t(6, 4, 8), t(6, 2, 8), t(6, 2, 8), cu_seqlens_q=cu_ok.view(1, 3),
                                   cu_seqlens_k=cu_ok), ValueError, "'cu_seqlens_q' must be 1-D"),
    ("cu_seqlens with bhsd", lambda: att(t(6, 4, 8), t(6, 2, 8), t(6, 2, 8), cu_seqlens_q=cu_ok, cu_seqlens_k=cu_ok,
                                         layout="bhsd"), ValueError, "layout='bhsd'"),
    # sampler and options
    ("c = 0", lambda: att(q4, k4, v4, c=0), ValueError, "'c' = 0 must be an integer >= 1"),
    ("c = -3", lambda: att(q4, k4, v4, c=-3), ValueError, "'c' = -3"),
    ("c not an integer", lambda: att(q4, k4, v4, c=2.5), ValueError, "'c' = 2.5"),
    ("budget unknown", lambda: att(q4, k4, v4, budget="greedy"), ValueError, "'budget' = greedy"),
    ("draw unknown", lambda: att(q4, k4, v4, draw="poisson"), ValueError, "'draw' = poisson"),
    ("sampler option unknown", lambda: att(q4, k4, v4, temperature=2), ValueError,
     "unknown sampler option 'temperature'"),
    ("backward unknown", lambda: att(q4, k4, v4, backward="lowrank"), ValueError, "'backward' = 'lowrank'"),
    ("alignment unknown", lambda: att(q4, k4, v4, causal=True, alignment="center"), ValueError, "'alignment'"),
    ("layout unknown", lambda: att(q4, k4, v4, layout="sbhd"), ValueError, "'layout' = 'sbhd'"),
    ("scale inf", lambda: att(q4, k4, v4, scale=math.inf), ValueError, "'scale' = inf must be finite"),
    ("q has a NaN", lambda: att(q4.clone().index_fill_(1, torch.tensor([3]), math.nan), k4, v4), ValueError,
     "'q' has a non-finite entry"),
    # attn_mask
    ("mask wrong key length", lambda: att(q4, k4, v4, attn_mask=torch.ones(6, 5, dtype=torch.bool)), ValueError,
     "'attn_mask' has shape"),
    ("mask wrong head count", lambda: att(q4, k4, v4, attn_mask=torch.ones(2, 3, 6, 6, dtype=torch.bool)), ValueError,
     "'attn_mask' has shape"),
    ("mask 5-D", lambda: att(q4, k4, v4, attn_mask=torch.ones(1, 2, 4, 6, 6, dtype=torch.bool)), ValueError,
     "'attn_mask' has shape"),
    ("mask dtype differs from q", lambda: att(q4, k4, v4, attn_mask=torch.zeros(6, 6, dtype=torch.float64)), TypeError,
     "'attn_mask' has dtype Double"),
    ("additive mask NaN", lambda: att(q4, k4, v4, attn_mask=torch.full((6, 6), math.nan)), ValueError,
     "'attn_mask' (additive"),
    ("mask with varlen", lambda: att(t(6, 4, 8), t(6, 2, 8), t(6, 2, 8), cu_seqlens_q=cu_ok, cu_seqlens_k=cu_ok,
                                     attn_mask=torch.ones(6, 6, dtype=torch.bool)), ValueError,
     "'attn_mask' cannot be combined with cu_seqlens"),
    ("mask requires grad", lambda: att(q4, k4, v4, attn_mask=torch.zeros(6, 6, requires_grad=True)), ValueError,
     "'attn_mask' requires grad"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case):
    _, call, error, text = case
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value), str(info.value)
    assert "sus_torch.attention" in str(info.value)


def test_bad_input_count():
    print(f"{len(BAD)} bad-input cases")
    assert len(BAD) == 41
    assert len({c[0] for c in BAD}) == len(BAD)


def test_error_in_backward_is_a_python_exception():
    # The backward rejects a gradient with a NaN (no silent NaN gradients).
    q = t(1, 4, 2, 8).requires_grad_()
    out = att(q, t(1, 4, 2, 8), t(1, 4, 2, 8))
    with pytest.raises(ValueError, match="'dO' has a non-finite entry"):
        out.backward(torch.full_like(out, math.nan))
