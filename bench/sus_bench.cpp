// sus_bench — the sparse (SUS) attention backward against an honest dense baseline and the
// machine's own GEMM rate, in one binary so ratios are taken in one run.
//
// Case names (read by bench/report):
//   gemm_roofline/n:N/d:D         only the GEMMs of the forward, with exactly its shapes: per
//                                 block of row_block query rows, S_b = Q_b·Kᵀ and O_b = S_b·V
//                                 (no softmax). Flop model 4·n²·d. (Full-size n x n GEMMs are
//                                 slower here: S round-trips memory.) The rate the dense kernels
//                                 are measured against.
//   forward_dense/n:N/d:D         attention_forward + LogSumExp (no n x n kept). 4·n²·d flops.
//   forward_sus/n:N/d:D/c:C       attention_forward + recorders(LogSumExp, SusMask) (fused
//                                 sampling). 4·n²·d flops.
//   forward_pair/n:N/d:D/c:C      forward_dense and forward_sus back to back in every iteration
//                                 (their order alternating), each timed on its own: counter
//                                 sus_over_dense is the median over the iterations of the pair's
//                                 time ratio, a figure a slow spell of the host moves far less
//                                 than the ratio of two medians taken minutes apart (target 3's
//                                 context). 5 pairs per repetition.
//   backward_dense/n:N/d:D        attention_backward_dense from recorded W. 8·n²·d flops.
//   backward_sus/n:N/d:D/c:C      attention_backward_sparse on a SusMask. 8·nnz·d flops
//                                 (SDDMM, SpMM, two transposed SpMMs: 2·d each per kept entry).
//   gather_roofline/n:N/d:D/c:C   the memory traffic of the key-blocked fused kernel alone
//                                 (sparse_backward_blocked: heads above one key block where the L2
//                                 holds blocks of 1 MiB or more), on backward_sus's mask:
//                                 the key blocks packed as that kernel packs them ([K_j | V_j |
//                                 gK_j | gV_j], key_block_bytes() each), and for every kept entry,
//                                 in its order, K_j and V_j read and gK_j, gV_j read and written
//                                 (16 cache lines at d = 64); no dot products, no dQ. Contiguous
//                                 single heads larger than one block run this kernel where the
//                                 L2 holds blocks of 1 MiB or more, and the split passes (which
//                                 pay no per-block visit of every query row and can run below
//                                 this floor) where it does not: the context entry
//                                 sus_sparse_kernel says which ran.
//   split_roofline/n:N/d:D/c:C    the memory traffic of the split passes alone (sparse_backward_split:
//                                 the kernel of contiguous single heads above one key block where
//                                 the L2 holds blocks under 1 MiB), on backward_sus's mask: K, V
//                                 packed key by key as that kernel packs them; per kept entry, in
//                                 row order, [K_j | V_j] read by one dot of 2·d values and a dS
//                                 value stored (rows pass), then [gK_j | gV_j] updated by the
//                                 kernel's scatter (keys pass, Q_i and dO_i read per row), with
//                                 the kernel's prefetches; dQ, dK, dV stored; none of the rows
//                                 pass's own arithmetic (its dot, axpy and D_i).
//   sample/n:N/c:C                sample_mask on a recorded W (n x n), paper/independent.
//   backward_lowrank/n:N/d:D/g:G  sus::lowrank::attention_backward of degree G (sus/lowrank.hpp)
//                                 from the forward's lse. 8·n·r·d·d flops, r = C(d + G, G)
//                                 (its four state products); linear in n at fixed d and G.
// Single head, non-causal, d_v = d, float, Q, K ~ N(0, 1.5²) (mildly peaked attention).
// Threads: the binary links OpenMP, so Eigen runs the single-head cases' GEMMs on
// OMP_NUM_THREADS threads (all cores when unset); bench/report sets it (1 unless --threads).
//
// Multi-head shape (B = 1, H heads, through multihead_attention_forward / _backward, [B, S, H, D]
// layout), the same kinds with two more arguments, flops x H:
//   forward_dense/n:N/d:D/h:H/threads:T       (saves lse only)
//   forward_sus/n:N/d:D/c:C/h:H/threads:T     (saves the SUS masks)
//   backward_dense/n:N/d:D/h:H/threads:T      (from saved dense W)
//   backward_sus/n:N/d:D/c:C/h:H/threads:T
// T = OpenMP threads (num_threads); the forward splits (head, row block); backward_dense splits
// heads, so h:1 runs on one thread whatever T; backward_sus splits heads when there are at
// least 4 per thread, else runs the two-pass schedule (rows, then keys, each split), so h:1
// uses every thread.
// Counters: GFLOP/s (flop model above), nnz (kept entries), kept_per_row.
#include <benchmark/benchmark.h>
#include <sus/lowrank.hpp>
#include <sus/sus.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Mat = sus::Matrix<float>;
using sus::index_t;

