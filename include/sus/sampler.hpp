// sus — the SUS sampler: a row of softmax weights W_i· -> at most ~c kept entries, rescaled.
//
// Each entry j of row i is kept with probability q_ij and stored as W̃_ij = W_ij / q_ij,
// so E[W̃] = W and every gradient linear in W̃ is unbiased (docs/method.md).
//
// Budget (what q is):
//   paper     q_j = min(1, c·W_j)                          Σ_j q_j ≤ c
//   waterfill q_j = min(1, λ·W_j), λ ≥ c chosen so that    Σ_j q_j = min(c, #{j: W_j > 0})
// Draw (how the kept set is drawn given q):
//   independent  entries kept independently, P(keep j) = q_j (the paper's estimator)
//   systematic   one uniform u per row; j is kept iff some point u + k (k integer) falls in
//                [C_{j-1}, C_j), C_j = Σ_{l≤j} q_l. P(keep j) = q_j and a row keeps at most
//                ⌈Σ q⌉ ≤ c entries: a hard cap.
//
// Both draws are one scan over the row that places points on a cumulative axis and keeps
// the entries whose interval holds a point:
//   systematic:  intervals of length q_j, points u, u+1, u+2, ...
//   independent: intervals of length h_j = −log(1 − q_j), points of a unit-rate Poisson
//                process (exponential gaps). A Poisson process puts at least one point in an
//                interval of length h with probability 1 − e^{−h} = q, independently for
//                disjoint intervals: exactly independent Bernoulli(q_j) draws, using O(kept)
//                random numbers instead of one per entry. Entries with q_j = 1 are always kept.
//                The scan works in survival space (products of 1 − q_j), so it needs no logs.
// The scan tests chunks of 16 entries, four at a time, in vector code, and walks entry by entry
// only through chunks that hold a point: one pass over the row plus O(kept · chunk). For the
// paper budget, q = min(1, c·w) is computed inside that pass, not stored.
//
// Random numbers come from Philox4x32-10 keyed by the seed, with the row index in the counter:
// a row's draw depends only on (seed, row, W_i·) — not on processing order or thread count.
// Probabilities are computed in double from the weights; they are exact up to rounding.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "csr.hpp"
#include "detail/philox.hpp"
#include "error.hpp"
#include "types.hpp"

