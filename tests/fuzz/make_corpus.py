#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets: tests/fuzz/corpus/<target>/<name>.

Each seed is encoded the way the targets' Reader (fuzz_common.hpp) decodes it: bytes front to
back, little-endian; an input that ends early reads zeros from there on (and pseudo-random
moderate matrix elements), so a seed only spells out what it wants to set. The field order of
each target is in the comment at the top of its .cpp file. Re-run after changing a decoder:
  python3 tests/fuzz/make_corpus.py
Seeds found by fuzzing (crash reproducers once fixed) are added by hand as tests/fuzz/corpus/
<target>/regress-*; this script leaves such files alone and rewrites only its own.
"""
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

# Reader.wide(): 0xF0 + index picks one of these edge values; 0xFF reads 8 raw bytes.
WIDE_EDGES = {-1: 0, 2**63 - 1: 1, 2**62: 2, 2**32: 3, 2**31: 4, 2**31 - 1: 5, -2**63: 6, 2**61: 7,
              2**62 + 0: 2, 3 * 2**61: 9, 2**40: 10, 2**20: 11, 2**32 + 1: 12, 2**63 - 2: 13, -2: 14}
# Reader.value(): 0xE0 + index picks one of these specials.
SPECIAL = {"nan": 0, "inf": 1, "-inf": 2, "max": 3, "lowest": 4, "denorm_min": 5, "min": 6, "-0": 7, "1e30": 8,
           "-1e30": 9, "1e-30": 10, "epsilon": 11, "one": 12, "1e18": 13, "-denorm_min": 14}


class Seed:
    def __init__(self):
        self.b = bytearray()

    def byte(self, v):
        assert 0 <= v <= 255
        self.b.append(v)
        return self

    def small(self, v, max_):
        assert 0 <= v <= max_
        if max_ > 255:
            self.b += struct.pack("<H", v)
        else:
            self.b.append(v)
        return self

    def wide(self, v, max_small):
        if 0 <= v <= max_small and v < 0xF0:
            return self.byte(v)
        if v in WIDE_EDGES:
            return self.byte(0xF0 + WIDE_EDGES[v])
        self.b.append(0xFF)
        self.b += struct.pack("<q", v)
        return self

    def value(self, x):
        """A multiple of 1/32 in [-3.5, 3.47], or the name of a special."""
        if isinstance(x, str):
            return self.byte(0xE0 + SPECIAL[x])
        code = round(x * 32) + 112
        assert 0 <= code < 0xE0 and abs(code - 112 - x * 32) < 1e-9, x
        return self.byte(code)

    def raw_double(self, x):
        return self.byte(0xFF).extend(struct.pack("<d", x))

    def extend(self, data):
        self.b += data
        return self


def write(target, name, seed):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(seed.b))


def clear(target):
    d = os.path.join(ROOT, target)
    if os.path.isdir(d):
        for f in os.listdir(d):
            if not f.startswith("regress-"):
                os.remove(os.path.join(d, f))


# --- fuzz_sampler: [flags] [c] [seed: 8] [n_q] [n_k: 2] rows [generator ...] [disturbance ...] [row] ---
def sampler_seed(double, budget, draw, c, rows, n_k, seed=1, c_wide=None):
    """c_wide: c through Reader.wide(0) instead (0, or an edge-value byte 0xF0..)."""
    flags = (1 if double else 0) | (2 if budget == "waterfill" else 0) | (4 if draw == "systematic" else 0)
    s = Seed().byte(flags)
    if c_wide is not None:
        s.byte(0xF0).byte(c_wide)
    else:
        s.byte(c - 1)
    s.extend(struct.pack("<Q", seed)).small(len(rows) - 1, 7).small(n_k, 700)
    for row in rows:
        row(s, n_k)
    return s


def pos(s, j, n_k):
    s.small(j, min(n_k - 1, 65535))


def row_softmax(temp=8, disturb=None):
    def f(s, n_k):
        s.byte(0x02).small(temp, 63)
        for j in range(n_k):
            s.byte((j * 37 + 11) % 256)
        disturbance(s, n_k, disturb)
    return f


def row_kind(gen, params=(), disturb=None):
    """Generators: 1 zero, 3 sparse, 4 denormals, 5 uniform, 6 one-hot, 7 decay."""
    def f(s, n_k):
        s.byte(gen)
        if gen == 3:
            s.small(len(params) - 1, 40)
            for j in params:
                pos(s, j, n_k)
                s.small(1, 15)
        elif gen == 4:
            s.small(len(params) - 1, 3)
            for j in params:
                pos(s, j, n_k)
            for j in range(n_k):
                if j not in params:
                    s.small(j % 4, 3)
        elif gen == 6:
            pos(s, params[0], n_k)
        elif gen == 7:
            s.small(params[0], 255)
        disturbance(s, n_k, disturb)
    return f


def row_raw(values, disturb=None):
    def f(s, n_k):
        s.byte(0x00)
        for j in range(n_k):
            s.value(values[j % len(values)])
        disturbance(s, n_k, disturb)
    return f


def disturbance(s, n_k, d):
    if d is None:
        s.byte(0)
    elif d[0] == "set":  # ("set", j, value)
        s.byte(1)
        pos(s, d[1], n_k)
        s.value(d[2])
    else:  # ("scale", index into the deltas: tol/2, -tol/2, 2tol, -2tol, 1e-7, -1e-7, 0.999tol, 1.001tol)
        s.byte(2).byte(d[1])


def make_sampler():
    t = "fuzz_sampler"
    clear(t)
    k = 0
    for double in (False, True):
        for budget in ("paper", "waterfill"):
            for draw in ("systematic", "independent"):
                tag = f"{'f64' if double else 'f32'}-{budget}-{draw}"
                write(t, f"{tag}-softmax", sampler_seed(double, budget, draw, 8, [row_softmax(), row_softmax(3)], 100))
                write(t, f"{tag}-mixed", sampler_seed(double, budget, draw, 4, [
                    row_kind(6, [5]), row_kind(5), row_kind(3, [1, 7, 30]), row_kind(1), row_kind(7, [200])], 64))
                k += 2
    write(t, "waterfill-denormals-c3", sampler_seed(False, "waterfill", "independent", 3, [row_kind(4, [0, 9])], 700))
    write(t, "waterfill-denormals-c3-f64", sampler_seed(True, "waterfill", "systematic", 3, [row_kind(4, [0])], 700))
    write(t, "paper-denormals", sampler_seed(False, "paper", "systematic", 3, [row_kind(4, [2, 3, 4])], 300))
    write(t, "uniform-700-c32", sampler_seed(False, "paper", "systematic", 32, [row_kind(5)], 700))
    write(t, "uniform-700-c64-waterfill", sampler_seed(True, "waterfill", "independent", 64, [row_kind(5)], 700))
    write(t, "sum-above-tolerance", sampler_seed(False, "paper", "systematic", 8, [row_softmax(disturb=("scale", 2))], 50))
    write(t, "sum-inside-tolerance", sampler_seed(False, "paper", "systematic", 8, [row_softmax(disturb=("scale", 0))], 50))
    write(t, "sum-near-tolerance", sampler_seed(True, "waterfill", "systematic", 8, [row_softmax(disturb=("scale", 6)), row_softmax(disturb=("scale", 7))], 50))
    write(t, "nan-entry", sampler_seed(False, "paper", "systematic", 4, [row_softmax(disturb=("set", 3, "nan"))], 20))
    write(t, "inf-entry", sampler_seed(True, "waterfill", "independent", 4, [row_softmax(disturb=("set", 3, "inf"))], 20))
    write(t, "negative-entry", sampler_seed(False, "waterfill", "systematic", 4, [row_softmax(disturb=("set", 0, -0.5))], 20))
    write(t, "minus-zero-entry", sampler_seed(False, "paper", "independent", 4, [row_kind(6, [2], disturb=("set", 1, "-0"))], 20))
    write(t, "denormal-entry", sampler_seed(True, "paper", "systematic", 2, [row_kind(6, [2], disturb=("set", 1, "denorm_min"))], 20))
    write(t, "raw-values", sampler_seed(False, "paper", "systematic", 2, [row_raw([0.25, 0, 0.5, 0.25])], 4))
    write(t, "empty-row", sampler_seed(False, "paper", "systematic", 2, [row_kind(1)], 0))
    write(t, "c-1", sampler_seed(False, "paper", "systematic", 1, [row_softmax()], 64))
    write(t, "c-0", sampler_seed(False, "paper", "systematic", 0, [row_softmax()], 8, c_wide=0))
    write(t, "c-intmax", sampler_seed(True, "waterfill", "systematic", 0, [row_softmax()], 65, c_wide=0xF5))
    write(t, "c-minus-1", sampler_seed(False, "paper", "independent", 0, [row_softmax()], 8, c_wide=0xF0))
    # flags >> 3 == 31: an out-of-range enumerator (budget, bit 1 set) 2 + 7, then c = 4.
    write(t, "bad-enum", Seed().byte(0xFA).small(7, 100).byte(3).extend(struct.pack("<Q", 1)).small(0, 7)
          .small(8, 700).byte(5).byte(0))


# --- fuzz_csr: [flags] [n_q] [n_k] [d] [d_v] [scale] [pad] rows [mutations] [max_per_row] [blocks: 2] elements ---
CSR_DIMS = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64, 128, 0, 6, 33, 1]


def csr_seed(n_q, n_k, d=4, d_v=4, double=False, causal=False, bottom_right=False, accumulate=False, scale=None,
             pad=None, rows=None, mutations=(), max_per_row=None, block=3, range_=5, elements=(), raw_cols=False):
    flags = (1 if double else 0) | (2 if causal else 0) | (4 if bottom_right else 0) | (8 if accumulate else 0)
    flags |= (16 if scale is not None else 0) | (32 if pad is not None else 0)
    s = Seed().byte(flags).small(n_q, 40).small(n_k, 40).byte(CSR_DIMS.index(d)).byte(CSR_DIMS.index(d_v))
    if scale is not None:
        if isinstance(scale, str):
            s.byte(0xC0).value(scale)
        elif isinstance(scale, float) and abs(scale) > 6:
            s.byte(0xC0).raw_double(scale)
        else:
            s.byte(round(scale * 16) + 96)
    if pad is not None:
        s.small(pad - 1, 3)
    for i in range(n_q):
        entries = rows[i] if rows else []
        s.small(len(entries), 12)
        prev = -1
        for (j, v) in entries:
            step = j - prev - 1
            if 0 <= step <= 3 and not raw_cols:
                s.byte(step)
            else:
                s.byte(0xF0).wide(j, n_k)
            s.value(v)
            prev = j
    s.small(len(mutations), 3)
    for m in mutations:
        s.extend(bytes(m))
    s.byte(0 if max_per_row is None else 0x80 + max_per_row)
    s.small(block - 1, 40).small(range_ - 1, 40)
    for e in elements:
        s.value(e)
    return s


def csr_multihead_seed(n_q, n_k, B, H_kv, group, d=4, d_v=4, double=False, causal=False, accumulate=False,
                       width=2, scale=None):
    """Flag 64: B x H masks (bands) for the multi-head backward."""
    flags = 64 | (1 if double else 0) | (2 if causal else 0) | (8 if accumulate else 0) | (16 if scale else 0)
    s = Seed().byte(flags).small(n_q, 40).small(n_k, 40).byte(CSR_DIMS.index(d)).byte(CSR_DIMS.index(d_v))
    if scale:
        s.byte(round(scale * 16) + 96)
    s.small(B - 1, 1).small(H_kv - 1, 1).small(group - 1, 1)
    for k in range(B * H_kv * group):
        rows = band(n_q, n_k, width + k % 2, (lambda i: i + 1) if causal else None)
        for entries in rows:
            s.small(len(entries), 12)
            prev = -1
            for (j, v) in entries:
                s.byte(j - prev - 1).value(v)
                prev = j
        s.small(0, 3)
    return s


def band(n_q, n_k, width, causal_limit=None):
    rows = []
    for i in range(n_q):
        limit = n_k if causal_limit is None else causal_limit(i)
        rows.append([(j, ((i + j) % 7 - 3) / 4) for j in range(max(0, i - width), min(limit, i + width))][:12])
    return rows


def make_csr():
    t = "fuzz_csr"
    clear(t)
    write(t, "empty", csr_seed(0, 0))
    write(t, "no-keys", csr_seed(3, 0, accumulate=True, causal=True))  # the all-empty backward
    write(t, "one-entry", csr_seed(1, 1, rows=[[(0, 1.0)]]))
    write(t, "band-f32", csr_seed(20, 24, rows=band(20, 24, 3)))
    write(t, "band-f64", csr_seed(20, 24, double=True, rows=band(20, 24, 3)))
    write(t, "d64", csr_seed(9, 17, d=64, d_v=64, rows=band(9, 17, 4)))
    write(t, "d128", csr_seed(9, 17, d=128, d_v=128, double=True, rows=band(9, 17, 4)))
    write(t, "d64-dv16", csr_seed(9, 17, d=64, d_v=16, rows=band(9, 17, 4), block=1, range_=2))
    write(t, "causal-top-left", csr_seed(12, 12, causal=True, rows=band(12, 12, 3, lambda i: i + 1)))
    write(t, "causal-bottom-right", csr_seed(8, 14, causal=True, bottom_right=True,
                                             rows=band(8, 14, 3, lambda i: i + 14 - 8 + 1)))
    write(t, "causal-violated", csr_seed(6, 6, causal=True, rows=band(6, 6, 2), raw_cols=True))
    write(t, "accumulate-padded", csr_seed(10, 10, accumulate=True, pad=2, rows=band(10, 10, 2)))
    write(t, "padded-outputs", csr_seed(10, 13, d=17, d_v=9, pad=3, rows=band(10, 13, 5)))
    write(t, "negative-scale", csr_seed(7, 7, scale=-6.0, rows=band(7, 7, 1)))
    write(t, "huge-scale", csr_seed(7, 7, scale=-1.7e38, rows=band(7, 7, 1)))
    write(t, "scale-1e30", csr_seed(7, 7, scale="1e30", rows=band(7, 7, 1)))
    write(t, "scale-nan", csr_seed(7, 7, scale="nan", rows=band(7, 7, 1)))
    write(t, "nan-value", csr_seed(3, 3, rows=[[(0, "nan")], [], [(2, 1.0)]]))
    write(t, "inf-input", csr_seed(2, 2, rows=[[(0, 1.0)], [(1, 1.0)]], elements=["inf"]))
    write(t, "max-input", csr_seed(2, 2, double=True, rows=[[(0, 1.0)], [(1, 1.0)]], elements=["max", "max"]))
    write(t, "d0", csr_seed(2, 2, d=0, rows=[[(0, 1.0)], []]))
    write(t, "full-rows", csr_seed(4, 12, rows=[[(j, 0.5) for j in range(12)]] * 4, max_per_row=11))
    write(t, "row-limit", csr_seed(4, 12, rows=band(4, 12, 3), max_per_row=3))
    # Mutations: [kind, params...] as decode_mask reads them.
    write(t, "rows-int64-max", csr_seed(2, 3, rows=band(2, 3, 1), mutations=[[0, 0xF1]]))
    write(t, "rows-negative", csr_seed(2, 3, rows=band(2, 3, 1), mutations=[[0, 0xF0]]))
    write(t, "cols-2-62", csr_seed(2, 3, rows=band(2, 3, 1), mutations=[[1, 0xF2]]))
    write(t, "offset-huge", csr_seed(3, 3, rows=band(3, 3, 1), mutations=[[2, 1, 0xF1]]))
    write(t, "offsets-short", csr_seed(3, 3, rows=band(3, 3, 1), mutations=[[3]]))
    write(t, "offsets-long", csr_seed(3, 3, rows=band(3, 3, 1), mutations=[[4, 2]]))
    write(t, "extra-column", csr_seed(3, 3, rows=band(3, 3, 1), mutations=[[5, 1]]))
    write(t, "column-out-of-range", csr_seed(3, 3, rows=band(3, 3, 1), mutations=[[8, 0, 3]]))
    write(t, "column-negative", csr_seed(3, 3, rows=band(3, 3, 1), mutations=[[8, 1, 0xF0]]))
    write(t, "duplicate-column", csr_seed(2, 5, rows=[[(1, 1.0), (2, 1.0)], []], mutations=[[8, 1, 1]]))
    write(t, "value-inf", csr_seed(3, 3, rows=band(3, 3, 1), mutations=[[9, 0, 0xE1]]))
    write(t, "multihead-b2-gqa", csr_multihead_seed(6, 7, 2, 2, 2))
    write(t, "multihead-causal-accumulate", csr_multihead_seed(8, 8, 1, 1, 2, causal=True, accumulate=True,
                                                               double=True, d=16, d_v=8))
    write(t, "multihead-d64", csr_multihead_seed(5, 9, 2, 1, 1, d=64, d_v=64, scale=-1.5))
    write(t, "values-short", csr_seed(3, 3, rows=band(3, 3, 1), mutations=[[87]]))


# --- fuzz_heads: [flags] [scale] [threads] [save] [c] [seed] geometry [cu_seqlens] views... ---
HEAD_DIMS = [1, 2, 3, 4, 5, 8, 16, 0, 1, 2, 7, 64, 3, 4, 9, 1]


def heads_seed(B=2, S_q=5, S_k=6, H_kv=2, group=1, D=4, D_v=4, double=False, causal=False, bottom_right=False,
               accumulate=False, scale=None, threads=0, save="sus_mask", budget="paper", draw="systematic", c=4,
               varlen=None, cu_change=0, huge=None, q_layout=None, masked=None):
    flags = (1 if double else 0) | (2 if causal else 0) | (4 if bottom_right else 0) | (8 if accumulate else 0)
    flags |= (16 if scale is not None else 0) | (32 if varlen is not None else 0) | (64 if huge else 0)
    flags |= 128 if masked is not None else 0
    s = Seed().byte(flags)
    if scale is not None:
        s.byte(round(scale * 16) + 96)
    s.byte(threads if threads >= 0 else 0xF0)
    sv = ["lse_only", "dense_weights", "sus_mask"].index(save) | (4 if budget == "waterfill" else 0)
    s.byte(sv | (8 if draw == "independent" else 0)).byte(c - 1).byte(7)
    if huge:
        for v, m in zip(huge, (3, 6, 6, 3, 2, 8, 8)):
            s.wide(v, m)
    else:
        s.small(B, 3).small(S_q, 12).small(S_k, 12).small(H_kv, 3).small(group - 1, 2)
        s.byte(HEAD_DIMS.index(D)).byte(HEAD_DIMS.index(D_v))
    if varlen is not None:
        s.small(len(varlen), 4)
        for (q, k) in varlen:
            s.small(q, 6).small(k, 6)
        s.extend(bytes(cu_change))
    if q_layout is not None:  # Q's layout and extent bytes (then its elements: pseudo-random)
        s.extend(bytes(q_layout))
    return s


def make_heads():
    t = "fuzz_heads"
    clear(t)
    for save in ("sus_mask", "dense_weights", "lse_only"):
        write(t, f"bshd-{save}", heads_seed(save=save))
    write(t, "bshd-f64", heads_seed(double=True))
    write(t, "gqa-2x3", heads_seed(H_kv=2, group=3))
    write(t, "mqa", heads_seed(H_kv=1, group=3, S_q=7, S_k=9))
    write(t, "causal-top-left", heads_seed(causal=True, S_q=8, S_k=8))
    write(t, "causal-bottom-right", heads_seed(causal=True, bottom_right=True, S_q=4, S_k=9))
    write(t, "causal-bottom-right-more-queries", heads_seed(causal=True, bottom_right=True, S_q=9, S_k=4))
    write(t, "accumulate", heads_seed(accumulate=True))
    write(t, "waterfill-independent", heads_seed(budget="waterfill", draw="independent", c=2, S_k=12))
    write(t, "d64", heads_seed(D=64, D_v=64, B=1, H_kv=1))
    write(t, "dv-differs", heads_seed(D=3, D_v=9))
    write(t, "scale-negative", heads_seed(scale=-2.0))
    write(t, "threads-negative", heads_seed(threads=-1))
    write(t, "seq-0", heads_seed(S_q=0, S_k=0))
    write(t, "keys-0", heads_seed(S_q=3, S_k=0))
    write(t, "batch-0", heads_seed(B=0))
    write(t, "heads-0", heads_seed(H_kv=0))
    write(t, "dim-0", heads_seed(D=0))
    write(t, "varlen", heads_seed(varlen=[(3, 4), (0, 2), (5, 5)], causal=True))
    write(t, "varlen-empty-sequence", heads_seed(varlen=[(2, 0), (3, 3)]))
    write(t, "varlen-cu-short", heads_seed(varlen=[(3, 4), (2, 2)], cu_change=[2 | 1]))
    write(t, "varlen-batch-2", heads_seed(varlen=[(3, 4)], cu_change=[6, 2]))
    write(t, "bhsd-q", heads_seed(q_layout=[1, 0]))
    write(t, "padded-q", heads_seed(q_layout=[2, 1, 2, 3, 0]))
    write(t, "extent-short-q", heads_seed(q_layout=[0, 1]))
    write(t, "extent-unknown-q", heads_seed(q_layout=[0, 2]))
    write(t, "raw-strides-q", heads_seed(q_layout=[4, 40, 8, 4, 0]))
    write(t, "overlapping-q", heads_seed(q_layout=[4, 0, 0, 4, 0]))
    write(t, "huge-stride-q", heads_seed(q_layout=[4, 0xF2, 0xF1, 0xF3, 0]))
    # Score masks: Q, K, V spelled out (bshd, exact extent), O's layout, then the mask.
    for name, m, entries in (("bool-mask-shared", 0, [0x80, 0x80, 0x00, 0x80, 0x80, 0x80]),
                             ("bool-mask-per-head", 2 | 4, None), ("additive-mask", 16 | 1, None),
                             ("mask-wrong-cols", 8, [0x80] * 7)):
        B, S_q, S_k, H, D = 2, 5, 6, 2, 4
        seed = heads_seed(B=B, S_q=S_q, S_k=S_k, H_kv=H, D=D, D_v=D, masked=True)
        for n in (B * S_q * H * D, B * S_k * H * D, B * S_k * H * D):
            seed.extend(bytes([0, 0])).extend(bytes((k * 29 + 3) % 224 for k in range(n)))
        seed.extend(bytes([0, 0])).byte(m)
        if entries is None:
            count = (B if m & 1 else 1) * (H if m & 2 else 1) * (S_q if m & 4 else 1) * S_k
            entries = [(k * 53 + 17) % 256 for k in range(count)]
        seed.extend(bytes(entries))
        write(t, name, seed)
    # Huge sizes: [B, S_q, S_k, H_kv, group, D, D_v] through Reader.wide().
    write(t, "huge-batch-seq-0", heads_seed(huge=[2**62, 0, 0, 1, 1, 4, 4]))
    write(t, "huge-batch-dim-0", heads_seed(huge=[2**62, 3, 3, 1, 1, 0, 4]))
    write(t, "huge-heads-seq-0", heads_seed(huge=[2, 0, 0, 2**62, 1, 4, 4]))
    write(t, "huge-group-seq-0", heads_seed(huge=[1, 0, 3, 1, 2**62, 4, 4]))
    write(t, "huge-batch-heads", heads_seed(huge=[2**31, 0, 0, 2**32, 1, 4, 4]))
    write(t, "int64-max-batch", heads_seed(huge=[2**63 - 1, 0, 0, 1, 1, 1, 1]))
    write(t, "huge-seq", heads_seed(huge=[1, 2**62, 2, 1, 1, 4, 4]))
    write(t, "huge-dim", heads_seed(huge=[1, 2, 2, 1, 1, 2**62, 4]))
    write(t, "huge-stride-empty", heads_seed(huge=[1, 0, 0, 1, 1, 4, 4], q_layout=[4, 0xF1, 0xF1, 0xF1, 0]))


if __name__ == "__main__":
    make_sampler()
    make_csr()
    make_heads()
    for t in sorted(os.listdir(ROOT)):
        print(f"{t}: {len(os.listdir(os.path.join(ROOT, t)))} seeds", file=sys.stderr)