struct Inputs {
  Mat Q, K, V, dO;
  explicit Inputs(index_t n, index_t d) {
    std::mt19937_64 gen(n * 1000 + d);
    std::normal_distribution<float> qk(0.0f, 1.5f), v(0.0f, 1.0f);
    auto fill = [&](index_t r, index_t c, std::normal_distribution<float>& dist) {
      Mat m(r, c);
      for (index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
      return m;
    };
    Q = fill(n, d, qk);
    K = fill(n, d, qk);
    V = fill(n, d, v);
    dO = fill(n, d, v);
  }
};

// Inputs are built once per (n, d) and shared by every case of that shape.
const Inputs& inputs(index_t n, index_t d) {
  static std::map<std::pair<index_t, index_t>, std::unique_ptr<Inputs>> cache;
  auto& slot = cache[{n, d}];
  if (!slot) slot = std::make_unique<Inputs>(n, d);
  return *slot;
}

const sus::SamplerOptions sampler(int c) { return {c, sus::Budget::paper, sus::Draw::independent, 7}; }

// nnz and kept entries per row of a sampled mask, as counters.
void set_mask_counters(benchmark::State& state, const sus::Csr<float>& mask) {
  state.counters["nnz"] = static_cast<double>(mask.nnz());
  state.counters["kept_per_row"] = static_cast<double>(mask.nnz()) / static_cast<double>(mask.rows);
}

void set_rate(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// One untimed call of `run`, then the timed loop. A case's output buffers (and the mask's, and
// a first call's workspaces) are freshly allocated for every repetition, and their first writes
// pay the page faults of their new memory, which a training loop that reuses its buffers does
// not: with few iterations per repetition those faults landed in the median (the
// [1, 8192, 8, 64] SUS backward on one thread, whose dQ, dK, dV are 48 MiB: 200-214 ms a call
// without the untimed call, 68-70 ms with it; 2026-12-07, AMD EPYC KVM guest).
template <class F>
void timed_loop(benchmark::State& state, F&& run) {
  run();
  for (auto _ : state) run();
}

void gemm_roofline(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const Inputs& in = inputs(n, d);
  constexpr index_t Br = sus::detail::ForwardConfig::row_block;
  Mat S(Br, n), O(n, d);
  timed_loop(state, [&] {
    for (index_t i0 = 0; i0 < n; i0 += Br) {
      const index_t rows = std::min(Br, n - i0);
      S.topRows(rows).noalias() = in.Q.middleRows(i0, rows) * in.K.transpose();
      O.middleRows(i0, rows).noalias() = S.topRows(rows) * in.V;
    }
    benchmark::DoNotOptimize(O.data());
    benchmark::ClobberMemory();
  });
  set_rate(state, 4.0 * n * n * d);
}

void forward_dense(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const Inputs& in = inputs(n, d);
  Mat O(n, d);
  sus::LogSumExp<float> lse;
  timed_loop(state, [&] {
    sus::attention_forward(in.Q, in.K, in.V, O, lse);
    benchmark::DoNotOptimize(O.data());
  });
  set_rate(state, 4.0 * n * n * d);
}

void forward_sus(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const int c = static_cast<int>(state.range(2));
  const Inputs& in = inputs(n, d);
  Mat O(n, d);
  sus::LogSumExp<float> lse;
  sus::SusMask<float> mask(sampler(c));
  timed_loop(state, [&] {
    sus::attention_forward(in.Q, in.K, in.V, O, sus::recorders(lse, mask));
    benchmark::DoNotOptimize(mask.mask.values.data());
  });
  set_rate(state, 4.0 * n * n * d);
  set_mask_counters(state, mask.mask);
}

void forward_pair(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const int c = static_cast<int>(state.range(2));
  const Inputs& in = inputs(n, d);
  Mat O(n, d);
  sus::LogSumExp<float> lse;
  sus::SusMask<float> mask(sampler(c));
  const auto timed = [](auto&& run) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const auto dense = [&] {
    sus::attention_forward(in.Q, in.K, in.V, O, lse);
    benchmark::DoNotOptimize(O.data());
  };
  const auto with_mask = [&] {
    sus::attention_forward(in.Q, in.K, in.V, O, sus::recorders(lse, mask));
    benchmark::DoNotOptimize(mask.mask.values.data());
  };
  dense(), with_mask();  // untimed: the first calls grow the workspaces and the mask's buffers
  std::vector<double> ratios;
  for (auto _ : state) {
    const bool sus_first = ratios.size() % 2 == 1;
    const double t_sus_first = sus_first ? timed(with_mask) : 0;
    const double t_dense = timed(dense);
    const double t_sus = sus_first ? t_sus_first : timed(with_mask);
    ratios.push_back(t_sus / t_dense);
  }
  std::sort(ratios.begin(), ratios.end());
  const std::size_t m = ratios.size();
  state.counters["sus_over_dense"] = m % 2 ? ratios[m / 2] : 0.5 * (ratios[m / 2 - 1] + ratios[m / 2]);
  set_mask_counters(state, mask.mask);
}

void backward_dense(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const Inputs& in = inputs(n, d);
  sus::DenseWeights<float> W;
  Mat O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  sus::attention_forward(in.Q, in.K, in.V, O, W);
  timed_loop(state, [&] {
    sus::attention_backward_dense(in.Q, in.K, in.V, O, in.dO, W.W, dQ, dK, dV);
    benchmark::DoNotOptimize(dV.data());
  });
  set_rate(state, 8.0 * n * n * d);
}

// backward_sus's mask (and the rooflines'): the forward with fused sampling of c per row on
// `in`, its output written to O.
sus::SusMask<float> sampled_forward(const Inputs& in, int c, Mat& O) {
  sus::SusMask<float> mask(sampler(c));
  sus::attention_forward(in.Q, in.K, in.V, O, mask);
  return mask;
}

void backward_sus(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const int c = static_cast<int>(state.range(2));
  const Inputs& in = inputs(n, d);
  Mat O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  const sus::SusMask<float> mask = sampled_forward(in, c, O);
  timed_loop(state, [&] {
    sus::attention_backward_sparse(in.Q, in.K, in.V, O, in.dO, mask.mask, dQ, dK, dV);
    benchmark::DoNotOptimize(dV.data());
  });
  set_rate(state, 8.0 * static_cast<double>(mask.mask.nnz()) * d);
  set_mask_counters(state, mask.mask);
}

void gather_roofline(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const int c = static_cast<int>(state.range(2));
  const Inputs& in = inputs(n, d);
  Mat O(n, d), dK(n, d), dV(n, d);
  const sus::SusMask<float> sus_mask = sampled_forward(in, c, O);
  const sus::Csr<float>& mask = sus_mask.mask;
  const index_t w = 4 * d;  // packed values per key, as in sparse_backward_blocked
  const index_t block_keys = std::max<index_t>(1, std::min<index_t>(n, sus::detail::key_block_bytes() / (w * 4)));
  float* packed = sus::detail::thread_workspace<float>(block_keys * w);
  alignas(64) float acc[512] = {};  // 2·d values (d <= 256)
  if (2 * d > 512) {
    state.SkipWithError("gather_roofline: d > 256");
    return;
  }
  std::vector<index_t> cursor;
  const index_t* col = mask.col_indices.data();
  timed_loop(state, [&] {
    cursor.assign(mask.row_offsets.begin(), mask.row_offsets.end() - 1);
    for (index_t j0 = 0; j0 < n; j0 += block_keys) {
      const index_t j1 = std::min(n, j0 + block_keys);
      for (index_t j = j0; j < j1; ++j) {
        float* r = packed + (j - j0) * w;
        std::memcpy(r, in.K.row(j).data(), std::size_t(d) * sizeof(float));
        std::memcpy(r + d, in.V.row(j).data(), std::size_t(d) * sizeof(float));
        std::fill(r + 2 * d, r + w, 0.0f);
      }
      for (index_t i = 0; i < n; ++i) {
        index_t p = cursor[i];
        const index_t end = mask.row_offsets[i + 1];
        for (; p < end && col[p] < j1; ++p) {
          float* r = packed + (col[p] - j0) * w;
          for (index_t k = 0; k < 2 * d; ++k) acc[k] += r[k];        // read K_j, V_j
          for (index_t k = 0; k < 2 * d; ++k) r[2 * d + k] += acc[k];  // update gK_j, gV_j
        }
        cursor[i] = p;
      }
      for (index_t j = j0; j < j1; ++j) {  // the kernel's store of dK, dV
        const float* r = packed + (j - j0) * w;
        std::memcpy(dK.row(j).data(), r + 2 * d, std::size_t(d) * sizeof(float));
        std::memcpy(dV.row(j).data(), r + 3 * d, std::size_t(d) * sizeof(float));
      }
    }
    benchmark::DoNotOptimize(dV.data());
    benchmark::ClobberMemory();
  });
  set_mask_counters(state, mask);
}

// The split passes' memory traffic alone (sparse_backward_split, the kernel of large single
// heads where the L2 is small), on backward_sus's mask, with the kernel's layout, order and
// prefetches: K, V packed key by key into the workspace; rows pass: for every kept entry in row
// order [K_j | V_j] read by one dot of 2·d values (8 cache lines at d = 64; the kernel's dot
// and axpy, and its D_i, are not done) and one value stored (dS), a row stored per query (dQ);
// keys pass: Q_i and dO_i read per row, [gK_j | gV_j] updated by the kernel's own scatter for
// every kept entry (8 lines), then dK, dV stored.
void split_roofline(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  const int c = static_cast<int>(state.range(2));
  if (2 * d > 512) {
    state.SkipWithError("split_roofline: d > 256");
    return;
  }
  const Inputs& in = inputs(n, d);
  Mat O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  const sus::SusMask<float> sus_mask = sampled_forward(in, c, O);
  const sus::Csr<float>& mask = sus_mask.mask;
  const index_t w = 2 * d, nnz = mask.nnz(), dS_at = sus::detail::line_padded<float>(nnz);
  constexpr index_t ahead = sus::detail::SparseBackwardConfig::prefetch_distance;
  const index_t* col = mask.col_indices.data();
  const float* val = mask.values.data();
  alignas(64) float ones[512];
  std::fill(ones, ones + 512, 1.0f);
  timed_loop(state, [&] {
    float* ws = sus::detail::thread_workspace<float, 1>(dS_at + n * w);
    float* dS = ws;
    sus::detail::pack_key_rows<float>(in.K, in.V, ws + dS_at);
    const float* kv = ws + dS_at;
    for (index_t i = 0; i < n; ++i) {  // rows pass
      for (index_t p = mask.row_offsets[i]; p < mask.row_offsets[i + 1]; ++p) {
        if (p + ahead < nnz) sus::detail::prefetch(kv + col[p + ahead] * w, w * index_t(sizeof(float)), false);
        dS[p] = val[p] * sus::detail::dot(kv + col[p] * w, ones, w);  // reads [K_j | V_j]
      }
      std::memcpy(dQ.row(i).data(), ones, std::size_t(d) * sizeof(float));
    }
    float* g = sus::detail::thread_workspace<float>(n * w);
    std::fill(g, g + n * w, 0.0f);
    for (index_t i = 0; i < n; ++i) {  // keys pass
      const float* q = in.Q.row(i).data();
      const float* o = in.dO.row(i).data();
      const index_t p1 = mask.row_offsets[i + 1];
      for (index_t p = mask.row_offsets[i]; p < p1; ++p) {
        if (p + ahead < p1) sus::detail::prefetch(g + col[p + ahead] * w, w * index_t(sizeof(float)), true);
        float* r = g + col[p] * w;
        sus::detail::axpy(dS[p], q, r, d);  // the kernel's scatter: gK_j += dS_ij Q_i, gV_j += W̃_ij dO_i
        sus::detail::axpy(val[p], o, r + d, d);
      }
    }
    for (index_t j = 0; j < n; ++j) {
      std::memcpy(dK.row(j).data(), g + j * w, std::size_t(d) * sizeof(float));
      std::memcpy(dV.row(j).data(), g + j * w + d, std::size_t(d) * sizeof(float));
    }
    benchmark::DoNotOptimize(dV.data());
    benchmark::DoNotOptimize(dQ.data());
    benchmark::ClobberMemory();
  });
  set_mask_counters(state, mask);
}

void backward_lowrank(benchmark::State& state) {
  const index_t n = state.range(0), d = state.range(1);
  sus::lowrank::Options lo;
  lo.degree = static_cast<int>(state.range(2));
  const Inputs& in = inputs(n, d);
  sus::LogSumExp<float> lse;
  Mat O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  sus::attention_forward(in.Q, in.K, in.V, O, lse);
  timed_loop(state, [&] {
    sus::lowrank::attention_backward<float>(in.Q, in.K, in.V, O, in.dO, lse.lse, dQ, dK, dV, {}, lo);
    benchmark::DoNotOptimize(dV.data());
  });
  const double r = static_cast<double>(sus::lowrank::feature_dim(d, lo.degree));
  set_rate(state, 8.0 * static_cast<double>(n) * r * d * d);
  state.counters["r"] = r;
}

void sample(benchmark::State& state) {
  const index_t n = state.range(0);
  const int c = static_cast<int>(state.range(1));
  const Inputs& in = inputs(n, 64);
  sus::DenseWeights<float> W;
  Mat O(n, 64);
  sus::attention_forward(in.Q, in.K, in.V, O, W);
  index_t nnz = 0;
  timed_loop(state, [&] {
    const auto mask = sus::sample_mask(W.W, sampler(c));
    nnz = mask.nnz();
    benchmark::DoNotOptimize(mask.values.data());
  });
  state.counters["nnz"] = static_cast<double>(nnz);
  state.counters["entries/s"] =
      benchmark::Counter(static_cast<double>(n) * n, benchmark::Counter::kIsIterationInvariantRate);
}

// --- multi-head shape: B = 1, H heads, [B, S, H, D] ---
enum class MhKind { forward_dense, forward_sus, backward_dense, backward_sus };

// Args: n, d, [c,] h, threads.
template <MhKind kind>
void multihead(benchmark::State& state) {
  const bool has_c = kind == MhKind::forward_sus || kind == MhKind::backward_sus;
  const index_t n = state.range(0), d = state.range(1), h = state.range(has_c ? 3 : 2);
  const int c = has_c ? static_cast<int>(state.range(2)) : 0;
  const int threads = static_cast<int>(state.range(has_c ? 4 : 3));
  const Inputs& in = inputs(n, h * d);  // n x (h·d) row-major: the [1, n, h, d] layout
  Mat O(n, h * d), dQ(n, h * d), dK(n, h * d), dV(n, h * d);
  auto view = [&](const Mat& x) { return sus::bshd(x, 1, n, h, d); };
  auto out = [&](Mat& x) { return sus::bshd(x, 1, n, h, d); };
  sus::MultiHeadOptions options;
  options.num_threads = threads;
  sus::AttentionState<float> st;
  st.save = kind == MhKind::forward_dense ? sus::SaveForBackward::lse_only
            : kind == MhKind::backward_dense ? sus::SaveForBackward::dense_weights
                                             : sus::SaveForBackward::sus_mask;
  st.sampler = sampler(c > 0 ? c : 1);
  const bool forward = kind == MhKind::forward_dense || kind == MhKind::forward_sus;
  if (!forward) sus::multihead_attention_forward(view(in.Q), view(in.K), view(in.V), out(O), st, options);
  timed_loop(state, [&] {
    if (forward) {
      sus::multihead_attention_forward(view(in.Q), view(in.K), view(in.V), out(O), st, options);
      benchmark::DoNotOptimize(O.data());
    } else {
      sus::multihead_attention_backward(view(in.Q), view(in.K), view(in.V), view(O), view(in.dO), st, out(dQ),
                                        out(dK), out(dV), options);
      benchmark::DoNotOptimize(dV.data());
    }
  });
  index_t nnz = 0;
  for (const auto& m : st.masks) nnz += m.nnz();
  const double dense_flops = (forward ? 4.0 : 8.0) * static_cast<double>(n) * n * d * h;
  set_rate(state, kind == MhKind::backward_sus ? 8.0 * static_cast<double>(nnz) * d : dense_flops);
  if (has_c) {
    state.counters["nnz"] = static_cast<double>(nnz);
    state.counters["kept_per_row"] = static_cast<double>(nnz) / static_cast<double>(n * h);
  }
}

const std::vector<int64_t> kN = {1024, 2048, 4096, 8192, 16384};
const std::vector<int64_t> kD = {64, 128};
const std::vector<int64_t> kC = {16, 32, 64};

}  // namespace

BENCHMARK(gemm_roofline)->ArgNames({"n", "d"})->ArgsProduct({kN, kD})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(forward_dense)->ArgNames({"n", "d"})->ArgsProduct({kN, kD})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(forward_sus)->ArgNames({"n", "d", "c"})->ArgsProduct({kN, kD, kC})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(forward_pair)->ArgNames({"n", "d", "c"})->ArgsProduct({{4096, 8192}, {64}, {32}})->Iterations(5)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(backward_dense)->ArgNames({"n", "d"})->ArgsProduct({kN, kD})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(backward_sus)->ArgNames({"n", "d", "c"})->ArgsProduct({kN, kD, kC})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(gather_roofline)->ArgNames({"n", "d", "c"})->ArgsProduct({kN, {64}, kC})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(split_roofline)->ArgNames({"n", "d", "c"})->ArgsProduct({kN, {64}, {32}})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(sample)->ArgNames({"n", "c"})->ArgsProduct({kN, kC})->Unit(benchmark::kMillisecond)->UseRealTime();

// The low-rank comparison estimator: linear in n; r = C(d + g, g) grows fast with d and g.
BENCHMARK(backward_lowrank)->ArgNames({"n", "d", "g"})->ArgsProduct({kN, {16}, {1, 2}})
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(backward_lowrank)->ArgNames({"n", "d", "g"})->ArgsProduct({kN, {64}, {1}})
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(backward_lowrank)->ArgNames({"n", "d", "g"})->ArgsProduct({{1024, 2048}, {64}, {2}})
    ->Unit(benchmark::kMillisecond)->UseRealTime();

// Multi-head shape, 1 and 2 threads. (backward_dense keeps n x n W per head: n = 2048 only.)
const std::vector<int64_t> kMhN = {2048, 8192};
const std::vector<int64_t> kMhH = {1, 8};
const std::vector<int64_t> kThreads = {1, 2};
BENCHMARK_TEMPLATE(multihead, MhKind::forward_dense)->Name("forward_dense")->ArgNames({"n", "d", "h", "threads"})
    ->ArgsProduct({kMhN, {64}, kMhH, kThreads})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(multihead, MhKind::forward_sus)->Name("forward_sus")->ArgNames({"n", "d", "c", "h", "threads"})
    ->ArgsProduct({kMhN, {64}, {32}, kMhH, kThreads})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(multihead, MhKind::backward_dense)->Name("backward_dense")->ArgNames({"n", "d", "h", "threads"})
    ->ArgsProduct({{2048}, {64}, kMhH, kThreads})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(multihead, MhKind::backward_sus)->Name("backward_sus")->ArgNames({"n", "d", "c", "h", "threads"})
    ->ArgsProduct({kMhN, {64}, {32}, kMhH, kThreads})->Unit(benchmark::kMillisecond)->UseRealTime();

// Which kernel backward_sus's single heads above one key block run on this machine (it depends
// on the L2 size: detail::split_passes_for_large_heads), in the JSON context.
const bool kSparseKernelContext = [] {
  benchmark::AddCustomContext("sus_sparse_kernel",
                              std::string(sus::detail::split_passes_for_large_heads() ? "split passes" : "key blocks") +
                                  " (key blocks of " + std::to_string(sus::detail::key_block_bytes() >> 10) + " KiB)");
  return true;
}();

BENCHMARK_MAIN();
