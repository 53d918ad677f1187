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
// The scan keeps 16 running lanes of Σq (or Π(1 − q)) in vector code, reduces them to the row's
// running total after every batch of 64 entries, and walks (with vector prefixes and bit masks)
// only the batches that hold a point: one pass over the row plus O(kept · batch). For the paper
// budget, q = min(1, c·w) is computed inside that pass, not stored. Details at detail::ChunkStat.
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

#if defined(SUS_VECTOR_EXTENSIONS) && (defined(__SSE2__) || defined(__AVX__))
#include <immintrin.h>
#endif

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

}  // namespace detail

namespace detail {

// Water level of a row whose unsaturated weights are tiny: λ = (c − s) / rest would overflow
// (or 1/λ lose its precision as a denormal), and min(1, inf·0) would give q = 1 to a zero
// weight. The same fixed-point iteration as inclusion_probabilities, from its state (s
// saturated, rest the sum of the others), with λ·w_j formed as (c − s)·(w_j / rest). Returns Σq.
template <class T>
double waterfill_tiny_rest(const T* w, index_t n, int c, double s, double rest, T* q) {
  const auto level = [&](index_t j, double sat, double r) { return (c - sat) * (static_cast<double>(w[j]) / r); };
  for (int iter = 0; iter <= c; ++iter) {
    const double s2 = lane_sum(0, n, [&](index_t j) { return level(j, s, rest) >= 1 ? 1.0 : 0.0; });
    if (s2 == s && iter > 0) break;
    const double r2 = lane_sum(0, n, [&](index_t j) { return level(j, s, rest) >= 1 ? 0.0 : double(w[j]); });
    if (s2 >= c || !(r2 > 0)) break;
    s = s2;
    rest = r2;
  }
  for (index_t j = 0; j < n; ++j) q[j] = static_cast<T>(std::min(1.0, level(j, s, rest)));
  return lane_sum(0, n, [&](index_t j) { return static_cast<double>(q[j]); });
}

// λ above this: 1/λ is no longer a normal double (waterfill_tiny_rest takes over).
constexpr double kMaxWaterLevel = 1.0 / std::numeric_limits<double>::min();

}  // namespace detail

/// Inclusion probabilities of one row under `budget`.
///   w: n weights (≥ 0); q: n outputs. Returns Σ_j q_j (in double).
/// q_j = min(1, λ·w_j) with λ = c (paper) or the water level (waterfill), found by fixed-point
/// iteration on the saturated set S = {j : λ·w_j ≥ 1}: λ = (c − |S|) / Σ_{j∉S} w_j. Each step
/// only grows S, so it stops after at most c steps (usually 2–3). When the row has at most c
/// non-zero weights, waterfill keeps all of them (q = 1 on the support). Where the unsaturated
/// weights are so small (denormal) that λ would overflow, λ·w_j is formed as (c − |S|)·(w_j / Σ_{j∉S} w_j).
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
    const double total = detail::lane_sum(0, n, [&](index_t j) { return static_cast<double>(w[j]); });
    lambda = c / total;
    if (!(lambda <= detail::kMaxWaterLevel)) return detail::waterfill_tiny_rest(w, n, c, 0.0, total, q);
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
      if (!(lambda <= detail::kMaxWaterLevel)) return detail::waterfill_tiny_rest(w, n, c, saturated, rest, q);
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
// hidden(): the same q, read through a pointer the compiler cannot trace back to this one's.
// The scan's walks reload their batch through it: otherwise GCC reuses the values the scan
// loaded, which then stay live across every batch, and spills them to the stack each time.
template <class P>
SUS_ALWAYS_INLINE P* hide_pointer(P* p) {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+r"(p));
#endif
  return p;
}
template <class T>
struct ArrayQ {
  const T* q;
  SUS_ALWAYS_INLINE T operator()(index_t j) const { return q[j]; }
  SUS_ALWAYS_INLINE ArrayQ hidden() const { return {hide_pointer(q)}; }
};
template <class T>
struct PaperQ {
  const T* w;
  T lam;  // c
  SUS_ALWAYS_INLINE T operator()(index_t j) const { return std::min(T(1), lam * w[j]); }
  SUS_ALWAYS_INLINE PaperQ hidden() const { return {hide_pointer(w), lam}; }
};

// The scan. 16 running lanes go along the row: lane l holds the entries j ≡ l (mod 16) seen so
// far, combined by + (systematic: Σq) or × (independent: Π(1 − q), the survival). After each
// batch of 64 entries the lanes reduce in one fixed tree, t_l = lane_l ∘ lane_{l+8}, then
// ((t0 ∘ t1) ∘ (t2 ∘ t3)) ∘ ((t4 ∘ t5) ∘ (t6 ∘ t7)): the row's running total at the batch's
// end. Every lane only grows (sums of q ≥ 0) or only shrinks (products of 1 − q ∈ [0, 1]) and
// the tree is monotone in each lane, so the totals at successive batch ends are monotone too,
// as positions on the draws' cumulative axes must be. A zero q leaves a lane unchanged
// (x + 0 = x, x · 1 = x), so a row cut at its causal length scans exactly like the zero-padded
// full row. The loop-carried work is one add (or multiply) per lane per batch; the tree is
// off that chain, so batches stream at the rate of their loads and conversions.
//
// A batch whose end total has passed the draw's next point is walked, in two levels: the 8
// groups of 8 terms are reduced together to their totals (one tree over all 8 vectors), an
// inclusive prefix of those (three shift-and-combine steps) from the total at the batch's start
// gives every group's end, and only a group whose end has passed the point is expanded into
// running totals entry by entry (the same prefix), compared with the point as a bit mask.
// The walk's totals and the lanes' round differently (by ~1e-16), so a point may fall in the
// gap past a batch's last interval and before the lanes' total at its end: it then goes to the
// next entry with q > 0 (systematic), or with q < 1 (independent, whose level is re-based at
// the walk's end, to within rounding of 1). Measured on rows of 8192 weights at c = 32 (the walks of ~25 batches a row):
// 2.85 -> 1.90 µs a row (systematic) against a full 64-entry prefix per walk; with the 8
// random counters of the independent draw's refill computed together (AVX-512), 4.2 -> 2.6 µs.
//
// The scan and its walks run in one function with no call inside but the random numbers'
// refill (once per 16 draws) and the rare re-based walk (kept entries go to a fixed buffer,
// flushed by the caller), so the lanes and the draw's state stay in registers.
enum class ChunkStat { sum, survival };

// Entries per group of the re-based walk (a 16-bit mask) and per tested batch (4 groups).
constexpr index_t kSamplerChunk = 16;
constexpr index_t kSamplerBatch = 4 * kSamplerChunk;

