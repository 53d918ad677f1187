#!/usr/bin/python3
"""sus_torch against PyTorch autograd attention, and the binding's overhead (issue 34, item 8).

For n in --sizes (B = 1, H = 8, D = 64, causal, float32, --threads torch threads), one
forward + backward of
  torch   softmax(q·kᵀ/√D, causal)·v in plain PyTorch ops, backward by autograd (written lean:
          the scale folded into q and the mask applied in place, so n = 8192 fits in ~6 GiB)
  dense   sus_torch.attention(backward="dense")   (saves W: exact)
  sus     sus_torch.attention(backward="sus", c)  (saves the SUS masks)
The three run interleaved, repetition by repetition; medians are reported.

Overhead at --overhead-n: the op's forward + backward through Python and autograd (fresh
output and gradient tensors each call, as autograd needs) against the same library calls made
from C++ inside the extension with caller-owned buffers allocated once
(torch.ops.sus._time_library: the same machine code, the same inputs), alternated call by
call; overhead = median(op) / median(C++) − 1.

Writes OUT.json and OUT.md (default results/torch_bench). The BLAS torch loaded is recorded:
Debian's torch calls libblas.so.3, the reference (netlib) BLAS unless an optimised one is the
system alternative; for a fair baseline run with OpenBLAS (Debian: libopenblas0-pthread),
without changing the system's choice:

    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-pthread PYTHONPATH=python \
        /usr/bin/python3 bench/torch_bench.py

OpenBLAS gets --threads threads too (OPENBLAS_NUM_THREADS, set before torch loads).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

torch = sus_torch = None  # imported in main(), after OPENBLAS_NUM_THREADS is set


def import_torch():
    global torch, sus_torch
    import torch
    try:
        import sus_torch
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        import sus_torch


def loaded_blas():
    """The BLAS shared object(s) mapped into this process."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "blas" in line.lower() and "/" in line}
    return sorted(paths)


def torch_attention(q, k, v, causal_mask):
    """[B, S, H, D] -> [B, S, H, D]: the attention a PyTorch 1.13 user writes (no SDPA in 1.13)."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q * (1.0 / math.sqrt(q.shape[-1])), k, v))
    s = qh @ kh.transpose(-1, -2)            # [B, H, S, S]
    s.masked_fill_(causal_mask, float("-inf"))  # in place: matmul's backward does not need s
    return (s.softmax(-1) @ vh).transpose(1, 2)


def fwd_bwd(fn, q, k, v, G):
    """Seconds of the forward and of the backward."""
    for x in (q, k, v):
        x.grad = None
    t0 = time.perf_counter()
    out = fn(q, k, v)
    t1 = time.perf_counter()
    out.backward(G)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--c", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repetitions", type=int, default=0, help="per size (0: 7, 5, 3 for n <= 2048, 4096, more)")
    ap.add_argument("--overhead-n", type=int, default=4096)
    ap.add_argument("--overhead-pairs", type=int, default=15)
    ap.add_argument("--out", default="results/torch_bench")
    args = ap.parse_args()
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import_torch()
    torch.set_num_threads(args.threads)
    H, D = args.heads, args.dim
    rows = []
    for n in args.sizes:
        reps = args.repetitions or (7 if n <= 2048 else 5 if n <= 4096 else 3)
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, n, H, D, generator=g).requires_grad_() for _ in range(3))
        G = torch.randn(1, n, H, D, generator=g)
        causal_mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        impls = {
            "torch": lambda q, k, v: torch_attention(q, k, v, causal_mask),
            "dense": lambda q, k, v: sus_torch.attention(q, k, v, causal=True, backward="dense"),
            "sus": lambda q, k, v: sus_torch.attention(q, k, v, causal=True, backward="sus", c=args.c),
        }
        times = {name: [] for name in impls}
        for name, fn in impls.items():  # warm-up: allocator, OpenMP team, workspaces
            fwd_bwd(fn, q, k, v, G)
        for _ in range(reps):
            for name, fn in impls.items():
                times[name].append(fwd_bwd(fn, q, k, v, G))
        row = {"n": n, "repetitions": reps}
        for name, ts in times.items():
            row[name] = {"forward_ms": 1e3 * statistics.median(t[0] for t in ts),
                         "backward_ms": 1e3 * statistics.median(t[1] for t in ts),
                         "total_ms": 1e3 * statistics.median(t[0] + t[1] for t in ts)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, G, causal_mask

    n = args.overhead_n
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, H, D, generator=g).requires_grad_() for _ in range(3))
    G = torch.randn(1, n, H, D, generator=g)
    sampler = f"c={args.c},budget=paper,draw=systematic"
    op = lambda q, k, v: sus_torch.attention(q, k, v, causal=True, backward="sus", c=args.c)  # noqa: E731
    cpp = lambda: torch.ops.sus._time_library(q.detach(), k.detach(), v.detach(), G, True, "sus", sampler, 7, 1)[0]  # noqa
    fwd_bwd(op, q, k, v, G)
    cpp()
    op_s, cpp_s = [], []
    for i in range(args.overhead_pairs):  # alternate A/B, starting with each half the time
        pair = [lambda: sum(fwd_bwd(op, q, k, v, G)), cpp]
        if i % 2:
            pair.reverse()
        a, b = pair[0](), pair[1]()
        op_s.append(a if i % 2 == 0 else b)
        cpp_s.append(b if i % 2 == 0 else a)
    overhead = {"n": n, "pairs": args.overhead_pairs, "op_ms": 1e3 * statistics.median(op_s),
                "cpp_ms": 1e3 * statistics.median(cpp_s),
                "paired_ratio_median": statistics.median(a / b for a, b in zip(op_s, cpp_s))}
    overhead["overhead"] = overhead["op_ms"] / overhead["cpp_ms"] - 1
    print(json.dumps(overhead), flush=True)

    meta = {"torch": torch.__version__, "blas": loaded_blas(), "threads": args.threads, "cpu": cpu_model(),
            "heads": H, "dim": D,
            "c": args.c, "causal": True, "dtype": "float32", "batch": 1}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "overhead": overhead}, f, indent=1)
    lines = [
        "# sus_torch against PyTorch autograd attention",
        "",
        f"`bench/torch_bench.py`: B = 1, H = {H}, D = {D}, causal, float32, c = {args.c} (paper/systematic), "
        f"{args.threads} torch thread(s), torch {torch.__version__}, {meta['cpu']}, BLAS "
        f"{', '.join(meta['blas']) or 'none found'}. Medians of interleaved repetitions; forward + backward in ms.",
        "",
        "| n | torch autograd | sus_torch dense | sus_torch SUS | torch / SUS | SUS backward | dense backward | torch backward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']} | {r['torch']['total_ms']:.0f} | {r['dense']['total_ms']:.0f} | "
                     f"{r['sus']['total_ms']:.0f} | {r['torch']['total_ms'] / r['sus']['total_ms']:.2f}x | "
                     f"{r['sus']['backward_ms']:.0f} | {r['dense']['backward_ms']:.0f} | {r['torch']['backward_ms']:.0f} |")
    lines += [
        "",
        f"Binding overhead at n = {n} (SUS forward + backward, {args.overhead_pairs} alternated pairs): through the op "
        f"{overhead['op_ms']:.1f} ms, the same library calls from C++ {overhead['cpp_ms']:.1f} ms: "
        f"**{100 * overhead['overhead']:+.1f}%** (median of the per-pair ratios: "
        f"{100 * (overhead['paired_ratio_median'] - 1):+.1f}%).",
        "",
    ]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
