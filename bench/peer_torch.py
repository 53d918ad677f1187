#!/usr/bin/python3
"""PyTorch CPU peers on the shapes sus_bench uses (single head, float, non-causal).

  torch_dense_fwd_bwd/n:N/d:D      softmax(s·Q·Kᵀ)·V forward + autograd backward (what a PyTorch
                                   user runs today; torch's own CPU kernels)
  torch_sus_backward/n:N/d:D/c:C   the SUS backward written the way a PyTorch user would: mask
                                   sampled from the dense W (paper/independent), torch.sparse CSR,
                                   dP by torch.sparse.sampled_addmm, dQ/dK/dV by sparse mm.
                                   Only the backward from a given mask is timed, like backward_sus.
Prints JSON: {"torch": version, "rows": [{"name", "ms"}, ...]} (medians).
"""
import argparse
import json
import math
import time

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def median_ms(fn, repetitions):
    fn()  # warm-up
    times = []
    for _ in range(repetitions):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def dense_fwd_bwd(Q, K, V, dO, s):
    q, k, v = (x.detach().requires_grad_() for x in (Q, K, V))

    def run():
        for x in (q, k, v):
            x.grad = None
        out = torch.softmax((q @ k.T) * s, dim=-1) @ v
        out.backward(dO)
    return run


def sus_backward(Q, K, V, dO, s, c, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W = torch.softmax((Q @ K.T) * s, dim=-1)
        O = W @ V
        q = torch.clamp(c * W, max=1.0)
        keep = torch.rand(W.shape, generator=g) < q
        Wt = torch.where(keep, W / q, torch.zeros_like(W)).to_sparse_csr()
    D = (dO * O).sum(-1)
    crow, col = Wt.crow_indices(), Wt.col_indices()
    rows = torch.repeat_interleave(torch.arange(W.shape[0]), crow[1:] - crow[:-1])

    def run():
        with torch.no_grad():
            # dP on the mask (SDDMM), dS = W̃ (dP − D)
            dP = torch.sparse.sampled_addmm(Wt, dO, V.T, beta=0.0, alpha=1.0)
            dS = torch.sparse_csr_tensor(crow, col, Wt.values() * (dP.values() - D[rows]), size=W.shape)
            dQ = s * (dS @ K)
            dK = s * (dS.t() @ Q)  # transposed sparse mm
            dV = Wt.t() @ dO
        return dQ, dK, dV
    return run, Wt._nnz()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--c", type=int, nargs="+", default=[32])
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for n in a.n:
        d = a.d
        Q, K = 1.5 * torch.randn(n, d), 1.5 * torch.randn(n, d)
        V, dO = torch.randn(n, d), torch.randn(n, d)
        s = 1.0 / math.sqrt(d)
        rows.append({"name": f"torch_dense_fwd_bwd/n:{n}/d:{d}", "ms": median_ms(dense_fwd_bwd(Q, K, V, dO, s), a.repetitions)})
        for c in a.c:
            run, nnz = sus_backward(Q, K, V, dO, s, c, seed=7)
            rows.append({"name": f"torch_sus_backward/n:{n}/d:{d}/c:{c}", "ms": median_ms(run, a.repetitions), "nnz": nnz})
    blas = [line.strip() for line in torch.__config__.show().splitlines() if "BLAS_INFO" in line]
    blas_info = blas[0].split("BLAS_INFO=")[1].split(",")[0] if blas else "unknown"
    print(json.dumps({"torch": torch.__version__, "blas": blas_info, "threads": a.threads, "rows": rows}))


if __name__ == "__main__":
    main()