namespace sus {

/// What the inclusion probabilities q are (see the top of this header).
enum class Budget { paper, waterfill };
/// How the kept set is drawn given q (see the top of this header).
enum class Draw { independent, systematic };

inline const char* to_string(Budget b) { return b == Budget::paper ? "paper" : "waterfill"; }
inline const char* to_string(Draw d) { return d == Draw::independent ? "independent" : "systematic"; }

struct SamplerOptions {
  int c = 32;                       ///< budget: at most c kept entries per row (in expectation for `independent`)
  Budget budget = Budget::paper;    ///< q = min(1, c·W) (paper) or water-filled to spend exactly c
  /// systematic (hard cap c) or independent Bernoulli (the paper's). The default is paper/systematic:
  /// the lowest gradient variance at equal kept entries per row in the variance study (results/variance.md).
  Draw draw = Draw::systematic;
  std::uint64_t seed = 0;           ///< the mask is a pure function of (seed, row, W)
};

/// Row-sum tolerance of a recorded weight row: |Σ_j W_ij − 1| ≤ this, unless the row is all
/// zero (a fully masked row). Softmax rows computed in float carry a relative error of a few
/// ulp per entry, so they sum to 1 within ~1e-6; the double tolerance (1e-6) still accepts
/// float weights converted to double. Anything that is not a softmax row (scores,
/// unnormalised exponentials, a row scaled by mistake) is far outside both.
template <class T>
constexpr double row_sum_tolerance() {
  return std::is_same<T, float>::value ? 1e-4 : 1e-6;
}

namespace detail {

// `name`: how the caller's argument is called ("options", or "state.sampler", ...).
inline void check_sampler_options(const char* fn, const SamplerOptions& o, const char* name = "options") {
  if (o.c < 1) fail(fn, name, ".c = ", o.c, " must be >= 1");
  if (o.budget != Budget::paper && o.budget != Budget::waterfill)
    fail(fn, name, ".budget = ", static_cast<int>(o.budget), " is not a Budget");
  if (o.draw != Draw::independent && o.draw != Draw::systematic)
    fail(fn, name, ".draw = ", static_cast<int>(o.draw), " is not a Draw");
}

// Counter layout: (row, stream) with stream in the high word so that draws never collide.
constexpr std::uint64_t kSystematicStream = std::uint64_t{1} << 63;

}  // namespace detail

namespace detail {

// Σ_{j∈[b,e)} f(j) in double with 8 independent partial sums, so the compiler can vectorise
// the loop (a single running sum would serialise on the add latency). The tail goes into the
// lanes too, so appending entries with f = 0 leaves the result bit for bit unchanged: a row
// cut at its causal length sums exactly like the zero-padded full row.
template <class F>
SUS_ALWAYS_INLINE double lane_sum(index_t b, index_t e, F f) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const index_t len = e - b, full = len - len % 8;
  for (index_t k = 0; k < full; k += 8)
    for (int l = 0; l < 8; ++l) acc[l] += f(b + k + l);
  for (index_t k = full; k < len; ++k) acc[k - full] += f(b + k);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Π_{j∈[b,e)} f(j) in double, likewise with 8 partial products (entries with f = 1 appended
// leave it unchanged).
template <class F>
SUS_ALWAYS_INLINE double lane_product(index_t b, index_t e, F f) {
  double acc[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  const index_t len = e - b, full = len - len % 8;
  for (index_t k = 0; k < full; k += 8)
    for (int l = 0; l < 8; ++l) acc[l] *= f(b + k + l);
  for (index_t k = full; k < len; ++k) acc[k - full] *= f(b + k);
  return ((acc[0] * acc[1]) * (acc[2] * acc[3])) * ((acc[4] * acc[5]) * (acc[6] * acc[7]));
}

}  // namespace detail

/// Inclusion probabilities of one row under `budget`.
///   w: n weights (≥ 0); q: n outputs. Returns Σ_j q_j (in double).
/// q_j = min(1, λ·w_j) with λ = c (paper) or the water level (waterfill), found by fixed-point
/// iteration on the saturated set S = {j : λ·w_j ≥ 1}: λ = (c − |S|) / Σ_{j∉S} w_j. Each step
/// only grows S, so it stops after at most c steps (usually 2–3). When the row has at most c
/// non-zero weights, waterfill keeps all of them (q = 1 on the support).
template <class T>
double inclusion_probabilities(const T* w, index_t n, int c, Budget budget, T* q) {
  if (c < 1) detail::fail("inclusion_probabilities", "c = ", c, " must be >= 1");
  double lambda = c;
  if (budget == Budget::waterfill) {
    const double support = detail::lane_sum(0, n, [&](index_t j) { return w[j] > T(0) ? 1.0 : 0.0; });
    if (support <= c) {  // everything non-zero is kept exactly
      for (index_t j = 0; j < n; ++j) q[j] = w[j] > T(0) ? T(1) : T(0);
      return support;
    }
    lambda = c / detail::lane_sum(0, n, [&](index_t j) { return static_cast<double>(w[j]); });
    double saturated = 0;
    for (int iter = 0; iter <= c; ++iter) {
      // 1/λ as the threshold keeps the loop free of divisions; λ·w ≥ 1 ⇔ w ≥ 1/λ.
      const double threshold = 1.0 / lambda;
      const double s = detail::lane_sum(0, n, [&](index_t j) { return w[j] >= threshold ? 1.0 : 0.0; });
      if (s == saturated && iter > 0) break;
      const double rest = detail::lane_sum(0, n, [&](index_t j) { return w[j] >= threshold ? 0.0 : double(w[j]); });
      // In exact arithmetic |S| < c and the rest is positive (support > c). Rounding can
      // saturate weights that sit just below 1/λ (e.g. w = 0.997, 3 x 1e-3, 1e-30 with c = 4):
      // then the current λ already spends c up to rounding, so keep it.
      if (s >= c || !(rest > 0)) break;
      saturated = s;
      lambda = (c - saturated) / rest;
    }
  }
  const T lam = static_cast<T>(lambda);
  if (budget == Budget::paper || static_cast<double>(lam) == lambda) {
    for (index_t j = 0; j < n; ++j) q[j] = std::min(T(1), lam * w[j]);
  } else {  // keep λ in double where T would round it
    for (index_t j = 0; j < n; ++j) q[j] = static_cast<T>(std::min(1.0, lambda * w[j]));
  }
  double sum = detail::lane_sum(0, n, [&](index_t j) { return static_cast<double>(q[j]); });
  if (budget == Budget::paper && sum > c * (1 + 1e-6)) {
    // Only from the row-sum tolerance (Σw = 1 + ε gives Σq up to c·(1 + ε); waterfill hits c
    // by construction): scale q down so Σq ≤ c and the systematic draw's c points cover every
    // entry. q stays the exact inclusion probability, so W/q stays unbiased. Below the
    // threshold (rounding of a float softmax row, ~1e-7) q is left as min(1, c·w); the cap
    // then shortens the last interval by at most 1e-6·c.
    const T shrink = static_cast<T>(c / sum);
    for (index_t j = 0; j < n; ++j) q[j] *= shrink;
    sum = detail::lane_sum(0, n, [&](index_t j) { return static_cast<double>(q[j]); });
  }
  return sum;
}

namespace detail {

// Where a draw reads q_j. ArrayQ: a row computed by inclusion_probabilities (waterfill, or a
// paper row that had to be scaled down). PaperQ: q_j = min(1, c·w_j) straight from the weights,
// the same T value inclusion_probabilities stores, so the paper budget needs no pass for q.
template <class T>
struct ArrayQ {
  const T* q;
  SUS_ALWAYS_INLINE T operator()(index_t j) const { return q[j]; }
};
template <class T>
struct PaperQ {
  const T* w;
  T lam;  // c
  SUS_ALWAYS_INLINE T operator()(index_t j) const { return std::min(T(1), lam * w[j]); }
};

// What a chunk test needs of the q_j of one chunk: their sum (systematic), or the product of
// the 1 − q_j (independent; 0 exactly when some q_j = 1, since otherwise each factor is at
// least 2^-53 and 16 of them stay far above the smallest double).
enum class ChunkStat { sum, survival };

// The sampler tests chunks of 16 entries, four chunks (a batch) at a time. A chunk's stat has
// one fixed order: lane l of 8 combines q_{b+l} and q_{b+8+l}, then the lanes reduce as
// ((l0 ∘ l1) ∘ (l2 ∘ l3)) ∘ ((l4 ∘ l5) ∘ (l6 ∘ l7)) (lane_sum's / lane_product's tree), so the
// vector and scalar versions below give the same bits. The row's Σq rides along in 8 lanes in
// no fixed order: it only decides, with a margin for rounding, whether q is min(1, c·w)
// (RowSampler::sample).
// Entries per chunk: small enough that most chunks hold no point (a row of n entries has ~c
// points, so ~c chunks are walked entry by entry), large enough to amortise the test.
constexpr index_t kSamplerChunk = 16;
constexpr index_t kSamplerBatch = 4 * kSamplerChunk;

template <class Lanes>
SUS_ALWAYS_INLINE double lanes_total(const Lanes& a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// One full chunk [b, b + 16) in scalar code: adds its q to the row lanes and returns its stat.
template <ChunkStat S, class Q>
SUS_ALWAYS_INLINE double chunk_stat_portable(const Q& q, index_t b, std::array<double, 8>& acc) {
  double v[8];
  for (int l = 0; l < 8; ++l) {
    const double x0 = static_cast<double>(q(b + l)), x1 = static_cast<double>(q(b + 8 + l));
    acc[l] += x0 + x1;
    v[l] = S == ChunkStat::sum ? x0 + x1 : (1.0 - x0) * (1.0 - x1);
  }
  if (S == ChunkStat::sum) return lanes_total(v);
  return ((v[0] * v[1]) * (v[2] * v[3])) * ((v[4] * v[5]) * (v[6] * v[7]));
}

#if defined(SUS_VECTOR_EXTENSIONS)
// The same as compiler vectors: loads of 8 weights, min(1, c·w) and the conversion to double
// lane by lane, and the trees as shuffle steps; four chunks share their tree steps. The chunk
// tests are most of the sampler's time, and GCC leaves the scalar form unvectorised.
typedef double f64x8 __attribute__((vector_size(64)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x2 __attribute__((vector_size(16)));
using RowLanes = f64x8;

template <class T>
struct Lanes8;
template <>
struct Lanes8<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Lanes8<double> {
  typedef double type __attribute__((vector_size(64)));
};

// q_j .. q_{j+7} as doubles (vectors by reference: a 64-byte vector passed or returned by value
// draws GCC's -Wpsabi note on targets without AVX-512).
template <class T>
SUS_ALWAYS_INLINE void load_q8(const ArrayQ<T>& q, index_t j, f64x8& out) {
  typename Lanes8<T>::type x;
  std::memcpy(&x, q.q + j, sizeof x);
  out = __builtin_convertvector(x, f64x8);
}
template <class T>
SUS_ALWAYS_INLINE void load_q8(const PaperQ<T>& q, index_t j, f64x8& out) {
  using V = typename Lanes8<T>::type;
  V x;
  std::memcpy(&x, q.w + j, sizeof x);
  const V one = V{} + T(1);
  x = q.lam * x;
  x = x < one ? x : one;  // std::min(T(1), λ·w_j)
  out = __builtin_convertvector(x, f64x8);
}

// a ∘= b: + for sums, × for survivals.
template <ChunkStat S, class V>
SUS_ALWAYS_INLINE void fold(V& a, const V& b) {
  if constexpr (S == ChunkStat::sum) a += b;
  else a *= b;
}

// Loads chunk halves [b, b + 8·count) into x, adds them to the lanes, and turns them into the
// terms that fold: q (sum) or 1 − q (survival).
template <ChunkStat S, int count, class Q>
SUS_ALWAYS_INLINE void load_terms(const Q& q, index_t b, f64x8& acc, f64x8 (&x)[count]) {
  for (int k = 0; k < count; ++k) load_q8(q, b + 8 * k, x[k]);
  f64x8 total = x[0];
  for (int k = 1; k < count; ++k) total += x[k];
  acc += total;
  if constexpr (S == ChunkStat::survival)
    for (int k = 0; k < count; ++k) x[k] = 1.0 - x[k];
}

template <ChunkStat S, class Q>
SUS_ALWAYS_INLINE double chunk_stat(const Q& q, index_t b, f64x8& acc) {
  f64x8 x[2];
  load_terms<S>(q, b, acc, x);
  fold<S>(x[0], x[1]);
  f64x4 a = __builtin_shufflevector(x[0], x[0], 0, 2, 4, 6);
  fold<S>(a, __builtin_shufflevector(x[0], x[0], 1, 3, 5, 7));
  f64x2 r = __builtin_shufflevector(a, a, 0, 2);
  fold<S>(r, __builtin_shufflevector(a, a, 1, 3));
  return S == ChunkStat::sum ? r[0] + r[1] : r[0] * r[1];
}

// The stats of the four chunks [b, b + 64): each tree step runs on two or four chunks at once.
template <ChunkStat S, class Q>
SUS_ALWAYS_INLINE void chunk_stats4(const Q& q, index_t b, f64x8& acc, double (&out)[4]) {
  f64x8 x[8];
  load_terms<S>(q, b, acc, x);
  for (int k = 0; k < 4; ++k) fold<S>(x[2 * k], x[2 * k + 1]);  // chunk k's 8 lanes in x[2k]
  // adjacent lanes of chunks (0, 1) and (2, 3): 4 lanes per chunk
  f64x8 u01 = __builtin_shufflevector(x[0], x[2], 0, 2, 4, 6, 8, 10, 12, 14);
  fold<S>(u01, __builtin_shufflevector(x[0], x[2], 1, 3, 5, 7, 9, 11, 13, 15));
  f64x8 u23 = __builtin_shufflevector(x[4], x[6], 0, 2, 4, 6, 8, 10, 12, 14);
  fold<S>(u23, __builtin_shufflevector(x[4], x[6], 1, 3, 5, 7, 9, 11, 13, 15));
  // then 2 lanes per chunk, then 1
  f64x8 w = __builtin_shufflevector(u01, u23, 0, 2, 4, 6, 8, 10, 12, 14);
  fold<S>(w, __builtin_shufflevector(u01, u23, 1, 3, 5, 7, 9, 11, 13, 15));
  f64x4 r = __builtin_shufflevector(w, w, 0, 2, 4, 6);
  fold<S>(r, __builtin_shufflevector(w, w, 1, 3, 5, 7));
  for (int k = 0; k < 4; ++k) out[k] = r[k];
}
#else
using RowLanes = std::array<double, 8>;
template <ChunkStat S, class Q>
SUS_ALWAYS_INLINE double chunk_stat(const Q& q, index_t b, RowLanes& acc) {
  return chunk_stat_portable<S>(q, b, acc);
}
template <ChunkStat S, class Q>
SUS_ALWAYS_INLINE void chunk_stats4(const Q& q, index_t b, RowLanes& acc, double (&out)[4]) {
  for (int k = 0; k < 4; ++k) out[k] = chunk_stat_portable<S>(q, b + kSamplerChunk * k, acc);
}
#endif

// The draws' chunk tests. A skip test says whether a chunk holds nothing to keep, and then
// moves the draw's state past it; all4 does the same for four chunks in a row when none of
// them holds anything (the state then ends exactly where four single tests leave it), and
// otherwise leaves the state alone.
//   systematic: the next point lies at or beyond the chunk's end h + Σq.
//   independent: the next point's survival level R lies at or below the chunk's survival.
//     A chunk with some q_j = 1 has survival 0 and never passes, as R > 0 (it starts in
//     (0, 1], and a walk leaves it at least P·2^-53 with P ≥ 2^-53·1e-200). L is the product
//     of the survivals of the chunks skipped since R was last rescaled: a multiply per chunk,
//     where dividing R by each survival would put a division on the chain through every chunk.
// The single tests are monotone along the row (h only grows, L only shrinks), so the fourth
// test passing means all four pass.
struct SystematicSkip {
  double point;     // the next point on the cumulative-q axis
  double h = 0;     // cumulative q at the start of the current chunk
  int points_left;  // c − points used
  SUS_ALWAYS_INLINE bool operator()(double chunk) {
    if (points_left > 0 && point < h + chunk) return false;
    h += chunk;
    return true;
  }
  SUS_ALWAYS_INLINE bool all4(const double (&chunk)[4]) {
    const double end = (((h + chunk[0]) + chunk[1]) + chunk[2]) + chunk[3];
    if (points_left > 0 && point < end) return false;
    h = end;
    return true;
  }
};
struct IndependentSkip {
  double R;      // the next point's survival level, relative to the end of the last walked chunk
  double L = 1;  // survival of the chunks skipped since then
  SUS_ALWAYS_INLINE bool operator()(double survival) {
    if (!(survival * L >= R)) return false;
    L *= survival;
    return true;
  }
  SUS_ALWAYS_INLINE bool all4(const double (&survival)[4]) {
    const double level = (((survival[0] * L) * survival[1]) * survival[2]) * survival[3];
    if (!(level >= R)) return false;
    L = level;
    return true;
  }
};

// Tests batches of four chunks from b on while a whole batch is left; returns the start of the
// first batch that holds something to keep (its chunks' stats in `stats`), or where the
// batches ran out. Every tested batch's q goes into the row lanes. A function of its own, not
// inlined, on purpose: nothing in its loop calls out, so the lanes and the skip state stay in
// registers (every vector register is caller-saved; inlined next to the walks' push_backs,
// GCC kept the lanes in memory, a store-to-load round trip on every chunk).
template <ChunkStat S, class Q, class Skip>
SUS_NOINLINE index_t skip_batches(const Q& q, index_t b, index_t n, RowLanes& acc, Skip& state,
                                  double (&stats)[4]) {
  RowLanes lanes = acc;
  Skip s = state;
  double st[4] = {};
  for (; b + kSamplerBatch <= n; b += kSamplerBatch) {
    chunk_stats4<S>(q, b, lanes, st);
    if (!s.all4(st)) break;
  }
  acc = lanes;
  state = s;
  for (int k = 0; k < 4; ++k) stats[k] = st[k];
  return b;
}

// One scan over a row in chunks of 16 [b, e) (the last one may be shorter), in order: each
// chunk is skipped (skip, see above) or walked entry by entry (walk(b, e)). Returns Σ_j q_j
// (summed in no fixed order).
template <ChunkStat S, class Q, class Skip, class Walk>
SUS_ALWAYS_INLINE double scan_chunks(const Q& q, index_t n, Skip& skip, Walk&& walk) {
  RowLanes acc = {};
  double stats[4];
  index_t b = 0;
  while ((b = skip_batches<S>(q, b, n, acc, skip, stats)) + kSamplerBatch <= n) {
    // this batch holds something to keep: its chunks one at a time
    for (int k = 0; k < 4; ++k, b += kSamplerChunk)
      if (!skip(stats[k])) walk(b, b + kSamplerChunk);
  }
  for (; b + kSamplerChunk <= n; b += kSamplerChunk)
    if (!skip(chunk_stat<S>(q, b, acc))) walk(b, b + kSamplerChunk);
  if (b < n) {
    const auto x = [&](index_t j) { return static_cast<double>(q(j)); };
    const double stat =
        S == ChunkStat::sum ? lane_sum(b, n, x) : lane_product(b, n, [&](index_t j) { return 1.0 - x(j); });
    if (!skip(stat)) walk(b, n);
    for (index_t j = b; j < n; ++j) acc[j % 8] += x(j);
  }
  return lanes_total(acc);
}

}  // namespace detail

/// Samples rows of recorded weights one at a time with reusable scratch. Not thread-safe;
/// use one per thread. The result for a row depends only on (options, row, w).
template <class T>
class RowSampler {
 public:
  explicit RowSampler(const SamplerOptions& options) : opt_(options), rng_(options.seed) {
    detail::check_sampler_options("RowSampler", options);
  }

  const SamplerOptions& options() const { return opt_; }

  /// Samples row `row` with weights w[0, n) (≥ 0, summing to 1 or all zero; not checked here —
  /// sample_mask checks). Appends the kept columns (ascending) to `cols` and W_j / q_j to
  /// `vals`. Returns the number kept.
  index_t sample(index_t row, const T* w, index_t n, std::vector<index_t>& cols, std::vector<T>& vals) {
    const index_t before = static_cast<index_t>(cols.size());
    if (opt_.budget == Budget::paper) {
      // One scan draws with q = min(1, c·w) and sums q on the way. The sum only matters in two
      // rare cases: an all-zero row (nothing can be kept: every chunk's Σq is 0, its Π(1 − q)
      // is 1) and a row summing to more than 1, whose q inclusion_probabilities scales down.
      const double total = draw(row, detail::PaperQ<T>{w, static_cast<T>(opt_.c)}, w, n, cols, vals);
      // inclusion_probabilities scales q when its Σq (lane_sum's order) exceeds c·(1 + 1e-6).
      // `total` sums the same n terms (all ≥ 0) in another order; each order is within
      // n·2^-53·Σq of the exact sum, so below the threshold by twice that, both agree.
      if (total <= opt_.c * (1 + 1e-6) - total * static_cast<double>(n) * 0x1p-51)
        return static_cast<index_t>(cols.size()) - before;
      cols.resize(static_cast<std::size_t>(before));
      vals.resize(static_cast<std::size_t>(before));
    }
    q_.resize(static_cast<std::size_t>(n));
    const double total_q = inclusion_probabilities(w, n, opt_.c, opt_.budget, q_.data());
    if (total_q <= 0) return 0;
    draw(row, detail::ArrayQ<T>{q_.data()}, w, n, cols, vals);
    return static_cast<index_t>(cols.size()) - before;
  }

 private:
  static void keep(index_t j, const T* w, T qj, std::vector<index_t>& cols, std::vector<T>& vals) {
    cols.push_back(j);
    vals.push_back(w[j] / qj);
  }

  // Draws the row; returns Σ_j q_j (summed in no fixed order, see detail::scan_chunks).
  template <class Q>
  double draw(index_t row, const Q& q, const T* w, index_t n, std::vector<index_t>& cols, std::vector<T>& vals) {
    return opt_.draw == Draw::systematic ? sample_systematic(row, q, w, n, cols, vals)
                                         : sample_independent(row, q, w, n, cols, vals);
  }

  // Points u, u+1, ..., u+c−1 on the axis of cumulative q; keep j iff a point falls in
  // [C_{j−1}, C_j). Chunks whose q-sum ends before the next point are skipped whole.
  template <class Q>
  double sample_systematic(index_t row, const Q& q, const T* w, index_t n, std::vector<index_t>& cols,
                           std::vector<T>& vals) {
    detail::SystematicSkip skip{rng_.uniform2(static_cast<std::uint64_t>(row), detail::kSystematicStream)[0], 0,
                                opt_.c};
    double& point = skip.point;
    int& points_left = skip.points_left;
    double& h = skip.h;
    return detail::scan_chunks<detail::ChunkStat::sum>(q, n, skip, [&](index_t b, index_t e) {
      for (index_t j = b; j < e; ++j) {
        const T qj = q(j);
        const double h_next = h + qj;
        if (point < h_next && points_left > 0) {
          keep(j, w, qj, cols, vals);
          // An interval of length ≤ 1 holds at most one point; rounding may place the next
          // one inside it too, in which case it is consumed here as well.
          while (point < h_next && points_left > 0) {
            point += 1.0;
            --points_left;
          }
        }
        h = h_next;
      }
    });
  }

  // Independent Bernoulli(q_j) draws as a Poisson process on the hazard axis
  // h_j = −log(1 − q_j), tracked in survival space to avoid logarithms: with
  // P_j = Π_{l≤j} (1 − q_l) (relative to the chunk start) and R the survival level of the next
  // point, j holds a point iff P_j < R ≤ P_{j−1}; the point after it has level R·U, U uniform
  // on (0, 1] (exponential gaps). Entries with q_j = 1 are always kept.
  template <class Q>
  double sample_independent(index_t row, const Q& q, const T* w, index_t n, std::vector<index_t>& cols,
                            std::vector<T>& vals) {
    std::uint64_t draws = 0;
    std::array<double, 2> pair{};
    auto uniform_open0 = [&]() {  // U in (0, 1]
      if ((draws & 1) == 0) pair = rng_.uniform2(static_cast<std::uint64_t>(row), draws / 2);
      return 1.0 - pair[draws++ & 1];
    };
    detail::IndependentSkip skip{uniform_open0()};
    double& R = skip.R;
    return detail::scan_chunks<detail::ChunkStat::survival>(q, n, skip, [&](index_t b, index_t e) {
      R /= skip.L;  // the level relative to this chunk's start
      skip.L = 1;
      double P = 1;
      for (index_t j = b; j < e; ++j) {
        const T qj = q(j);
        if (qj >= T(1)) {
          keep(j, w, qj, cols, vals);
          continue;
        }
        P *= 1.0 - static_cast<double>(qj);
        if (P < R) {
          keep(j, w, qj, cols, vals);
          do R *= uniform_open0();  // several points in one interval keep j once
          while (P < R);
        }
        if (P < 1e-200) {  // rescale before underflow; R ≤ P here, so R/P ≤ 1
          R /= P;
          P = 1;
        }
      }
      R /= P;
    });
  }

  SamplerOptions opt_;
  detail::Philox4x32 rng_;
  std::vector<T> q_;
};

namespace detail {

// Σ_j w_j in double (in no fixed order) and min(0, min_j w_j), in one pass over the row: the
// fast path of check_weights. A NaN entry makes the sum NaN; ±inf makes it non-finite.
template <class T>
SUS_ALWAYS_INLINE void row_sum_min(const T* w, index_t n, double& sum, T& lowest) {
  index_t j = 0;
  double s = 0;
  T lo = 0;
#if defined(SUS_VECTOR_EXTENSIONS)
  // Compiler vectors of 4 values: GCC leaves the scalar form (a lane_sum of converted values,
  // then a min loop) unvectorised. Measured on a W of 8192 x 8192, float: 46 -> 9.8 ms with
  // -march=native (AVX-512), 43 -> 15 ms for generic x86-64. (Vectors of 8 values were slower
  // than the scalar form on generic x86-64.)
  typedef T v4 __attribute__((vector_size(4 * sizeof(T))));
  f64x4 acc[4] = {};
  v4 m[4] = {};
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 4; ++k) {
      v4 x;
      std::memcpy(&x, w + j + 4 * k, sizeof x);
      m[k] = x < m[k] ? x : m[k];  // std::min(m, x), lane by lane
      acc[k] += __builtin_convertvector(x, f64x4);
    }
  for (int k = 1; k < 4; ++k) {
    acc[0] += acc[k];
    m[0] = m[k] < m[0] ? m[k] : m[0];
  }
  for (int l = 0; l < 4; ++l) {
    s += acc[0][l];
    lo = std::min(lo, m[0][l]);
  }
#endif
  for (; j < n; ++j) {
    s += static_cast<double>(w[j]);
    lo = std::min(lo, w[j]);
  }
  sum = s;
  lowest = lo;
}

// Checks that W is a matrix of recorded softmax weights: finite, ≥ 0, and each row either
// sums to 1 (within row_sum_tolerance<T>()) or is all zero (a fully masked row).
template <class T>
void check_weights(const char* fn, const char* arg, const ConstMatrixRef<T>& W) {
  for (index_t i = 0; i < W.rows(); ++i) {
    const T* w = W.row(i).data();
    const index_t n = W.cols();
    // Fast path: a finite sum and a non-negative minimum imply finite, ≥ 0 entries.
    double sum;
    T lowest;
    row_sum_min(w, n, sum, lowest);
    if (!std::isfinite(sum) || lowest < T(0)) {
      for (index_t j = 0; j < n; ++j)
        if (!(w[j] >= T(0)) || !std::isfinite(static_cast<double>(w[j])))
          fail(fn, "argument '", arg, "' (", shape(W.rows(), W.cols()), ") has entry (", i, ", ", j, ") = ", w[j],
               "; recorded softmax weights must be finite and >= 0");
    }
    if (sum != 0 && std::abs(sum - 1.0) > row_sum_tolerance<T>())
      fail(fn, "argument '", arg, "' (", shape(W.rows(), W.cols()), ") row ", i, " sums to ", sum,
           "; a row of softmax weights must sum to 1 (tolerance ", row_sum_tolerance<T>(), ") or be all zero");
  }
}

template <class T>
Csr<T> sample_mask(const ConstMatrixRef<T>& W, const SamplerOptions& options) {
  constexpr const char* fn = "sample_mask";
  check_sampler_options(fn, options);
  check_weights(fn, "W", W);
  Csr<T> mask(W.rows(), W.cols());
  RowSampler<T> sampler(options);
  for (index_t i = 0; i < W.rows(); ++i) {
    sampler.sample(i, W.row(i).data(), W.cols(), mask.col_indices, mask.values);
    mask.row_offsets[i + 1] = static_cast<index_t>(mask.col_indices.size());
  }
  return mask;
}

}  // namespace detail

/// Samples a recorded dense weight matrix W (n_q x n_k, rows of softmax weights) into a CSR
/// mask of rescaled weights W̃ = W / q. Throws sus::Error if options.c < 1 or W is not a
/// matrix of softmax weights (finite, ≥ 0, rows summing to 1 or all zero).
inline Csr<float> sample_mask(const ConstMatrixRef<float>& W, const SamplerOptions& options) {
  return detail::sample_mask<float>(W, options);
}
inline Csr<double> sample_mask(const ConstMatrixRef<double>& W, const SamplerOptions& options) {
  return detail::sample_mask<double>(W, options);
}

}  // namespace sus