template <ChunkStat S>
SUS_ALWAYS_INLINE double combine(double a, double b) {
  return S == ChunkStat::sum ? a + b : a * b;
}

#if defined(SUS_VECTOR_EXTENSIONS) && SUS_VECTOR_BYTES == 64
// Compiler vectors (AVX-512: a group of 8 doubles is one register): loads of 8 weights,
// min(1, c·w) and the conversion to double lane by lane, the trees and prefixes as shuffle
// steps. GCC leaves the scalar forms unvectorised.
using Vec8 = f64x8;

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

// 8 values as doubles, one vcvtps2pd: GCC tuned for 256-bit vectors splits
// __builtin_convertvector into halves and shuffles, and shuffles are what bound the scan.
// (Vectors by reference throughout, as elsewhere.)
SUS_ALWAYS_INLINE void to_f64x8(const Lanes8<float>::type& x, f64x8& out) {
  // (not _mm512_cvtps_pd, whose _mm512_undefined_pd draws GCC 12's -Wmaybe-uninitialized)
  out = reinterpret_cast<f64x8>(_mm512_maskz_cvtps_pd(0xFF, reinterpret_cast<__m256>(x)));
}
SUS_ALWAYS_INLINE void to_f64x8(const Lanes8<double>::type& x, f64x8& out) { out = x; }

// x = x < m ? x : m lane by lane: std::min(m, x)'s operation. On x86 one vminps/vminpd, which
// is that operation exactly (the second operand where either is NaN or they compare equal);
// GCC writes the ternary as a compare and a blend, two instructions.
SUS_ALWAYS_INLINE void min_to(Lanes8<float>::type& x, const Lanes8<float>::type& m) {
  x = reinterpret_cast<Lanes8<float>::type>(_mm256_min_ps(reinterpret_cast<__m256>(x), reinterpret_cast<__m256>(m)));
}
SUS_ALWAYS_INLINE void min_to(Lanes8<double>::type& x, const Lanes8<double>::type& m) {
  x = reinterpret_cast<Lanes8<double>::type>(_mm512_min_pd(reinterpret_cast<__m512d>(x), reinterpret_cast<__m512d>(m)));
}

// q_j .. q_{j+7} as doubles.
template <class T>
SUS_ALWAYS_INLINE void load_q8(const ArrayQ<T>& q, index_t j, f64x8& out) {
  typename Lanes8<T>::type x;
  std::memcpy(&x, q.q + j, sizeof x);
  to_f64x8(x, out);
}
template <class T>
SUS_ALWAYS_INLINE void load_q8(const PaperQ<T>& q, index_t j, f64x8& out) {
  using V = typename Lanes8<T>::type;
  V x;
  std::memcpy(&x, q.w + j, sizeof x);
  const V one = V{} + T(1);
  x = q.lam * x;
  min_to(x, one);  // std::min(T(1), λ·w_j)
  to_f64x8(x, out);
}

SUS_ALWAYS_INLINE void set_all(f64x8& v, double x) { v = f64x8{} + x; }
SUS_ALWAYS_INLINE void from_array(f64x8& v, const double* x) { std::memcpy(&v, x, sizeof v); }
SUS_ALWAYS_INLINE double at(const f64x8& v, int l) { return v[l]; }
SUS_ALWAYS_INLINE void add_to(f64x8& a, const f64x8& b) { a += b; }
SUS_ALWAYS_INLINE void mul_to(f64x8& a, const f64x8& b) { a *= b; }
SUS_ALWAYS_INLINE void one_minus(const f64x8& x, f64x8& out) { out = 1.0 - x; }
// The walk's survival factor: 1 − q, with q ≥ 1 (always kept) as 1.
SUS_ALWAYS_INLINE void walk_factor(const f64x8& x, f64x8& out) {
  const f64x8 one = f64x8{} + 1.0;
  out = x >= one ? one : one - x;
}

// Bit l: lane l is > v (above) or < v (!above).
SUS_ALWAYS_INLINE unsigned compare_mask8(const f64x8& x, double v, bool above) {
  const __m512d b = _mm512_set1_pd(v), a = reinterpret_cast<__m512d>(x);
  return above ? unsigned(_mm512_cmp_pd_mask(a, b, _CMP_GT_OQ)) : unsigned(_mm512_cmp_pd_mask(a, b, _CMP_LT_OQ));
}

// Whether some lane of x[0..7] is not below v (≥ v, or NaN).
SUS_ALWAYS_INLINE bool any_not_below(const f64x8 (&x)[8], double v) {
  const __m512d b = _mm512_set1_pd(v);
  unsigned m = 0;
  for (int k = 0; k < 8; ++k) m |= unsigned(_mm512_cmp_pd_mask(reinterpret_cast<__m512d>(x[k]), b, _CMP_NLT_UQ));
  return m != 0;
}

// The lanes' tree (see above) of lo ∘ hi.
template <ChunkStat S>
SUS_ALWAYS_INLINE double tree_total(const f64x8& lo, const f64x8& hi) {
  const f64x8 t = S == ChunkStat::sum ? lo + hi : lo * hi;
  const f64x4 even = __builtin_shufflevector(t, t, 0, 2, 4, 6), odd = __builtin_shufflevector(t, t, 1, 3, 5, 7);
  const f64x4 p = S == ChunkStat::sum ? even + odd : even * odd;  // t0∘t1, t2∘t3, t4∘t5, t6∘t7
  const f64x2 a = __builtin_shufflevector(p, p, 0, 2), c = __builtin_shufflevector(p, p, 1, 3);
  const f64x2 r = S == ChunkStat::sum ? a + c : a * c;
  return combine<S>(r[0], r[1]);
}

// Inclusive prefix of 8 lanes: lane l ∘= lane l − 1, then l − 2, then l − 4 (lanes shifted in
// from below the first are the identity).
template <ChunkStat S>
SUS_ALWAYS_INLINE void prefix8(f64x8& x) {
  const f64x8 id = f64x8{} + (S == ChunkStat::sum ? 0.0 : 1.0);
  const f64x8 s1 = __builtin_shufflevector(id, x, 0, 8, 9, 10, 11, 12, 13, 14);
  x = S == ChunkStat::sum ? x + s1 : x * s1;
  const f64x8 s2 = __builtin_shufflevector(id, x, 0, 1, 8, 9, 10, 11, 12, 13);
  x = S == ChunkStat::sum ? x + s2 : x * s2;
  const f64x8 s4 = __builtin_shufflevector(id, x, 0, 1, 2, 3, 8, 9, 10, 11);
  x = S == ChunkStat::sum ? x + s4 : x * s4;
}

