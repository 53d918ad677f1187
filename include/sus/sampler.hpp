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
// The scan skips whole chunks of the row that hold no point, so its cost is a few vectorised
// passes over the row plus O(kept · chunk).
//
// Random numbers come from Philox4x32-10 keyed by the seed, with the row index in the counter:
// a row's draw depends only on (seed, row, W_i·) — not on processing order or thread count.
// Probabilities are computed in double from the weights; they are exact up to rounding.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
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
    q_.resize(static_cast<std::size_t>(n));
    const double total_q = inclusion_probabilities(w, n, opt_.c, opt_.budget, q_.data());
    if (total_q <= 0) return 0;
    const index_t before = static_cast<index_t>(cols.size());
    if (opt_.draw == Draw::systematic) sample_systematic(row, w, n, cols, vals);
    else sample_independent(row, w, n, cols, vals);
    return static_cast<index_t>(cols.size()) - before;
  }

 private:
  // Entries per skip test: small enough that most chunks hold no point (a row of n entries
  // has ~c points, so ~c chunks are scanned entry by entry), large enough to amortise the test.
  static constexpr index_t kChunk = 16;
  static_assert(kChunk > 0 && kChunk % 8 == 0, "RowSampler::kChunk must be a positive multiple of 8");

  // Π_{j∈[b,e)} (1 − q_j) over the entries with q_j < 1 (lane_product's order, so its bits),
  // and whether any q_j = 1. A full chunk goes through fixed-length loops without branches,
  // which the compiler turns into vector instructions (the test runs once per kChunk weights
  // and is most of the sampler's time).
  static SUS_ALWAYS_INLINE double chunk_survival(const T* q, index_t b, index_t e, bool& certain) {
    if (e - b != kChunk) {
      for (index_t j = b; j < e; ++j) certain |= q[j] >= T(1);
      return detail::lane_product(b, e, [&](index_t j) { return q[j] < T(1) ? 1.0 - static_cast<double>(q[j]) : 1.0; });
    }
    double acc[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    int any = 0;
    for (index_t k = 0; k < kChunk; k += 8)
      for (int l = 0; l < 8; ++l) {
        const double x = static_cast<double>(q[b + k + l]);
        any |= x >= 1.0;
        acc[l] *= x < 1.0 ? 1.0 - x : 1.0;
      }
    certain = any != 0;
    return ((acc[0] * acc[1]) * (acc[2] * acc[3])) * ((acc[4] * acc[5]) * (acc[6] * acc[7]));
  }

  void keep(index_t j, const T* w, std::vector<index_t>& cols, std::vector<T>& vals) const {
    cols.push_back(j);
    vals.push_back(w[j] / q_[j]);
  }

  // Points u, u+1, ..., u+c−1 on the axis of cumulative q; keep j iff a point falls in
  // [C_{j−1}, C_j). Chunks whose q-sum ends before the next point are skipped whole.
  void sample_systematic(index_t row, const T* w, index_t n, std::vector<index_t>& cols, std::vector<T>& vals) {
    const T* q = q_.data();
    double point = rng_.uniform2(static_cast<std::uint64_t>(row), detail::kSystematicStream)[0];
    int points_left = opt_.c;
    double h = 0;  // cumulative q at the start of the current chunk
    for (index_t b = 0; b < n && points_left > 0; b += kChunk) {
      const index_t e = std::min(n, b + kChunk);
      const double chunk = detail::lane_sum(b, e, [&](index_t j) { return static_cast<double>(q[j]); });
      if (point >= h + chunk) {
        h += chunk;
        continue;
      }
      for (index_t j = b; j < e; ++j) {
        const double h_next = h + q[j];
        if (point < h_next && points_left > 0) {
          keep(j, w, cols, vals);
          // An interval of length ≤ 1 holds at most one point; rounding may place the next
          // one inside it too, in which case it is consumed here as well.
          while (point < h_next && points_left > 0) {
            point += 1.0;
            --points_left;
          }
        }
        h = h_next;
      }
    }
  }

  // Independent Bernoulli(q_j) draws as a Poisson process on the hazard axis
  // h_j = −log(1 − q_j), tracked in survival space to avoid logarithms: with
  // P_j = Π_{l≤j} (1 − q_l) (relative to the chunk start) and R the survival level of the next
  // point, j holds a point iff P_j < R ≤ P_{j−1}; the point after it has level R·U, U uniform
  // on (0, 1] (exponential gaps). Entries with q_j = 1 are always kept.
  void sample_independent(index_t row, const T* w, index_t n, std::vector<index_t>& cols, std::vector<T>& vals) {
    const T* q = q_.data();
    std::uint64_t draws = 0;
    std::array<double, 2> pair{};
    auto uniform_open0 = [&]() {  // U in (0, 1]
      if ((draws & 1) == 0) pair = rng_.uniform2(static_cast<std::uint64_t>(row), draws / 2);
      return 1.0 - pair[draws++ & 1];
    };
    double R = uniform_open0();
    for (index_t b = 0; b < n; b += kChunk) {
      const index_t e = std::min(n, b + kChunk);
      bool certain = false;  // some q_j = 1 in the chunk
      const double survival = chunk_survival(q, b, e, certain);
      if (!certain && survival >= R) {  // no point and no certain entry in this chunk
        R /= survival;
        continue;
      }
      double P = 1;
      for (index_t j = b; j < e; ++j) {
        if (q[j] >= T(1)) {
          keep(j, w, cols, vals);
          continue;
        }
        P *= 1.0 - static_cast<double>(q[j]);
        if (P < R) {
          keep(j, w, cols, vals);
          do R *= uniform_open0();  // several points in one interval keep j once
          while (P < R);
        }
        if (P < 1e-200) {  // rescale before underflow; R ≤ P here, so R/P ≤ 1
          R /= P;
          P = 1;
        }
      }
      R /= P;
    }
  }

  SamplerOptions opt_;
  detail::Philox4x32 rng_;
  std::vector<T> q_;
};

namespace detail {

// Checks that W is a matrix of recorded softmax weights: finite, ≥ 0, and each row either
// sums to 1 (within row_sum_tolerance<T>()) or is all zero (a fully masked row).
template <class T>
void check_weights(const char* fn, const char* arg, const ConstMatrixRef<T>& W) {
  for (index_t i = 0; i < W.rows(); ++i) {
    const T* w = W.row(i).data();
    const index_t n = W.cols();
    // Fast path (vectorised): a finite sum and a non-negative minimum imply finite, ≥ 0 entries.
    const double sum = lane_sum(0, n, [&](index_t j) { return static_cast<double>(w[j]); });
    T lowest = 0;
    for (index_t j = 0; j < n; ++j) lowest = std::min(lowest, w[j]);
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