// Lane k of out: the 8 lanes of x[k] combined by the fixed tree
// ((x_0 ∘ x_4) ∘ (x_2 ∘ x_6)) ∘ ((x_1 ∘ x_5) ∘ (x_3 ∘ x_7)) — 8 vectors reduced together in 7
// two-source shuffle pairs, instead of one horizontal reduction (or prefix) per vector.
template <ChunkStat S>
SUS_ALWAYS_INLINE void group_totals(const f64x8 (&x)[8], f64x8& out) {
  f64x8 t[4], u[2];
  for (int k = 0; k < 4; ++k) {  // lanes (l, l + 4) of x[2k], x[2k + 1]
    const f64x8 a = __builtin_shufflevector(x[2 * k], x[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11);
    const f64x8 b = __builtin_shufflevector(x[2 * k], x[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    t[k] = S == ChunkStat::sum ? a + b : a * b;
  }
  for (int k = 0; k < 2; ++k) {  // then (l, l + 2)
    const f64x8 a = __builtin_shufflevector(t[2 * k], t[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13);
    const f64x8 b = __builtin_shufflevector(t[2 * k], t[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    u[k] = S == ChunkStat::sum ? a + b : a * b;
  }
  const f64x8 a = __builtin_shufflevector(u[0], u[1], 0, 2, 4, 6, 8, 10, 12, 14);  // then (l, l + 1)
  const f64x8 b = __builtin_shufflevector(u[0], u[1], 1, 3, 5, 7, 9, 11, 13, 15);
  out = S == ChunkStat::sum ? a + b : a * b;
}
#elif defined(SUS_VECTOR_EXTENSIONS)
// Registers narrower than 8 doubles (AVX: 4, SSE2 and NEON: 2): a group of 8 lanes is kPieces
// compiler vectors of the register width, lane l being lane l % kPieceLanes of piece
// l / kPieceLanes. Every lane goes through the operations of the AVX-512 form above, in the
// same order (the same bits; the sampler's tests pin them). A 64-byte vector here would live
// on the stack (SUS_VECTOR_BYTES).
typedef double f64p __attribute__((vector_size(SUS_VECTOR_BYTES)));
typedef float f32p __attribute__((vector_size(SUS_VECTOR_BYTES / 2)));  // as many floats
constexpr int kPieceLanes = SUS_VECTOR_BYTES / 8;
constexpr int kPieces = 8 / kPieceLanes;
struct Vec8 {
  f64p p[kPieces];
};

SUS_ALWAYS_INLINE void set_all(Vec8& v, double x) {
  for (f64p& e : v.p) e = f64p{} + x;
}
SUS_ALWAYS_INLINE void from_array(Vec8& v, const double* x) { std::memcpy(v.p, x, sizeof v.p); }
SUS_ALWAYS_INLINE double at(const Vec8& v, int l) { return v.p[l / kPieceLanes][l % kPieceLanes]; }
SUS_ALWAYS_INLINE void add_to(Vec8& a, const Vec8& b) {
  for (int k = 0; k < kPieces; ++k) a.p[k] += b.p[k];
}
SUS_ALWAYS_INLINE void mul_to(Vec8& a, const Vec8& b) {
  for (int k = 0; k < kPieces; ++k) a.p[k] *= b.p[k];
}
SUS_ALWAYS_INLINE void one_minus(const Vec8& x, Vec8& out) {
  for (int k = 0; k < kPieces; ++k) out.p[k] = 1.0 - x.p[k];
}
SUS_ALWAYS_INLINE void walk_factor(const Vec8& x, Vec8& out) {
  const f64p one = f64p{} + 1.0;
  for (int k = 0; k < kPieces; ++k) out.p[k] = x.p[k] >= one ? one : one - x.p[k];
}

// x = x < m ? x : m lane by lane (std::min(m, x)): one vminps/vminpd where the piece is a
// whole SSE or AVX register.
template <class V>
SUS_ALWAYS_INLINE void min_piece(V& x, const V& m) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<V, f64p>) {
    x = reinterpret_cast<V>(_mm256_min_pd(reinterpret_cast<__m256d>(x), reinterpret_cast<__m256d>(m)));
    return;
  } else if constexpr (std::is_same_v<V, f32p>) {
    x = reinterpret_cast<V>(_mm_min_ps(reinterpret_cast<__m128>(x), reinterpret_cast<__m128>(m)));
    return;
  }
#endif
  x = x < m ? x : m;
}

// Floats as doubles lane by lane. With AVX one vcvtps2pd: GCC writes __builtin_convertvector
// of 4 floats as two conversions of halves, a vinsertf128 and a trip through the stack.
SUS_ALWAYS_INLINE f64p to_f64p(const f32p& x) {
#if defined(__AVX__)
  return reinterpret_cast<f64p>(_mm256_cvtps_pd(reinterpret_cast<__m128>(x)));
#else
  return __builtin_convertvector(x, f64p);
#endif
}
SUS_ALWAYS_INLINE f64p to_f64p(const f64p& x) { return x; }

#if !defined(__AVX__) && defined(__SSE2__)
// SSE2: a piece is 2 floats, which GCC's 8-byte vectors handle as a compare-and-blend min;
// the same operations on the low half of an SSE register instead (one minps, one cvtps2pd).
SUS_ALWAYS_INLINE __m128 load_2_floats(const float* p) {
  double bits;
  std::memcpy(&bits, p, sizeof bits);
  return _mm_castpd_ps(_mm_set_sd(bits));
}
#endif

// q_j .. q_{j + kPieceLanes − 1} as doubles: one piece.
template <class T>
SUS_ALWAYS_INLINE f64p load_piece(const ArrayQ<T>& q, index_t j) {
#if !defined(__AVX__) && defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) return reinterpret_cast<f64p>(_mm_cvtps_pd(load_2_floats(q.q + j)));
#endif
  std::conditional_t<std::is_same_v<T, float>, f32p, f64p> x;
  std::memcpy(&x, q.q + j, sizeof x);
  return to_f64p(x);
}
template <class T>
SUS_ALWAYS_INLINE f64p load_piece(const PaperQ<T>& q, index_t j) {
#if !defined(__AVX__) && defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m128 x = _mm_mul_ps(_mm_set1_ps(q.lam), load_2_floats(q.w + j));
    return reinterpret_cast<f64p>(_mm_cvtps_pd(_mm_min_ps(x, _mm_set1_ps(1.0f))));  // std::min(1, λ·w_j)
  }
#endif
  using V = std::conditional_t<std::is_same_v<T, float>, f32p, f64p>;
  const V one = V{} + T(1);
  V x;
  std::memcpy(&x, q.w + j, sizeof x);
  x = q.lam * x;
  min_piece(x, one);  // std::min(T(1), λ·w_j)
  return to_f64p(x);
}
template <class Q>
SUS_ALWAYS_INLINE void load_q8(const Q& q, index_t j, Vec8& out) {
  for (int k = 0; k < kPieces; ++k) out.p[k] = load_piece(q, j + k * kPieceLanes);
}

// Bit l: lane l is > v (above) or < v (!above).
SUS_ALWAYS_INLINE unsigned compare_mask8(const Vec8& x, double v, bool above) {
  unsigned m = 0;
#if defined(__AVX__)
  const __m256d b = _mm256_set1_pd(v);
  for (int k = 0; k < kPieces; ++k) {
    const __m256d a = reinterpret_cast<__m256d>(x.p[k]);
    const __m256d c = above ? _mm256_cmp_pd(a, b, _CMP_GT_OQ) : _mm256_cmp_pd(a, b, _CMP_LT_OQ);
    m |= unsigned(_mm256_movemask_pd(c)) << (kPieceLanes * k);
  }
#elif defined(__SSE2__)
  const __m128d b = _mm_set1_pd(v);
  for (int k = 0; k < kPieces; ++k) {
    const __m128d a = reinterpret_cast<__m128d>(x.p[k]);
    m |= unsigned(_mm_movemask_pd(above ? _mm_cmpgt_pd(a, b) : _mm_cmplt_pd(a, b))) << (kPieceLanes * k);
  }
#else
  for (int l = 0; l < 8; ++l) m |= unsigned(above ? at(x, l) > v : at(x, l) < v) << l;
#endif
  return m;
}

// Whether some lane of x[0..7] is not below v (≥ v, or NaN): one comparison per piece, their
// OR and one movemask.
SUS_ALWAYS_INLINE bool any_not_below(const Vec8 (&x)[8], double v) {
#if defined(__AVX__)
  const __m256d b = _mm256_set1_pd(v);
  __m256d m = _mm256_setzero_pd();
  for (int k = 0; k < 8; ++k)
    for (int p = 0; p < kPieces; ++p) m = _mm256_or_pd(m, _mm256_cmp_pd(reinterpret_cast<__m256d>(x[k].p[p]), b, _CMP_NLT_UQ));
  return _mm256_movemask_pd(m) != 0;
#elif defined(__SSE2__)
  const __m128d b = _mm_set1_pd(v);
  __m128d m = _mm_setzero_pd();
  for (int k = 0; k < 8; ++k)
    for (int p = 0; p < kPieces; ++p) m = _mm_or_pd(m, _mm_cmpnlt_pd(reinterpret_cast<__m128d>(x[k].p[p]), b));
  return _mm_movemask_pd(m) != 0;
#else
  bool any = false;
  for (int k = 0; k < 8; ++k)
    for (int l = 0; l < 8; ++l) any |= !(at(x[k], l) < v);
  return any;
#endif
}

// The lanes' tree of lo ∘ hi: t = lo ∘ hi, then ((t0 ∘ t1) ∘ (t2 ∘ t3)) ∘ ((t4 ∘ t5) ∘ (t6 ∘ t7)).
template <ChunkStat S>
SUS_ALWAYS_INLINE double tree_total(const Vec8& lo, const Vec8& hi) {
  Vec8 t = lo;
  if (S == ChunkStat::sum) add_to(t, hi);
  else mul_to(t, hi);
#if SUS_VECTOR_BYTES == 32
  // The same pairs by in-lane shuffles (vunpcklpd/vunpckhpd) and one extraction of the upper
  // half, where the AVX-512 form's order of lanes would take cross-lane permutes: this tree
  // decides the scan's branch on every batch. p = (t0∘t1, t4∘t5, t2∘t3, t6∘t7).
  const f64x4 even = __builtin_shufflevector(t.p[0], t.p[1], 0, 4, 2, 6);
  const f64x4 odd = __builtin_shufflevector(t.p[0], t.p[1], 1, 5, 3, 7);
  const f64x4 p = S == ChunkStat::sum ? even + odd : even * odd;
  const f64x2 a = __builtin_shufflevector(p, p, 0, 1), c = __builtin_shufflevector(p, p, 2, 3);
  const f64x2 r = S == ChunkStat::sum ? a + c : a * c;  // (t0∘t1) ∘ (t2∘t3), (t4∘t5) ∘ (t6∘t7)
  return combine<S>(r[0], r[1]);
#else
  double u[8];
  for (int l = 0; l < 8; ++l) u[l] = at(t, l);
  return combine<S>(combine<S>(combine<S>(u[0], u[1]), combine<S>(u[2], u[3])),
                    combine<S>(combine<S>(u[4], u[5]), combine<S>(u[6], u[7])));
#endif
}

// Inclusive prefix of 8 lanes: lane l ∘= lane l − 1, then l − 2, then l − 4, lanes shifted in
// from below the first being the identity (combined too, as in the AVX-512 form).
template <ChunkStat S>
SUS_ALWAYS_INLINE void prefix8(Vec8& x) {
  constexpr double identity = S == ChunkStat::sum ? 0.0 : 1.0;
#if SUS_VECTOR_BYTES == 32
  const auto op = [](const f64x4& a, const f64x4& b) { return S == ChunkStat::sum ? a + b : a * b; };
  const f64x4 id = f64x4{} + identity;
  f64x4 lo = x.p[0], hi = x.p[1];
  // by 1: (id, x0, x1, x2), (x3, x4, x5, x6)
  f64x4 slo = __builtin_shufflevector(id, lo, 0, 4, 5, 6), shi = __builtin_shufflevector(lo, hi, 3, 4, 5, 6);
  lo = op(lo, slo);
  hi = op(hi, shi);
  // by 2: (id, id, x0, x1), (x2, x3, x4, x5)
  slo = __builtin_shufflevector(id, lo, 0, 1, 4, 5);
  shi = __builtin_shufflevector(lo, hi, 2, 3, 4, 5);
  lo = op(lo, slo);
  hi = op(hi, shi);
  // by 4: (id, id, id, id), (x0, x1, x2, x3)
  x.p[1] = op(hi, lo);
  x.p[0] = op(lo, id);
#else
  double v[8];
  for (int l = 0; l < 8; ++l) v[l] = at(x, l);
  for (int s = 1; s < 8; s *= 2)
    for (int l = 7; l >= 0; --l) v[l] = combine<S>(v[l], l >= s ? v[l - s] : identity);
  from_array(x, v);
#endif
}

// Lane k of out: the 8 lanes of x[k] combined by the fixed tree
// ((x_0 ∘ x_4) ∘ (x_2 ∘ x_6)) ∘ ((x_1 ∘ x_5) ∘ (x_3 ∘ x_7)).
template <ChunkStat S>
SUS_ALWAYS_INLINE void group_totals(const Vec8 (&x)[8], Vec8& out) {
#if SUS_VECTOR_BYTES == 32
  const auto op = [](const f64x4& a, const f64x4& b) { return S == ChunkStat::sum ? a + b : a * b; };
  f64x4 t[8], u[4];
  for (int k = 0; k < 8; ++k) t[k] = op(x[k].p[0], x[k].p[1]);  // (l, l + 4)
  for (int k = 0; k < 4; ++k)                                    // then (l, l + 2)
    u[k] = op(__builtin_shufflevector(t[2 * k], t[2 * k + 1], 0, 1, 4, 5),
              __builtin_shufflevector(t[2 * k], t[2 * k + 1], 2, 3, 6, 7));
  for (int k = 0; k < 2; ++k)  // then (l, l + 1)
    out.p[k] = op(__builtin_shufflevector(u[2 * k], u[2 * k + 1], 0, 2, 4, 6),
                  __builtin_shufflevector(u[2 * k], u[2 * k + 1], 1, 3, 5, 7));
#else
  double v[8];
  for (int k = 0; k < 8; ++k) {
    const auto e = [&](int l) { return at(x[k], l); };
    v[k] = combine<S>(combine<S>(combine<S>(e(0), e(4)), combine<S>(e(2), e(6))),
                      combine<S>(combine<S>(e(1), e(5)), combine<S>(e(3), e(7))));
  }
  from_array(out, v);
#endif
}
#else
struct Vec8 {
  double v[8];
};
SUS_ALWAYS_INLINE void set_all(Vec8& a, double x) {
  for (double& e : a.v) e = x;
}
SUS_ALWAYS_INLINE void from_array(Vec8& a, const double* x) { std::memcpy(a.v, x, sizeof a.v); }
SUS_ALWAYS_INLINE double at(const Vec8& a, int l) { return a.v[l]; }
SUS_ALWAYS_INLINE void add_to(Vec8& a, const Vec8& b) {
  for (int l = 0; l < 8; ++l) a.v[l] += b.v[l];
}
SUS_ALWAYS_INLINE void mul_to(Vec8& a, const Vec8& b) {
  for (int l = 0; l < 8; ++l) a.v[l] *= b.v[l];
}
SUS_ALWAYS_INLINE void one_minus(const Vec8& x, Vec8& out) {
  for (int l = 0; l < 8; ++l) out.v[l] = 1.0 - x.v[l];
}
SUS_ALWAYS_INLINE void walk_factor(const Vec8& x, Vec8& out) {
  for (int l = 0; l < 8; ++l) out.v[l] = x.v[l] >= 1.0 ? 1.0 : 1.0 - x.v[l];
}
template <class Q>
SUS_ALWAYS_INLINE void load_q8(const Q& q, index_t j, Vec8& out) {
  for (int l = 0; l < 8; ++l) out.v[l] = static_cast<double>(q(j + l));
}
SUS_ALWAYS_INLINE unsigned compare_mask8(const Vec8& x, double v, bool above) {
  unsigned m = 0;
  for (int l = 0; l < 8; ++l) m |= unsigned(above ? x.v[l] > v : x.v[l] < v) << l;
  return m;
}
SUS_ALWAYS_INLINE bool any_not_below(const Vec8 (&x)[8], double v) {
  bool any = false;
  for (int k = 0; k < 8; ++k)
    for (int l = 0; l < 8; ++l) any |= !(x[k].v[l] < v);
  return any;
}
template <ChunkStat S>
SUS_ALWAYS_INLINE double tree_total(const Vec8& lo, const Vec8& hi) {
  double t[8];
  for (int l = 0; l < 8; ++l) t[l] = combine<S>(lo.v[l], hi.v[l]);
  return combine<S>(combine<S>(combine<S>(t[0], t[1]), combine<S>(t[2], t[3])),
                    combine<S>(combine<S>(t[4], t[5]), combine<S>(t[6], t[7])));
}
template <ChunkStat S>
SUS_ALWAYS_INLINE void prefix8(Vec8& x) {
  for (int s = 1; s < 8; s *= 2)
    for (int l = 7; l >= s; --l) x.v[l] = combine<S>(x.v[l], x.v[l - s]);
}
template <ChunkStat S>
SUS_ALWAYS_INLINE void group_totals(const Vec8 (&x)[8], Vec8& out) {
  for (int k = 0; k < 8; ++k) {
    const double* v = x[k].v;
    out.v[k] = combine<S>(combine<S>(combine<S>(v[0], v[4]), combine<S>(v[2], v[6])),
                          combine<S>(combine<S>(v[1], v[5]), combine<S>(v[3], v[7])));
  }
}
#endif

template <ChunkStat S>
SUS_ALWAYS_INLINE void combine_to(Vec8& a, const Vec8& b) {
  if (S == ChunkStat::sum) add_to(a, b);
  else mul_to(a, b);
}

// The lowest set bit of m ≠ 0.
SUS_ALWAYS_INLINE int lowest_bit(unsigned m) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(m);
#else
  int l = 0;
  while (!(m & 1u)) m >>= 1, ++l;
  return l;
#endif
}
SUS_ALWAYS_INLINE int lowest_bit64(std::uint64_t m) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctzll(m);
#else
  int l = 0;
  while (!(m & 1u)) m >>= 1, ++l;
  return l;
#endif
}

// The q of batch [b, b + 64) as 8 groups of 8 doubles, zero past n (vector loads for a whole
// batch; a row's last, shorter batch goes through a buffer).
template <class Q>
SUS_ALWAYS_INLINE void load_batch(const Q& q, index_t b, index_t n, Vec8 (&x)[8]) {
  if (b + kSamplerBatch <= n) {
    for (int k = 0; k < 8; ++k) load_q8(q, b + 8 * k, x[k]);
    return;
  }
  double buf[kSamplerBatch];
  for (index_t l = 0; l < kSamplerBatch; ++l) buf[l] = b + l < n ? static_cast<double>(q(b + l)) : 0.0;
  for (int k = 0; k < 8; ++k) from_array(x[k], buf + 8 * k);
}

// The scan's state between calls: the 16 lanes (lo: 0..7, hi: 8..15), 8 lanes of Σq for the
// independent draw, and the running total at the last batch's end.
struct ScanLanes {
  Vec8 lo, hi, q_sum;
  double total;
};
template <ChunkStat S>
SUS_ALWAYS_INLINE void restart(ScanLanes& s) {
  constexpr double identity = S == ChunkStat::sum ? 0.0 : 1.0;
  set_all(s.lo, identity);
  set_all(s.hi, identity);
  s.total = identity;
}
SUS_ALWAYS_INLINE double q_sum_total(const ScanLanes& s) {
  return lane_sum(0, 8, [&](index_t l) { return at(s.q_sum, static_cast<int>(l)); });
}

// ((a ∘ b) ∘ (c ∘ d)) of four groups.
template <ChunkStat S>
SUS_ALWAYS_INLINE void combine4(const Vec8& a, const Vec8& b, const Vec8& c, const Vec8& d, Vec8& out) {
  Vec8 ab = a, cd = c;
  combine_to<S>(ab, b);
  combine_to<S>(cd, d);
  combine_to<S>(ab, cd);
  out = ab;
}

// Adds a batch to the lanes: lo ∘= (x0 ∘ x2) ∘ (x4 ∘ x6), hi ∘= (x1 ∘ x3) ∘ (x5 ∘ x7) (terms
// q, or 1 − q), so each lane's loop-carried chain is one operation per batch.
template <ChunkStat S>
SUS_ALWAYS_INLINE void add_batch(ScanLanes& s, const Vec8 (&x)[8]) {
  Vec8 lo, hi;
  if constexpr (S == ChunkStat::sum) {
    combine4<S>(x[0], x[2], x[4], x[6], lo);
    combine4<S>(x[1], x[3], x[5], x[7], hi);
  } else {
    Vec8 f[8], q_lo, q_hi;
    for (int k = 0; k < 8; ++k) one_minus(x[k], f[k]);
    combine4<S>(f[0], f[2], f[4], f[6], lo);
    combine4<S>(f[1], f[3], f[5], f[7], hi);
    combine4<ChunkStat::sum>(x[0], x[2], x[4], x[6], q_lo);
    combine4<ChunkStat::sum>(x[1], x[3], x[5], x[7], q_hi);
    add_to(q_lo, q_hi);
    add_to(s.q_sum, q_lo);
  }
  combine_to<S>(s.lo, lo);
  combine_to<S>(s.hi, hi);
}

// add_batch of the whole batch [b, b + 64) loaded from q. With registers narrower than 8
// doubles it goes piece by piece (lanes l of every group, l in one piece), each term added or
// multiplied in as soon as it is loaded: the same operations on every lane in the same order
// (the same bits), but a working set of a few registers. Loading all 8 groups first, as
// add_batch's argument, holds 16 ymm (AVX) or 32 xmm (SSE2) plus the lanes, and GCC, which
// allocates registers in source order, spilled them to the stack on every batch.
template <ChunkStat S, class Q>
SUS_ALWAYS_INLINE void add_whole_batch(ScanLanes& s, const Q& q, index_t b) {
#if defined(SUS_VECTOR_EXTENSIONS) && SUS_VECTOR_BYTES < 64
#pragma GCC unroll 4  // (GCC left the 4 pieces of SSE2 a loop, with the lanes in memory)
  for (int k = 0; k < kPieces; ++k) {
    const index_t j = b + k * kPieceLanes;  // piece k of group g: entries j + 8g ..
    if constexpr (S == ChunkStat::sum) {
      s.lo.p[k] += (load_piece(q, j) + load_piece(q, j + 16)) + (load_piece(q, j + 32) + load_piece(q, j + 48));
      s.hi.p[k] += (load_piece(q, j + 8) + load_piece(q, j + 24)) + (load_piece(q, j + 40) + load_piece(q, j + 56));
    } else {
      // lo: groups 0, 2, 4, 6; hi: 1, 3, 5, 7. Factors (1 − x_a)(1 − x_b), sums x_a + x_b.
      f64p f[2], q_part[2];
      for (int h = 0; h < 2; ++h) {
        f64p fp[2], qp[2];
        for (int e = 0; e < 2; ++e) {
          const f64p xa = load_piece(q, j + 8 * (h + 4 * e)), xb = load_piece(q, j + 8 * (h + 4 * e + 2));
          fp[e] = (1.0 - xa) * (1.0 - xb);
          qp[e] = xa + xb;
        }
        f[h] = fp[0] * fp[1];
        q_part[h] = qp[0] + qp[1];
      }
      s.lo.p[k] *= f[0];
      s.hi.p[k] *= f[1];
      s.q_sum.p[k] += q_part[0] + q_part[1];
    }
  }
#else
  Vec8 x[8];
  for (int k = 0; k < 8; ++k) load_q8(q, b + 8 * k, x[k]);
  add_batch<S>(s, x);
#endif
}

// Whether a batch whose running total ends at `end` holds the draw's next point, whose position
// is `threshold`: systematic, the point lies below the cumulative q at the batch's end;
// independent, the point's survival level lies above the survival at the batch's end.
template <ChunkStat S>
SUS_ALWAYS_INLINE bool hits(double end, double threshold) {
  return S == ChunkStat::sum ? threshold < end : !(end >= threshold);
}

SUS_ALWAYS_INLINE unsigned compare_mask16(const Vec8& lo, const Vec8& hi, double v, bool above) {
  return compare_mask8(lo, v, above) | compare_mask8(hi, v, above) << 8;
}

// Kept entries of one scan call: (column, q_j) pairs, W_j / q_j computed by the caller.
template <class T>
struct KeptBuffer {
  static constexpr int capacity = 4 * kSamplerBatch;
  int count = 0;
  index_t col[capacity];
  T q[capacity];
  SUS_ALWAYS_INLINE void add(index_t j, T qj) {
    col[count] = j;
    q[count] = qj;
    ++count;
  }
};

// The two levels of a walked batch (both draws), from the terms t (q, or the survival factors)
// and the running total `start` at the batch's start: ends lane g = the running total at group
// g's end (the groups' totals by one tree, then their inclusive prefix, then ∘ start), and
// running(g) group g's entries as running totals (their prefix ∘ the end of group g − 1).
// first_past(v, from): the groups from `from` on whose end has passed v (lies above it for
// sums, below it for survivals), as a bit mask.
template <ChunkStat S>
struct TwoLevelTotals {
  const Vec8 (&t)[8];
  double start;
  Vec8 ends;
  SUS_ALWAYS_INLINE TwoLevelTotals(const Vec8 (&terms)[8], double start_) : t(terms), start(start_) {
    Vec8 base;
    group_totals<S>(t, ends);
    prefix8<S>(ends);
    set_all(base, start);
    combine_to<S>(ends, base);
  }
  SUS_ALWAYS_INLINE unsigned past(double v, int from) const {
    return compare_mask8(ends, v, S == ChunkStat::sum) & (0xFFu << from);
  }
  SUS_ALWAYS_INLINE void running(int g, Vec8& out) const {
    Vec8 base;
    out = t[g];
    prefix8<S>(out);
    set_all(base, g > 0 ? at(ends, g - 1) : start);
    combine_to<S>(out, base);
  }
};

// The systematic draw: points u, u+1, ..., u+c−1 on the axis of cumulative q; keep j iff a
// point falls in [C_{j−1}, C_j).
struct SystematicDraw {
  static constexpr ChunkStat stat = ChunkStat::sum;
  double point;     // the next point
  int points_left;  // c − points used
  SUS_ALWAYS_INLINE double threshold() const {
    return points_left > 0 ? point : std::numeric_limits<double>::infinity();
  }
  // Walks batch [b, b + 64) (q zero past the row's end n) from cumulative q `start`, in two
  // levels: the 8 groups' sums (one reduction of all 8 vectors), their running sums E_g (C at
  // each group's end), then only the groups whose end lies above the point are expanded into
  // running sums C_j entry by entry. Keeps the first entry with q > 0 whose C_j lies above the
  // point, moves the point past C_j (an interval of length ≤ 1 holds at most one point;
  // rounding may place the next one inside it too, in which case it is consumed here as well),
  // and looks again after j. A point above every open C_j of a group whose E_g lies above it
  // (rounding between the two levels, ~1e-16) goes to the next group. Returns whether the
  // lanes restart (never).
  template <class Q, class Out>
  SUS_ALWAYS_INLINE bool walk(const Q& q, index_t b, index_t n, double start, Out& out) {
    Vec8 x[8];
    load_batch(q, b, n, x);
    const TwoLevelTotals<ChunkStat::sum> levels(x, start);
    Vec8 C;
    unsigned candidates = 0;
    for (int from = 0, g = -1; points_left > 0;) {
      // the group that holds the point: the first from `from` on whose end lies above it
      const unsigned groups = levels.past(point, from);
      if (!groups) break;
      const int h = lowest_bit(groups);
      if (h != g) {  // group h's running sums
        g = h;
        levels.running(g, C);
        candidates = compare_mask8(x[g], 0.0, true);  // q > 0
      }
      const unsigned hit = compare_mask8(C, point, true) & candidates;  // C_j > point
      if (!hit) {
        from = g + 1;
        if (from == 8) break;
        continue;
      }
      const int l = lowest_bit(hit);
      const index_t j = b + 8 * g + l;
      out.add(j, q(j));
      const double end = at(C, l);
      while (point < end && points_left > 0) {
        point += 1.0;
        --points_left;
      }
      candidates &= ~((2u << l) - 1);
      from = g;
    }
    return false;
  }
};

// The independent draw: a Poisson process on the hazard axis h_j = −log(1 − q_j), tracked in
// survival space to avoid logarithms: with P_j = Π_{l≤j} (1 − q_l) and R the survival level of
// the next point, j holds a point iff P_j < R ≤ P_{j−1}; the point after it has level R·U, U
// uniform on (0, 1] (exponential gaps). Entries with q_j = 1 are always kept (and left out of
// P). After each walked batch R is taken relative to the batch's end and the lanes restart at
// 1. The two-level walk needs the batch's survival to stay in the normal range (E_7 ≥ 1e-280);
// a batch that falls below takes walk_rebased, where P is re-based once it falls below 1e-50,
// so with each group's 16 factors ≥ 2^-53 nothing underflows.
template <class T>
struct IndependentDraw {
  static constexpr ChunkStat stat = ChunkStat::survival;
  const Philox4x32* rng;
  std::uint64_t row;
  std::uint64_t draws = 0;
  double R = 0;  // the next point's level, relative to the last re-basing
  double ahead[16] = {};  // draws [(draws − 1) & ~15, +16): uniform2 of 8 counters at a time
  SUS_ALWAYS_INLINE double uniform_open0() {  // U in (0, 1]: draw k is uniform2(row, k / 2)[k & 1]
    const unsigned k = static_cast<unsigned>(draws++ & 15);
    if (k == 0) rng->uniform16(row, (draws - 1) / 2, ahead);
    return 1.0 - ahead[(k >> 1) + 8 * (k & 1)];
  }
  SUS_ALWAYS_INLINE double threshold() const { return R; }
  // Batch [b, b + 64) from survival `start`, in two levels: the 8 groups' products (one
  // reduction of all 8 vectors), their running products E_g (the survival at each group's
  // end), then only the groups whose end lies below R are expanded into running products
  // entry by entry. A group is left when its end no longer lies below R (the next point lies
  // further on); a point that lies below E_g but above every open entry of group g (rounding
  // between the two levels, ~1e-16) goes to the next group. Rows whose survival would leave the
  // normal range inside the batch (E_7 < 1e-280, so that R, which a draw can take 2^-53 below
  // E_7, stays normal too; only where a batch holds tens of q within 1e-5 of 1) take
  // walk_rebased, which re-bases as it goes.
  template <class Q, class Out>
  SUS_ALWAYS_INLINE bool walk(const Q& q, index_t b, index_t n, double start, Out& out) {
    Vec8 x[8], f[8];
    load_batch(q, b, n, x);
    const index_t rest = n - b;
    const std::uint64_t in_row = rest >= kSamplerBatch ? ~std::uint64_t{0} : (std::uint64_t{1} << rest) - 1;
    // q ≥ 1 is always kept (and its factor is 1); q < 1 may hold a point. Most batches have
    // no q ≥ 1, and their factors are 1 − q.
    std::uint64_t kept = 0;
    if (any_not_below(x, 1.0)) {
      std::uint64_t below_one = 0;
      for (int k = 0; k < 8; ++k) below_one |= std::uint64_t{compare_mask8(x[k], 1.0, false)} << (8 * k);
      kept = ~below_one & in_row;
      for (int k = 0; k < 8; ++k) walk_factor(x[k], f[k]);
    } else {
      for (int k = 0; k < 8; ++k) one_minus(x[k], f[k]);
    }
    // Points go to entries with 0 < q < 1 only: a q = 0 entry (or the padding past the row's
    // end) repeats the survival before it only up to the prefix's rounding, and keeping it
    // would store W / q = 0 / 0. (Computed for the groups that are expanded.)
    const auto open_in = [&](int g) {
      return compare_mask8(x[g], 1.0, false) & compare_mask8(x[g], 0.0, true) &
             static_cast<unsigned>(in_row >> (8 * g)) & 0xFFu;
    };
    const TwoLevelTotals<ChunkStat::survival> levels(f, start);
    const double end = at(levels.ends, 7);
    if (!(end >= 1e-280)) return walk_rebased(q, b, n, start, out);
    Vec8 P;
    unsigned candidates = 0;
    for (int from = 0, g = -1;;) {
      // the group that holds the next point: the first from `from` on whose end lies below R
      const unsigned groups = levels.past(R, from);
      if (!groups) break;
      const int h = lowest_bit(groups);
      if (h != g) {  // group h's running products
        g = h;
        levels.running(g, P);
        candidates = open_in(g);
      }
      const unsigned hit = compare_mask8(P, R, false) & candidates;  // P_j < R
      if (!hit) {
        from = g + 1;
        if (from == 8) break;
        continue;
      }
      const int l = lowest_bit(hit);
      kept |= std::uint64_t{1} << (8 * g + l);
      const double level = at(P, l);
      do R *= uniform_open0();  // several points in one interval keep j once
      while (level < R);
      candidates &= ~((2u << l) - 1);
      from = g;
    }
    for (; kept; kept &= kept - 1) {
      const index_t j = b + lowest_bit64(kept);
      out.add(j, q(j));
    }
    R /= end;
    return true;
  }
  // The same draw in groups of 16 with the survival re-based below 1e-50 (each group's 16
  // factors ≥ 2^-53, so nothing underflows), for batches where the two-level walk's
  // products would leave the normal range.
  template <class Q, class Out>
  SUS_NOINLINE bool walk_rebased(const Q& q, index_t b, index_t n, double start, Out& out) {
    Vec8 x[8];
    load_batch(q, b, n, x);
    unsigned below_one[4], positive[4];
    for (int g = 0; g < 4; ++g) {
      below_one[g] = compare_mask16(x[2 * g], x[2 * g + 1], 1.0, false);
      positive[g] = compare_mask16(x[2 * g], x[2 * g + 1], 0.0, true);
    }
    for (int k = 0; k < 8; ++k) {
      walk_factor(x[k], x[k]);
      prefix8<ChunkStat::survival>(x[k]);
    }
    double base[8], ends[4];
    bool rebase[4];
    double run = start;
    for (int g = 0; g < 4; ++g) {
      base[2 * g] = run;
      run = at(x[2 * g], 7) * run;
      base[2 * g + 1] = run;
      run = at(x[2 * g + 1], 7) * run;
      ends[g] = run;
      rebase[g] = run < 1e-50;
      if (rebase[g]) run = 1;
    }
    for (int g = 0; g < 4; ++g) {
      Vec8& lo = x[2 * g];
      Vec8& hi = x[2 * g + 1];
      // 0 < q < 1 may hold a point; q ≥ 1 is always kept. A q = 0 entry, like the padding past
      // the row's end, repeats the P before it only up to rounding of the prefix: masked out.
      const index_t rest = n - (b + kSamplerChunk * g);
      const unsigned in_row = rest >= kSamplerChunk ? 0xFFFFu : rest > 0 ? (1u << rest) - 1 : 0u;
      const unsigned open = below_one[g] & positive[g] & in_row, certain = ~below_one[g] & 0xFFFFu;
      Vec8 bv;
      set_all(bv, base[2 * g]);
      combine_to<ChunkStat::survival>(lo, bv);
      set_all(bv, base[2 * g + 1]);
      combine_to<ChunkStat::survival>(hi, bv);
      unsigned kept = certain, candidates = open;
      for (;;) {
        const unsigned hit = compare_mask16(lo, hi, R, false) & candidates;  // P_j < R
        if (!hit) break;
        const int l = lowest_bit(hit);
        kept |= 1u << l;
        const double level = l < 8 ? at(lo, l) : at(hi, l - 8);
        do R *= uniform_open0();  // several points in one interval keep j once
        while (level < R);
        candidates &= ~((2u << l) - 1);
      }
      for (; kept; kept &= kept - 1) {
        const index_t j = b + kSamplerChunk * g + lowest_bit(kept);
        out.add(j, q(j));
      }
      if (rebase[g]) R /= ends[g];
    }
    R /= run;
    return true;
  }
};

// One batch [b, b + 64) into the lanes, walked if it hits. Whole: b + 64 ≤ n. The walk loads
// the batch again (through q.hidden()), so that the scan's terms never leave registers.
template <bool Whole, class Q, class D, class Out>
SUS_ALWAYS_INLINE void scan_batch(const Q& q, index_t b, index_t n, ScanLanes& s, D& d, Out& out) {
  constexpr ChunkStat S = D::stat;
  const double start = s.total;
  if (Whole) {
    add_whole_batch<S>(s, q, b);
  } else {
    Vec8 x[8];
    load_batch(q, b, n, x);
    add_batch<S>(s, x);
  }
  s.total = tree_total<S>(s.lo, s.hi);
  if (hits<S>(s.total, d.threshold()) && d.walk(q.hidden(), b, n, start, out)) restart<S>(s);
}

// Scans the row from batch start b until its end or until `out` has no room for another
// batch's keeps; returns where it stopped. Not inlined, on purpose: nothing in it calls out,
// so the lanes and the draw's state stay in registers (every vector register is caller-saved;
// next to push_backs GCC kept the lanes in memory, a store-to-load round trip per batch).
template <class Q, class D, class Out>
SUS_NOINLINE index_t scan_part(const Q& q, index_t b, index_t n, ScanLanes& lanes, D& draw, Out& out) {
  ScanLanes s = lanes;
  D d = draw;
  for (; b + kSamplerBatch <= n && out.count <= Out::capacity - kSamplerBatch; b += kSamplerBatch)
    scan_batch<true>(q, b, n, s, d, out);
  if (b < n && b + kSamplerBatch > n && out.count <= Out::capacity - kSamplerBatch) {  // the last, shorter batch
    scan_batch<false>(q, b, n, s, d, out);
    b = n;
  }
  lanes = s;
  draw = d;
  return b;
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
  // Draws the row; returns Σ_j q_j (summed in no fixed order, see detail::scan_part).
  template <class Q>
  double draw(index_t row, const Q& q, const T* w, index_t n, std::vector<index_t>& cols, std::vector<T>& vals) {
    const auto r = static_cast<std::uint64_t>(row);
    if (opt_.draw == Draw::systematic) {
      detail::SystematicDraw d{rng_.uniform2(r, detail::kSystematicStream)[0], opt_.c};
      return scan(q, w, n, d, cols, vals);
    }
    detail::IndependentDraw<T> d{&rng_, r};
    d.R = d.uniform_open0();
    return scan(q, w, n, d, cols, vals);
  }

  template <class Q, class D>
  double scan(const Q& q, const T* w, index_t n, D& d, std::vector<index_t>& cols, std::vector<T>& vals) {
    detail::ScanLanes lanes;
    detail::restart<D::stat>(lanes);
    detail::set_all(lanes.q_sum, 0.0);
    index_t b = 0;
    do {
      kept_.count = 0;
      b = detail::scan_part(q, b, n, lanes, d, kept_);
      for (int k = 0; k < kept_.count; ++k) {
        cols.push_back(kept_.col[k]);
        vals.push_back(w[kept_.col[k]] / kept_.q[k]);
      }
    } while (b < n);
    return D::stat == detail::ChunkStat::sum ? lanes.total : detail::q_sum_total(lanes);
  }

  SamplerOptions opt_;
  detail::Philox4x32 rng_;
  detail::KeptBuffer<T> kept_;
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
