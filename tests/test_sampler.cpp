// Tests of the SUS sampler: include/sus/sampler.hpp (inclusion_probabilities, RowSampler,
// sample_mask), its random numbers include/sus/detail/philox.hpp, and the textbook sampler
// sus::reference::sample_mask (include/sus/reference.hpp).
//
// Test cases (each names its target):
//   philox: Random123 known-answer vectors ............ detail::Philox4x32 round function, key schedule,
//                                                        seed/counter -> word mapping, uniform2,
//                                                        uniform16 == 8 x uniform2
//   sampler: inclusion frequencies match q ............ sample_mask and reference::sample_mask, all
//                                                        Budget x Draw, float/double: P(keep) = q, kept
//                                                        value = W/q, q=0 never / q=1 always kept
//                                                        (the acceptance test of the sampler)
//   sampler: systematic fast and reference masks are identical
//                                                        sample_mask == reference::sample_mask bit for bit
//   sampler: systematic hard cap ...................... row count <= c, and in {floor, ceil}(sum q)
//   sampler: waterfill spends min of c and support .... inclusion_probabilities: sum q = min(c, support),
//                                                        one common lambda >= c, dominates paper's q
//   sampler: independent row counts and independence .. independent: E[row count] = sum q <= c,
//                                                        not capped, pairs of entries independent
//   sampler: determinism and row keying ............... same seed -> same bits, seed matters, a row's
//                                                        draw depends only on (seed, row, W_i.)
//   sampler: RowSampler and truncated rows ............ RowSampler == sample_mask row by row, in any row
//                                                        order; a row cut at len (zeros after) samples
//                                                        like the full row (SusMask relies on it)
//   sampler: the scan equals the draw written out in scalar code
//                                                        RowSampler (vector lanes, batch tests, vector
//                                                        walks, paper q on the fly, buffered keeps) ==
//                                                        the draw written out one scalar operation at a
//                                                        time, bit for bit; the vector primitives ==
//                                                        their scalar definitions
//   sampler: edge cases c=1 n=1 zero rows empty shapes  c = 1, n = 1, all-zero rows, empty shapes
//   sampler: argument errors .......................... sus::Error for bad options and bad W
//
// Statistical tests use fixed seeds (so a given build passes or fails deterministically); the
// false-failure probability stated with each is over the choice of seeds, i.e. the probability
// that a correct sampler fails.
#include <catch2/catch.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using sus::Budget;
using sus::Csr;
using sus::Draw;
using sus::index_t;
using sus::SamplerOptions;
template <class T>
using Mat = sus::Matrix<T>;

constexpr std::array<Budget, 2> kBudgets = {Budget::paper, Budget::waterfill};
constexpr std::array<Draw, 2> kDraws = {Draw::independent, Draw::systematic};

SamplerOptions make_options(int c, Budget b, Draw d, std::uint64_t seed) {
  SamplerOptions o;
  o.c = c;
  o.budget = b;
  o.draw = d;
  o.seed = seed;
  return o;
}

// Softmax of `scores` (computed in double), written into row i of W.
void set_softmax_row(Mat<double>& W, index_t i, const Eigen::RowVectorXd& scores) {
  const double m = scores.maxCoeff();
  const Eigen::RowVectorXd e = (scores.array() - m).exp().matrix();
  W.row(i) = e / e.sum();
}

// Softmax of uniform[-scale, scale] scores over the columns in `support` (all columns if empty);
// every other entry is exactly zero.
void set_random_row(Mat<double>& W, index_t i, std::uint64_t seed, double scale, std::vector<index_t> support = {}) {
  if (support.empty())
    for (index_t j = 0; j < W.cols(); ++j) support.push_back(j);
  const auto s = sus_test::random_matrix<double>(1, static_cast<index_t>(support.size()), seed, scale);
  Mat<double> sub(1, static_cast<index_t>(support.size()));
  set_softmax_row(sub, 0, s.row(0));
  W.row(i).setZero();
  for (std::size_t t = 0; t < support.size(); ++t) W(i, support[t]) = sub(0, static_cast<index_t>(t));
}

template <class T>
Mat<T> inclusion_matrix(const Mat<T>& W, int c, Budget b) {
  Mat<T> q(W.rows(), W.cols());
  for (index_t i = 0; i < W.rows(); ++i) sus::inclusion_probabilities(W.row(i).data(), W.cols(), c, b, q.row(i).data());
  return q;
}

template <class T>
Csr<T> draw_mask(const Mat<T>& W, const SamplerOptions& o, bool reference) {
  return reference ? sus::reference::sample_mask<T>(W, o) : sus::sample_mask(W, o);
}

template <class T>
bool same_row(const Csr<T>& a, index_t ia, const Csr<T>& b, index_t ib) {
  const index_t na = a.row_nnz(ia), nb = b.row_nnz(ib);
  if (na != nb) return false;
  const index_t pa = a.row_offsets[ia], pb = b.row_offsets[ib];
  for (index_t t = 0; t < na; ++t) {
    if (a.col_indices[pa + t] != b.col_indices[pb + t]) return false;
    // bitwise: the values must be the same float, not merely close
    if (std::memcmp(&a.values[pa + t], &b.values[pb + t], sizeof(T)) != 0) return false;
  }
  return true;
}

template <class T>
bool same_mask(const Csr<T>& a, const Csr<T>& b) {
  if (a.rows != b.rows || a.cols != b.cols || a.row_offsets != b.row_offsets || a.col_indices != b.col_indices) return false;
  return a.values.empty() || std::memcmp(a.values.data(), b.values.data(), a.values.size() * sizeof(T)) == 0;
}

// Exact two-sided binomial p-value of k successes in n trials with success probability q,
// 0 < q < 1: min(1, 2·min(P(X <= k), P(X >= k))). Sums the pmf from k outwards until the
// terms are negligible (< 1e-17 of the tail, past the mean, where they decay geometrically).
double binomial_two_sided_p(std::int64_t n, double q, std::int64_t k) {
  const double nd = static_cast<double>(n), mean = nd * q, r = q / (1 - q);
  const double kd = static_cast<double>(k);
  double term = std::exp(std::lgamma(nd + 1) - std::lgamma(kd + 1) - std::lgamma(nd - kd + 1) + kd * std::log(q) +
                         (nd - kd) * std::log1p(-q));
  double tail = 0;
  if (kd >= mean) {
    for (std::int64_t x = k; x <= n; ++x) {
      tail += term;
      if (static_cast<double>(x) > mean && term <= 1e-17 * tail) break;
      term *= (nd - static_cast<double>(x)) / (static_cast<double>(x) + 1) * r;
    }
  } else {
    for (std::int64_t x = k; x >= 0; --x) {
      tail += term;
      if (static_cast<double>(x) < mean && term <= 1e-17 * tail) break;
      term *= static_cast<double>(x) / (nd - static_cast<double>(x) + 1) / r;
    }
  }
  return std::min(1.0, 2 * tail);
}

// ---------------------------------------------------------------------------------------------
// The matrices of the inclusion-frequency test. Each row targets one kind of weight row.
// ---------------------------------------------------------------------------------------------
struct FreqMatrix {
  const char* name;
  int c;
  Mat<double> W;
};

std::vector<FreqMatrix> frequency_matrices() {
  std::vector<FreqMatrix> out;
  {  // A: c = 4 < n = 12
    Mat<double> W = Mat<double>::Zero(12, 12);
    set_random_row(W, 0, 101, 1.0);                                    // random softmax row
    set_random_row(W, 1, 102, 3.0);                                    // peaked random row
    W.row(2).setConstant(1.0 / 12);                                    // uniform
    W(3, 5) = 1;                                                       // one-hot
    W.row(4).setConstant(0.1 / 9);                                     // three tied maxima 0.3 > 1/c
    W(4, 2) = W(4, 6) = W(4, 9) = 0.3;                                 //   (saturated ties)
    for (index_t j = 0; j < 12; j += 2) W(5, j) = 1.0 / 6;             // six ties < 1/c, exact zeros
    set_random_row(W, 6, 103, 2.0, {1, 3, 4, 8, 11});                  // random with exact zeros
    W(7, 0) = 0.9, W(7, 7) = 0.05, W(7, 11) = 0.05;                    // support 3 < c
    W.row(8).setConstant(0.03), W(8, 0) = 0.5, W(8, 1) = 0.2;          // waterfill needs 2 steps
    /* row 9 stays all zero */                                         // fully masked row
    W.row(10).setConstant(0.1 / 11), W(10, 4) = 0.9;                   // one big, many small
    W(11, 0) = 0.5, W(11, 1) = 0.25, W(11, 2) = 0.149, W(11, 3) = 0.1, // q near 1 and q near 0
        W(11, 4) = 0.001;                                              //   (waterfill: .99, .0099)
    out.push_back({"A (c=4, n=12)", 4, W});
  }
  {  // B: c = 8 > n = 5 (row length smaller than the budget)
    Mat<double> W = Mat<double>::Zero(7, 5);
    set_random_row(W, 0, 201, 1.0);                                    // random
    W.row(1).setConstant(0.2);                                         // uniform: all saturated
    W(2, 0) = 1;                                                       // one-hot
    W.row(3).setConstant(0.01), W(3, 0) = 0.96;                        // peaked
    W(4, 0) = W(4, 2) = 0.5;                                           // exact zeros
    /* row 5 stays all zero */                                         // fully masked row
    W(6, 0) = 0.999, W(6, 1) = W(6, 2) = 0.0005;                       // tiny q = 0.004
    out.push_back({"B (c=8, n=5)", 8, W});
  }
  {  // C: c = 1
    Mat<double> W = Mat<double>::Zero(4, 6);
    set_random_row(W, 0, 301, 1.5);                                    // random
    W.row(1).setConstant(1.0 / 6);                                     // uniform
    W(2, 3) = 1;                                                       // one-hot
    W(3, 1) = W(3, 4) = 0.5;                                           // two ties, zeros
    out.push_back({"C (c=1, n=6)", 1, W});
  }
  return out;
}

struct FreqConfig {
  std::string name;
  const FreqMatrix* m;
  bool is_float;
  Budget budget;
  Draw draw;
  bool reference;
};

// Runs N draws of one configuration and checks every entry. Returns nothing; CHECKs inside.
template <class T>
void check_frequencies(const FreqConfig& cfg, std::int64_t N, double alpha_each) {
  const Mat<T> W = cfg.m->W.template cast<T>();
  const int c = cfg.m->c;
  const Mat<T> q = inclusion_matrix(W, c, cfg.budget);
  Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic> count =
      Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic>::Zero(W.rows(), W.cols());
  double max_value_err = 0;  // max relative |kept value − W/q|
  bool valid = true;
  for (std::int64_t s = 0; s < N; ++s) {
    const Csr<T> mask = draw_mask(W, make_options(c, cfg.budget, cfg.draw, static_cast<std::uint64_t>(s)), cfg.reference);
    if (s < 50) {  // structure (sorted unique in-range columns) on a few draws; cheap enough
      try {
        mask.validate();
      } catch (const sus::Error&) {
        valid = false;
      }
    }
    for (index_t i = 0; i < mask.rows; ++i)
      for (index_t p = mask.row_offsets[i]; p < mask.row_offsets[i + 1]; ++p) {
        const index_t j = mask.col_indices[p];
        ++count(i, j);
        const double expect = static_cast<double>(W(i, j)) / static_cast<double>(q(i, j));
        max_value_err = std::max(max_value_err, std::abs(static_cast<double>(mask.values[p]) - expect) / expect);
      }
  }
  INFO("configuration: " << cfg.name << ", N = " << N << " draws");
  CHECK(valid);
  // kept value = W_ij / q_ij (relative 1e-6; float division is exact to 6e-8)
  INFO("max relative error of a kept value against W/q: " << max_value_err);
  CHECK(max_value_err <= 1e-6);

  // Exact checks for q = 0 (never kept) and q = 1 (always kept), and the binomial test.
  int exact_violations = 0, stat_failures = 0;
  std::ostringstream first_exact, worst;
  double worst_p = 2;
  for (index_t i = 0; i < W.rows(); ++i)
    for (index_t j = 0; j < W.cols(); ++j) {
      const double qd = static_cast<double>(q(i, j));
      const std::int64_t k = count(i, j);
      if (qd == 0 || qd == 1) {
        const std::int64_t want = qd == 0 ? 0 : N;
        if (k != want && exact_violations++ == 0)
          first_exact << "(" << i << "," << j << ") q = " << qd << " kept " << k << " times, expected " << want;
        continue;
      }
      const double z = (static_cast<double>(k) - N * qd) / std::sqrt(N * qd * (1 - qd));
      const double p = binomial_two_sided_p(N, qd, k);
      if (p < alpha_each) ++stat_failures;
      if (p < worst_p) {
        worst_p = p;
        worst.str("");
        worst << "(" << i << "," << j << ") W = " << static_cast<double>(W(i, j)) << " q = " << qd << " count = " << k
              << " expected " << N * qd << " z = " << z << " exact two-sided p = " << p;
      }
    }
  INFO("first q in {0,1} violation: " << first_exact.str());
  CHECK(exact_violations == 0);
  INFO("entries failing the binomial test: " << stat_failures << "; per-test level " << alpha_each
                                               << "; most extreme entry " << worst.str());
  CHECK(stat_failures == 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 known-answer tests from Random123's kat_vectors ("philox4x32 10" lines).
// Mapping (philox.hpp): seed low 32 bits -> key[0], high -> key[1]; counter argument c0 ->
// words x0 (low), x1 (high); c1 -> x2 (low), x3 (high).
// ---------------------------------------------------------------------------------------------
TEST_CASE("philox: Random123 known-answer vectors", "[sampler][philox]") {
  struct Kat {
    const char* name;
    std::array<std::uint32_t, 4> ctr;
    std::array<std::uint32_t, 2> key;
    std::array<std::uint32_t, 4> expected;
  };
  const Kat kats[] = {
      // target: rounds and multipliers with an all-zero state
      {"zero counter, zero key", {0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      // target: 32-bit wrap-around of products and of the Weyl key schedule
      {"all-ones counter and key",
       {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      // target: word order of counter and key (every word distinct: digits of pi)
      {"pi digits",
       {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    INFO("vector: " << k.name);
    const std::uint64_t seed = std::uint64_t{k.key[0]} | std::uint64_t{k.key[1]} << 32;
    const std::uint64_t c0 = std::uint64_t{k.ctr[0]} | std::uint64_t{k.ctr[1]} << 32;
    const std::uint64_t c1 = std::uint64_t{k.ctr[2]} | std::uint64_t{k.ctr[3]} << 32;
    const sus::detail::Philox4x32 rng(seed);
    const auto out = rng(c0, c1);
    for (int w = 0; w < 4; ++w) {
      CAPTURE(w, out[w], k.expected[w]);
      CHECK(out[w] == k.expected[w]);
    }
    // uniform2: 53 bits from words (x0:x1) and (x2:x3), scaled by 2^-53, so in [0, 1).
    const auto u = rng.uniform2(c0, c1);
    const double u0 = static_cast<double>((std::uint64_t{out[0]} << 32 | out[1]) >> 11) / 9007199254740992.0;
    const double u1 = static_cast<double>((std::uint64_t{out[2]} << 32 | out[3]) >> 11) / 9007199254740992.0;
    CHECK(u[0] == u0);
    CHECK(u[1] == u1);
    CHECK((u[0] >= 0 && u[0] < 1 && u[1] >= 0 && u[1] < 1));
    // uniform16 (8 counters at a time; the AVX-512 lanes where the build has them): the same
    // bits as uniform2 counter by counter, here and across a carry into the high word of c1.
    // (Without AVX-512 it is uniform2 in a loop and this only checks the lane layout; the
    // native/ build on an AVX-512 host runs the vector path, which the #if below insists on.)
#if defined(__AVX512F__) && defined(__AVX512DQ__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(SUS_PHILOX_AVX512)
#error "an AVX-512 build must test Philox4x32::uniform16's vector path (SUS_PHILOX_AVX512)"
#endif
    for (const std::uint64_t first : {c1, std::uint64_t{0xfffffffc}, ~std::uint64_t{0} - 3}) {
      double many[16];
      rng.uniform16(c0, first, many);
      for (std::uint64_t j = 0; j < 8; ++j) {
        const auto v = rng.uniform2(c0, first + j);
        CAPTURE(first, j);
        CHECK(many[j] == v[0]);
        CHECK(many[8 + j] == v[1]);
      }
    }
  }
  // The same on 2,000 random keys and counters (fixed seed): the vector path's conversion to
  // double and every word of the state, beyond the few published vectors.
  std::mt19937_64 next(2026);
  int mismatches = 0;
  for (int t = 0; t < 2000; ++t) {
    const sus::detail::Philox4x32 rng(next());
    const std::uint64_t c0 = next(), first = next();
    double many[16];
    rng.uniform16(c0, first, many);
    for (std::uint64_t j = 0; j < 8; ++j) {
      const auto v = rng.uniform2(c0, first + j);
      mismatches += (many[j] != v[0]) + (many[8 + j] != v[1]);
    }
  }
  CHECK(mismatches == 0);
}

// ---------------------------------------------------------------------------------------------
// The acceptance test: P(entry (i, j) kept) = q_ij for every budget x draw, for the fast and
// the reference sampler, float and double, on the rows of frequency_matrices().
//
// N = 20,000 draws (seeds 0..N-1). For each tested entry (0 < q < 1) the count is
// Binomial(N, q); z = (count − N q) / sqrt(N q (1 − q)) is printed, and the entry fails when its
// exact two-sided binomial p-value is below alpha / (number of tested entries over ALL
// configurations) — Bonferroni, so the total false-failure probability is <= alpha = 1e-3.
// The decision uses exact binomial tails rather than |z| > normal_two_sided_quantile(...):
// at this Bonferroni level (z ≈ 5) the normal tail understates the binomial two-sided tail
// by ~2.7x at N q (1 − q) ≈ 100 and ~12x at ≈ 20 (computed for N = 20,000), and several tested
// entries have q ≈ 0.004. The normal quantile is printed for comparison.
// Entries with q = 0 must never be kept and q = 1 always: exact checks.
// ---------------------------------------------------------------------------------------------
TEST_CASE("sampler: inclusion frequencies match q", "[sampler][statistical]") {
  constexpr std::int64_t N = 20000;
  constexpr double alpha = 1e-3;
  const std::vector<FreqMatrix> mats = frequency_matrices();

  // Sanity of the test inputs: rows sum to 1 or are all zero (sample_mask checks this too).
  for (const auto& m : mats)
    for (index_t i = 0; i < m.W.rows(); ++i) {
      const double s = m.W.row(i).sum();
      INFO(m.name << " row " << i << " sums to " << s);
      REQUIRE((s == 0 || std::abs(s - 1) < 1e-12));
    }

  std::vector<FreqConfig> configs;
  for (const auto& m : mats)
    for (bool is_float : {false, true})
      for (Budget b : kBudgets)
        for (Draw d : kDraws)
          for (bool ref : {false, true}) {
            std::ostringstream name;
            name << (is_float ? "float " : "double ") << (ref ? "reference::sample_mask " : "sample_mask ") << m.name
                 << " " << sus::to_string(b) << "/" << sus::to_string(d);
            configs.push_back({name.str(), &m, is_float, b, d, ref});
          }

  // Number of binomial tests over all configurations (entries with 0 < q < 1).
  std::int64_t n_tests = 0;
  for (const auto& cfg : configs) {
    auto count_open = [&](const auto& q) {
      for (index_t i = 0; i < q.rows(); ++i)
        for (index_t j = 0; j < q.cols(); ++j) n_tests += q(i, j) > 0 && q(i, j) < 1;
    };
    if (cfg.is_float) count_open(inclusion_matrix(Mat<float>(cfg.m->W.cast<float>()), cfg.m->c, cfg.budget));
    else count_open(inclusion_matrix(cfg.m->W, cfg.m->c, cfg.budget));
  }
  REQUIRE(n_tests > 0);
  const double alpha_each = alpha / static_cast<double>(n_tests);
  INFO(n_tests << " binomial tests; per-test level " << alpha_each << " (normal |z| threshold would be "
               << sus_test::normal_two_sided_quantile(alpha_each) << ")");

  for (const auto& cfg : configs) {
    if (cfg.is_float) check_frequencies<float>(cfg, N, alpha_each);
    else check_frequencies<double>(cfg, N, alpha_each);
  }
}

// ---------------------------------------------------------------------------------------------
// Systematic draw: sample_mask and reference::sample_mask use the same per-row uniform u, so
// their masks must be identical (columns and values, bitwise). They compute the prefix sums
// with different roundings, so a mismatch could arise when a point u + k lies within ~1e-16 of
// an interval boundary: probability < 1e-12 over all rows below (no false failure in practice).
// ---------------------------------------------------------------------------------------------
template <class T>
void check_systematic_matches_reference(const Mat<T>& W, int c, Budget b, std::uint64_t seeds, const char* what) {
  std::int64_t mismatches = 0;
  std::ostringstream first;
  for (std::uint64_t s = 0; s < seeds; ++s) {
    const auto o = make_options(c, b, Draw::systematic, s);
    const Csr<T> fast = sus::sample_mask(W, o);
    const Csr<T> ref = sus::reference::sample_mask<T>(W, o);
    if (!same_mask(fast, ref) && mismatches++ == 0) {
      first << "seed " << s << ": fast nnz " << fast.nnz() << " (max row " << fast.max_row_nnz() << "), reference nnz "
            << ref.nnz() << " (max row " << ref.max_row_nnz() << ")";
    }
  }
  INFO(what << ", c = " << c << ", budget " << sus::to_string(b) << ", " << seeds << " seeds; first mismatch: "
            << first.str());
  CHECK(mismatches == 0);
}

TEST_CASE("sampler: systematic fast and reference masks are identical", "[sampler]") {
  // target: random rows of several lengths (> one 64-entry skip chunk), both budgets, float/double
  Mat<double> R = Mat<double>::Zero(6, 150);
  set_random_row(R, 0, 11, 1.0);
  set_random_row(R, 1, 12, 6.0);  // peaked: saturated entries
  set_random_row(R, 2, 13, 2.0, {0, 5, 64, 65, 127, 128, 149});
  R.row(3).setConstant(1.0 / 150);
  R(4, 149) = 1;
  /* row 5 all zero */
  for (Budget b : kBudgets)
    for (int c : {1, 3, 8, 32}) {
      check_systematic_matches_reference<double>(R, c, b, 300, "double random rows (150 columns)");
      check_systematic_matches_reference<float>(R.cast<float>(), c, b, 300, "float random rows (150 columns)");
    }
  // target: the inclusion-frequency matrices (ties, zeros, saturation, n < c)
  for (const auto& m : frequency_matrices())
    for (Budget b : kBudgets) {
      check_systematic_matches_reference<double>(m.W, m.c, b, 2000, m.name);
      check_systematic_matches_reference<float>(m.W.cast<float>(), m.c, b, 2000, m.name);
    }
  // target: a float row whose sum is 1 + 5e-5 (accepted by sample_mask: tolerance 1e-4), so
  // paper's sum q = 4.0002 > c = 4. The fast sampler places at most c points u, ..., u + c − 1;
  // the reference must do the same ("at most c points") — for u < 2e-4 a point u + c would
  // otherwise fall in the last interval (seeds 5197, 9779 and 16558 below have such a u).
  Mat<float> over(1, 8);
  over.setConstant(0.125f * (1 + 5e-5f));
  check_systematic_matches_reference<float>(over, 4, Budget::paper, 20000, "float row summing to 1 + 5e-5");
}

// ---------------------------------------------------------------------------------------------
// Systematic hard cap: a row never keeps more than c entries, and keeps floor(sum q) or
// ceil(sum q) of them (every point u + k, k < c, below sum q lands in a distinct interval).
// Deterministic property: no false failures.
// ---------------------------------------------------------------------------------------------
template <class T>
void check_hard_cap(const Mat<T>& W, int c, Budget b, std::uint64_t seeds, const std::string& what) {
  const Mat<T> q = inclusion_matrix(W, c, b);
  std::int64_t over_cap = 0, off_count = 0;
  std::ostringstream first;
  for (std::uint64_t s = 0; s < seeds; ++s) {
    const Csr<T> mask = sus::sample_mask(W, make_options(c, b, Draw::systematic, 1000 + s));
    for (index_t i = 0; i < W.rows(); ++i) {
      const double sum_q = q.row(i).template cast<double>().sum();
      const index_t k = mask.row_nnz(i);
      const bool over = k > c;
      const bool off = k < static_cast<index_t>(std::floor(sum_q - 1e-6)) ||
                       k > std::min<index_t>(c, static_cast<index_t>(std::ceil(sum_q + 1e-6)));
      over_cap += over;
      off_count += off;
      if ((over || off) && first.tellp() == 0)
        first << "seed " << 1000 + s << " row " << i << ": kept " << k << ", sum q = " << sum_q;
    }
  }
  INFO(what << ", c = " << c << ", budget " << sus::to_string(b) << "; first violation: " << first.str());
  CHECK(over_cap == 0);
  CHECK(off_count == 0);
}

TEST_CASE("sampler: systematic hard cap", "[sampler]") {
  for (int c : {1, 2, 3, 8, 32}) {
    // target: random rows of many lengths, spreads from flat to peaked, some with zeros
    Mat<double> R = Mat<double>::Zero(24, 200);
    for (index_t i = 0; i < R.rows(); ++i) {
      const index_t len = 1 + (i * 37) % 200;
      std::vector<index_t> support;
      for (index_t j = 0; j < len; ++j)
        if ((i + j) % 5 != 0 || j == 0) support.push_back(j);
      set_random_row(R, i, 500 + static_cast<std::uint64_t>(i), 0.5 + 0.5 * static_cast<double>(i % 8), support);
    }
    // target: float rows that sum to 1 only up to rounding: a softmax computed in float (sum off
    // by a few ulp), and rows scaled to the edge of the accepted tolerance 1 ± 1e-4
    Mat<float> F = R.cast<float>();
    for (index_t i = 0; i < 8; ++i) {
      const auto s = sus_test::random_matrix<float>(1, 200, 900 + static_cast<std::uint64_t>(i), 3.0);
      const Eigen::RowVectorXf e = (s.array() - s.maxCoeff()).exp().matrix();
      F.row(i) = e / e.sum();  // float arithmetic throughout
    }
    F.row(8) *= 1 + 9e-5f;
    F.row(9) *= 1 - 9e-5f;
    F.row(10).setConstant(1.0f / 200);  // 200 · float(1/200) != 1 exactly
    F.row(11).setConstant(1.0f / 200 * (1 + 9e-5f));
    for (Budget b : kBudgets) {
      check_hard_cap<double>(R, c, b, 200, "double random rows");
      check_hard_cap<float>(F, c, b, 200, "float rows, some summing to 1 ± 9e-5");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Waterfill budget: sum q = min(c, #nonzero) within 1e-6 (absolute), q = min(1, λ w) with one
// λ >= c per row, q >= paper's q, q = 0 exactly where w = 0. Deterministic: no false failures.
// ---------------------------------------------------------------------------------------------
template <class T>
void check_waterfill_rows(std::uint64_t seed0) {
  const double rel = std::is_same<T, float>::value ? 1e-5 : 1e-12;  // λ consistency across entries
  int rows_checked = 0, saturating_rows = 0;
  double max_sum_err = 0;
  for (int c : {1, 2, 3, 8, 32}) {
    for (index_t n = 1; n <= 200; n = n < 20 ? n + 1 : n < 195 ? n + 7 : n + 5) {  // 1..20, 27..195, 200
      for (int variant = 0; variant < 3; ++variant) {
        const std::uint64_t seed = seed0 + static_cast<std::uint64_t>(c * 100000 + n * 10 + variant);
        // variant 0: flat scores; 1: peaked (saturation); 2: peaked with ~30% exact zeros
        const double scale = variant == 0 ? 0.5 : 4.0;
        std::vector<index_t> support;
        std::mt19937_64 gen(seed);
        for (index_t j = 0; j < n; ++j)
          if (variant != 2 || gen() % 10 >= 3 || j == n - 1) support.push_back(j);
        Mat<double> Wd = Mat<double>::Zero(1, n);
        set_random_row(Wd, 0, seed, scale, support);
        const Mat<T> W = Wd.cast<T>();
        Mat<T> q(1, n), qp(1, n);
        const double ret = sus::inclusion_probabilities(W.data(), n, c, Budget::waterfill, q.data());
        sus::inclusion_probabilities(W.data(), n, c, Budget::paper, qp.data());
        const index_t support_n = (W.array() > T(0)).count();
        const double target = static_cast<double>(std::min<index_t>(c, support_n));
        const double sum = q.template cast<double>().sum();
        double lambda = 0;  // the largest q/w among unsaturated entries
        bool saturated_any = false;
        for (index_t j = 0; j < n; ++j)
          if (W(0, j) > T(0) && q(0, j) < T(1)) lambda = std::max(lambda, double(q(0, j)) / double(W(0, j)));
          else if (W(0, j) > T(0)) saturated_any = true;
        saturating_rows += saturated_any && support_n > c;
        bool lambda_ok = true, zero_ok = true, dominates = true;
        for (index_t j = 0; j < n; ++j) {
          const double w = W(0, j), qj = q(0, j);
          if (w == 0) zero_ok = zero_ok && qj == 0;
          else if (qj < 1) lambda_ok = lambda_ok && std::abs(qj / w - lambda) <= rel * lambda;
          else if (support_n > c) lambda_ok = lambda_ok && lambda * w >= 1 - rel;  // saturated: λw >= 1
          dominates = dominates && qj >= static_cast<double>(qp(0, j)) * (1 - rel);
        }
        max_sum_err = std::max(max_sum_err, std::abs(sum - target));
        INFO("c = " << c << ", n = " << n << ", variant " << variant << ", support " << support_n << ": sum q = "
                    << sum << " (returned " << ret << "), expected " << target << ", lambda = " << lambda);
        REQUIRE(std::abs(sum - target) <= 1e-6);
        REQUIRE(std::abs(ret - target) <= 1e-6);
        REQUIRE(zero_ok);
        REQUIRE(lambda_ok);
        REQUIRE(dominates);
        if (support_n > c && lambda > 0) REQUIRE(lambda >= c * (1 - rel));
        ++rows_checked;
      }
    }
  }
  INFO("max |sum q − min(c, support)| = " << max_sum_err);
  CHECK(rows_checked > 300);
  CHECK(saturating_rows > 20);  // the iteration over the saturated set was exercised
}

TEST_CASE("sampler: waterfill spends min of c and support", "[sampler]") {
  SECTION("double") { check_waterfill_rows<double>(1); }
  SECTION("float") { check_waterfill_rows<float>(2); }
  // target: the two-step iteration by hand: w = (0.5, 0.2, 10 x 0.03), c = 4:
  // λ = 4 saturates {0}; λ = 6 saturates {0, 1}; λ = 2 / 0.3 -> q = (1, 1, 10 x 0.2).
  SECTION("hand-computed") {
    std::vector<double> w(12, 0.03), q(12);
    w[0] = 0.5, w[1] = 0.2;
    const double ret = sus::inclusion_probabilities(w.data(), 12, 4, Budget::waterfill, q.data());
    CHECK(ret == Approx(4).margin(1e-12));
    CHECK(q[0] == 1);
    CHECK(q[1] == 1);
    for (int j = 2; j < 12; ++j) {
      CAPTURE(j, q[j]);
      CHECK(q[j] == Approx(0.2).margin(1e-12));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Independent draw (Poisson-process implementation of independent Bernoulli(q_j)):
//  (a) per row, the total count over N draws, T = Σ_draws row count, has mean N Σq and variance
//      N Σ q(1−q); two-sided z-test |z| <= z*, z* = normal_two_sided_quantile(0.5e-3 / (5 rows · 2
//      budgets)). T is a sum of >= 20,000 Bernoullis with variance >= 4,000 (asserted), skewness
//      <= 0.016, so the normal tail is accurate to a few percent: false-failure prob ≈ 0.5e-3.
//      The same z bounds the paper mean: mean <= Σq + z*·σ/√N <= c + z*·σ/√N, σ² = Σq(1−q).
//  (b) not capped: a uniform row of 64 (q = 1/16) keeps more than c = 4 entries in some draw;
//      P(no draw does) = P(Bin(64, 1/16) <= 4)^N < 0.9^20000: never.
//  (c) pairs of entries are independent: P(j and j' kept) = q_j q_j', exact binomial test on
//      the co-inclusion count, Bonferroni over all pairs: false-failure prob <= 0.5e-3.
//  Total false-failure probability ≈ 1e-3 (at most ~1.05e-3).
// ---------------------------------------------------------------------------------------------
TEST_CASE("sampler: independent row counts and independence", "[sampler][statistical]") {
  constexpr std::int64_t N = 20000;
  constexpr int c = 4;
  Mat<double> W = Mat<double>::Zero(6, 64);
  W.row(0).setConstant(1.0 / 64);                    // Σq = c exactly (paper): the tight case
  set_random_row(W, 1, 41, 1.0);                     // random, Σq ≈ c
  set_random_row(W, 2, 42, 5.0);                     // peaked: saturated entries, Σq < c
  set_random_row(W, 3, 43, 2.0, {0, 1, 2, 3, 10, 20, 30, 40, 50, 60, 61, 62, 63});  // zeros
  W.row(4).setConstant(0.7 / 62), W(4, 0) = W(4, 1) = 0.15;  // two saturated ties
  W.row(5).setConstant(1.0 / 64);                    // (pairs test only)
  const std::vector<index_t> count_rows = {0, 1, 2, 3, 4};
  const double z_star = sus_test::normal_two_sided_quantile(0.5e-3 / (static_cast<double>(count_rows.size()) * 2));

  for (Budget b : kBudgets) {
    const Mat<double> q = inclusion_matrix(W, c, b);
    Eigen::VectorXd total = Eigen::VectorXd::Zero(W.rows());
    index_t max_row_count = 0;
    // co-inclusion counts for the pairs (j, j+1) and (j, j+32) of rows 5 and 1
    std::vector<std::array<index_t, 3>> pairs;
    for (index_t j = 0; j + 1 < 64; ++j) pairs.push_back({5, j, j + 1});
    for (index_t j = 0; j < 32; ++j) pairs.push_back({5, j, j + 32});
    for (index_t j = 0; j + 1 < 64; ++j) pairs.push_back({1, j, j + 1});
    std::vector<std::int64_t> pair_count(pairs.size(), 0);
    std::vector<char> kept(64);
    for (std::int64_t s = 0; s < N; ++s) {
      const Csr<double> mask = sus::sample_mask(W, make_options(c, b, Draw::independent, static_cast<std::uint64_t>(s)));
      for (index_t i = 0; i < W.rows(); ++i) total[i] += static_cast<double>(mask.row_nnz(i));
      max_row_count = std::max(max_row_count, mask.row_nnz(0));
      for (std::size_t t = 0; t < pairs.size(); ++t) {
        const index_t i = pairs[t][0];
        if (t == 0 || pairs[t - 1][0] != i) {  // rows are contiguous in `pairs`
          std::fill(kept.begin(), kept.end(), 0);
          for (index_t p = mask.row_offsets[i]; p < mask.row_offsets[i + 1]; ++p) kept[mask.col_indices[p]] = 1;
        }
        pair_count[t] += kept[pairs[t][1]] && kept[pairs[t][2]];
      }
    }
    INFO("budget " << sus::to_string(b) << ", N = " << N << ", z* = " << z_star);
    for (index_t i : count_rows) {
      const double sum_q = q.row(i).sum();
      const double var1 = (q.row(i).array() * (1 - q.row(i).array())).sum();  // σ² of one row count
      REQUIRE(N * var1 >= 4000);  // validity of the normal approximation stated above
      const double mean = total[i] / N, sigma_mean = std::sqrt(var1 / N);
      const double z = (mean - sum_q) / sigma_mean;
      INFO("row " << i << ": mean row count " << mean << ", sum q " << sum_q << ", z = " << z << ", bound c + z*σ/√N = "
                  << c + z_star * sigma_mean);
      CHECK(std::abs(z) <= z_star);
      if (b == Budget::paper) CHECK(mean <= c + z_star * sigma_mean);
    }
    CHECK(max_row_count > c);  // (b)
    // (c) Bonferroni over all pairs of both budgets
    const double alpha_pair = 0.5e-3 / (static_cast<double>(pairs.size()) * 2);
    int failures = 0;
    std::ostringstream worst;
    double worst_p = 2;
    for (std::size_t t = 0; t < pairs.size(); ++t) {
      const double qq = q(pairs[t][0], pairs[t][1]) * q(pairs[t][0], pairs[t][2]);
      REQUIRE((qq > 0 && qq < 1));
      const double p = binomial_two_sided_p(N, qq, pair_count[t]);
      failures += p < alpha_pair;
      if (p < worst_p) {
        worst_p = p;
        worst.str("");
        worst << "row " << pairs[t][0] << " pair (" << pairs[t][1] << "," << pairs[t][2] << "): co-kept "
              << pair_count[t] << " times, expected " << N * qq << ", p = " << p;
      }
    }
    INFO("pair test: level " << alpha_pair << ", most extreme " << worst.str());
    CHECK(failures == 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism and the (seed, row)-keyed counter. Deterministic checks; "different seeds give
// different masks" can fail for a correct sampler only if two seeds give the same draw on all
// 16 rows of ~64 random entries: probability < 1e-30.
// ---------------------------------------------------------------------------------------------
TEST_CASE("sampler: determinism and row keying", "[sampler]") {
  Mat<double> W = Mat<double>::Zero(16, 64);
  for (index_t i = 0; i < W.rows(); ++i) set_random_row(W, i, 700 + static_cast<std::uint64_t>(i), 1.0 + 0.25 * double(i));
  const Mat<float> Wf = W.cast<float>();
  for (Budget b : kBudgets)
    for (Draw d : kDraws) {
      INFO("budget " << sus::to_string(b) << ", draw " << sus::to_string(d));
      for (std::uint64_t seed : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{0xdeadbeefcafeULL},
                                 std::numeric_limits<std::uint64_t>::max()}) {
        CAPTURE(seed);
        const auto o = make_options(8, b, d, seed);
        // target: same seed -> bitwise identical masks (double and float)
        CHECK(same_mask(sus::sample_mask(W, o), sus::sample_mask(W, o)));
        CHECK(same_mask(sus::sample_mask(Wf, o), sus::sample_mask(Wf, o)));
        // target: different seeds -> different masks (seed + 1, and a seed differing only in its
        // high 32 bits: both halves of the key are used)
        auto o2 = o;
        o2.seed = seed + 1;
        CHECK_FALSE(same_mask(sus::sample_mask(W, o), sus::sample_mask(W, o2)));
        o2.seed = seed ^ (std::uint64_t{1} << 40);
        CHECK_FALSE(same_mask(sus::sample_mask(W, o), sus::sample_mask(W, o2)));
      }
      // target: row i's draw depends only on (seed, i, W_i.): put rows 3 and 10 of W into a
      // matrix with different other rows and a different number of rows.
      Mat<double> W2 = Mat<double>::Zero(13, 64);
      for (index_t i = 0; i < W2.rows(); ++i) set_random_row(W2, i, 800 + static_cast<std::uint64_t>(i), 2.0);
      W2.row(3) = W.row(3);
      W2.row(10) = W.row(10);
      int differing = 0;
      for (std::uint64_t seed = 0; seed < 200; ++seed) {
        const auto o = make_options(8, b, d, seed);
        const Csr<double> m1 = sus::sample_mask(W, o), m2 = sus::sample_mask(W2, o);
        CAPTURE(seed);
        REQUIRE(same_row(m1, 3, m2, 3));
        REQUIRE(same_row(m1, 10, m2, 10));
        differing += !same_row(m1, 4, m2, 4);  // a different row: a different draw (sanity)
      }
      CHECK(differing > 150);
    }
}

// ---------------------------------------------------------------------------------------------
// RowSampler == sample_mask row by row (also when rows are fed in reverse order through one
// sampler, reusing its scratch); and a row passed as its first `len` entries (every later entry
// exactly zero) samples exactly like the full row — the forward's SusMask recorder passes
// causal rows that way. Deterministic: no false failures.
// ---------------------------------------------------------------------------------------------
// "" when row ia of a and row ib of b are bitwise identical; otherwise what differs.
template <class T>
std::string row_difference(const Csr<T>& a, index_t ia, const Csr<T>& b, index_t ib) {
  if (same_row(a, ia, b, ib)) return "";
  const auto cols = [](const Csr<T>& m, index_t i) {
    return std::vector<index_t>(m.col_indices.begin() + m.row_offsets[i], m.col_indices.begin() + m.row_offsets[i + 1]);
  };
  std::ostringstream out;
  if (cols(a, ia) != cols(b, ib)) {
    out << "different columns (" << a.row_nnz(ia) << " vs " << b.row_nnz(ib) << " kept)";
  } else {
    double max_rel = 0;
    for (index_t t = 0; t < a.row_nnz(ia); ++t) {
      const double x = a.values[a.row_offsets[ia] + t], y = b.values[b.row_offsets[ib] + t];
      max_rel = std::max(max_rel, std::abs(x - y) / std::abs(y));
    }
    out << "same columns, values differ by up to " << max_rel << " (relative)";
  }
  return out.str();
}

template <class T>
void check_row_sampler() {
  constexpr index_t n = 150;
  // row lengths around multiples of 8 and 16 and 64 (vector lanes, skip chunks) and the ends
  const std::vector<index_t> lens = {0, 1, 2, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 128, 129, 149, 150};
  Mat<double> Wd = Mat<double>::Zero(static_cast<index_t>(lens.size()), n);
  for (std::size_t r = 0; r < lens.size(); ++r) {
    const index_t len = lens[r];
    if (len == 0) continue;  // fully masked row
    std::vector<index_t> support;
    for (index_t j = 0; j < len; ++j) support.push_back(j);
    set_random_row(Wd, static_cast<index_t>(r), 1200 + r, r % 2 ? 4.0 : 1.0, support);
  }
  const Mat<T> W = Wd.cast<T>();
  std::int64_t rev_mismatch = 0, cut_mismatch = 0, rows_compared = 0;
  std::string first_rev, first_cut;
  for (Budget b : kBudgets)
    for (Draw d : kDraws)
      for (int c : {1, 4, 32})
        for (std::uint64_t seed = 0; seed < 30; ++seed) {
          const auto o = make_options(c, b, d, seed);
          std::ostringstream where;
          where << "budget " << sus::to_string(b) << ", draw " << sus::to_string(d) << ", c = " << c << ", seed " << seed;
          const Csr<T> mask = sus::sample_mask(W, o);
          sus::RowSampler<T> sampler(o);
          // reverse order through one sampler, full rows; then cut rows, forward order
          Csr<T> rev(W.rows(), n), cut(W.rows(), n);
          std::vector<std::vector<index_t>> rcols(lens.size());
          std::vector<std::vector<T>> rvals(lens.size());
          for (index_t i = W.rows() - 1; i >= 0; --i) {
            const auto r = static_cast<std::size_t>(i);
            const index_t k = sampler.sample(i, W.row(i).data(), n, rcols[r], rvals[r]);
            REQUIRE(k == static_cast<index_t>(rcols[r].size()));
          }
          for (index_t i = 0; i < W.rows(); ++i) {
            const auto r = static_cast<std::size_t>(i);
            rev.col_indices.insert(rev.col_indices.end(), rcols[r].begin(), rcols[r].end());
            rev.values.insert(rev.values.end(), rvals[r].begin(), rvals[r].end());
            rev.row_offsets[r + 1] = rev.nnz();
            const index_t k = sampler.sample(i, W.row(i).data(), lens[r], cut.col_indices, cut.values);
            cut.row_offsets[r + 1] = cut.nnz();
            REQUIRE(k == cut.row_nnz(i));
          }
          for (index_t i = 0; i < W.rows(); ++i) {
            ++rows_compared;
            const std::string dr = row_difference(rev, i, mask, i), dc = row_difference(cut, i, mask, i);
            if (!dr.empty() && rev_mismatch++ == 0) first_rev = where.str() + ", row " + std::to_string(i) + ": " + dr;
            if (!dc.empty() && cut_mismatch++ == 0)
              first_cut = where.str() + ", row " + std::to_string(i) + " (len " + std::to_string(lens[i]) + " of " +
                          std::to_string(n) + "): " + dc;
          }
        }
  INFO(rows_compared << " rows compared");
  INFO("RowSampler (rows in reverse order) vs sample_mask: " << rev_mismatch << " rows differ; first: " << first_rev);
  CHECK(rev_mismatch == 0);
  INFO("RowSampler on w[0, len) vs sample_mask on the full row: " << cut_mismatch << " rows differ; first: " << first_cut);
  CHECK(cut_mismatch == 0);
}

TEST_CASE("sampler: RowSampler and truncated rows", "[sampler]") {
  SECTION("double") { check_row_sampler<double>(); }
  SECTION("float") { check_row_sampler<float>(); }
}

// ---------------------------------------------------------------------------------------------
// The sampler's scan, checked against the algorithm written out in scalar code. RowSampler runs
// 16 lanes of Σq (or Π(1 − q)) in vector code, tests the draw after every batch of 64 entries,
// walks a batch that hits with vector prefixes and bit masks, passes the paper budget's
// q = min(1, c·w) without storing it, and flushes its kept entries through a fixed buffer.
// Written out here, one scalar operation at a time in the documented order (the order the
// library's non-vector build uses): q from inclusion_probabilities, the lanes, the tree, the
// prefixes, the walks entry by entry. The two must agree bit for bit. Deterministic: no false
// failures.
// ---------------------------------------------------------------------------------------------
struct WrittenOutScan {
  bool survival;
  double lane[16], q_sum[8] = {0, 0, 0, 0, 0, 0, 0, 0}, total;
  double op(double a, double b) const { return survival ? a * b : a + b; }
  double identity() const { return survival ? 1.0 : 0.0; }
  void restart() {
    for (double& l : lane) l = identity();
    total = identity();
  }
  double tree() const {
    double t[8];
    for (int l = 0; l < 8; ++l) t[l] = op(lane[l], lane[l + 8]);
    return op(op(op(t[0], t[1]), op(t[2], t[3])), op(op(t[4], t[5]), op(t[6], t[7])));
  }
  // x: the batch's 64 q. Lane l (< 8) ∘= ((t_l ∘ t_{16+l}) ∘ (t_{32+l} ∘ t_{48+l})), lane 8 + l
  // likewise from entries 8 + l, 24 + l, 40 + l, 56 + l; t = q or 1 − q.
  void add_batch(const double* x) {
    const auto t = [&](int j) { return survival ? 1.0 - x[j] : x[j]; };
    for (int l = 0; l < 8; ++l) {
      lane[l] = op(lane[l], op(op(t(l), t(16 + l)), op(t(32 + l), t(48 + l))));
      lane[8 + l] = op(lane[8 + l], op(op(t(8 + l), t(24 + l)), op(t(40 + l), t(56 + l))));
      if (survival)
        q_sum[l] += ((x[l] + x[16 + l]) + (x[32 + l] + x[48 + l])) + ((x[8 + l] + x[24 + l]) + (x[40 + l] + x[56 + l]));
    }
  }
  // Group g of a walked batch (terms t[16]) as running totals from `start`: an inclusive prefix
  // of each 8 lanes (l ∘= l − 1, then l − 2, then l − 4), the first 8 then ∘ start, the last 8
  // ∘ the first 8's last.
  void running_totals(double* t, double start) const {
    for (int half = 0; half < 2; ++half)
      for (int s = 1; s < 8; s *= 2)
        for (int l = 7; l >= s; --l) t[8 * half + l] = op(t[8 * half + l], t[8 * half + l - s]);
    for (int l = 0; l < 8; ++l) t[l] = op(t[l], start);
    for (int l = 8; l < 16; ++l) t[l] = op(t[l], t[7]);
  }
};

// A walked batch x[64] in two levels, from running total `start`: the walk's terms t (q for
// the systematic draw; f = 1 − q, 1 where q ≥ 1, for the independent one), each group of 8's
// total G_g = ((t_0 ∘ t_4) ∘ (t_2 ∘ t_6)) ∘ ((t_1 ∘ t_5) ∘ (t_3 ∘ t_7)), the groups' ends
// E = prefix(G) ∘ start, and group g's entries' running totals prefix(t_g) ∘ E_{g−1} (∘: + or ·;
// prefix: lane l ∘= lane l − 1, then l − 2, then l − 4).
struct TwoLevel {
  bool survival;
  double t[64], E[8];
  double op(double a, double b) const { return survival ? a * b : a + b; }
  void prefix(double* v) const {
    for (int s = 1; s < 8; s *= 2)
      for (int l = 7; l >= s; --l) v[l] = op(v[l], v[l - s]);
  }
  TwoLevel(bool survival_, const double* x, double start) : survival(survival_) {
    for (int j = 0; j < 64; ++j) t[j] = !survival ? x[j] : x[j] >= 1 ? 1.0 : 1.0 - x[j];
    for (int g = 0; g < 8; ++g) {
      const double* v = t + 8 * g;
      E[g] = op(op(op(v[0], v[4]), op(v[2], v[6])), op(op(v[1], v[5]), op(v[3], v[7])));
    }
    prefix(E);
    for (double& e : E) e = op(e, start);
  }
  void running(int g, double start, double* P) const {
    for (int l = 0; l < 8; ++l) P[l] = t[8 * g + l];
    prefix(P);
    for (int l = 0; l < 8; ++l) P[l] = op(P[l], g > 0 ? E[g - 1] : start);
  }
};

// The systematic draw's walk (entries b.., the row ends at n): group by group, only while the
// group's end lies above the point, keep each entry with q > 0 whose C_j lies above it and move
// the point past C_j.
template <class Keep>
void walk_systematic(const double* x, index_t b, index_t n, double start, double& point, int& left, Keep& keep) {
  const TwoLevel w(false, x, start);
  for (int g = 0; g < 8; ++g) {
    if (!(left > 0 && point < w.E[g])) continue;
    double C[8];
    w.running(g, start, C);
    for (int l = 0; l < 8 && left > 0 && point < w.E[g]; ++l) {
      if (b + 8 * g + l >= n || !(x[8 * g + l] > 0) || !(point < C[l])) continue;
      keep(b + 8 * g + l);
      while (point < C[l] && left > 0) {
        point += 1.0;
        --left;
      }
    }
  }
}

// The independent draw's walk: q ≥ 1 kept; group by group, only while the group's end lies
// below R, each entry with 0 < q < 1 and P_j < R is kept and R drawn on below P_j. Returns false
// (nothing kept) when E_7 < 1e-280: the caller walks the batch re-based.
std::int64_t rebased_walks = 0;  // batches the re-based walk took (the test checks it runs)
template <class U, class Keep>
bool walk_independent(const double* x, index_t b, index_t n, double start, double& R, U& uniform, Keep& keep) {
  const TwoLevel w(true, x, start);
  if (!(w.E[7] >= 1e-280)) return false;
  bool kept[64] = {};
  for (int j = 0; j < 64; ++j) kept[j] = b + j < n && x[j] >= 1;
  for (int g = 0; g < 8; ++g) {
    if (!(w.E[g] < R)) continue;
    double P[8];
    w.running(g, start, P);
    for (int l = 0; l < 8 && w.E[g] < R; ++l) {
      const int j = 8 * g + l;
      if (b + j >= n || x[j] >= 1 || !(x[j] > 0) || !(P[l] < R)) continue;
      kept[j] = true;
      do R *= uniform();
      while (P[l] < R);
    }
  }
  for (int j = 0; j < 64; ++j)
    if (kept[j]) keep(b + j);
  R /= w.E[7];
  return true;
}

// One row drawn in scalar code: appends (column, W/q) of the kept entries.
template <class T>
void draw_row_written_out(const T* w, index_t n, const SamplerOptions& o, index_t row, std::vector<index_t>& cols,
                          std::vector<T>& vals) {
  std::vector<T> q(static_cast<std::size_t>(n));
  if (sus::inclusion_probabilities(w, n, o.c, o.budget, q.data()) <= 0) return;
  const sus::detail::Philox4x32 rng(o.seed);
  const auto keep = [&](index_t j) {
    cols.push_back(j);
    vals.push_back(w[j] / q[j]);
  };
  const bool systematic = o.draw == Draw::systematic;
  WrittenOutScan scan{!systematic, {}, {}, 0};
  scan.restart();
  double point = systematic ? rng.uniform2(static_cast<std::uint64_t>(row), sus::detail::kSystematicStream)[0] : 0;
  int left = o.c;
  std::uint64_t draws = 0;
  std::array<double, 2> pair{};
  const auto uniform = [&]() {
    if ((draws & 1) == 0) pair = rng.uniform2(static_cast<std::uint64_t>(row), draws / 2);
    return 1.0 - pair[draws++ & 1];
  };
  double R = systematic ? 0 : uniform();
  for (index_t b = 0; b < n; b += 64) {
    double x[64];
    for (index_t l = 0; l < 64; ++l) x[l] = b + l < n ? static_cast<double>(q[b + l]) : 0.0;
    const double start = scan.total;
    scan.add_batch(x);
    scan.total = scan.tree();
    if (systematic) {
      if (left > 0 && point < scan.total) walk_systematic(x, b, n, start, point, left, keep);
      continue;
    }
    if (scan.total >= R) continue;
    if (!walk_independent(x, b, n, start, R, uniform, keep)) {
      // re-based: groups of 16 as running products (first 8 ∘ start, last 8 ∘ the first 8's
      // last), the survival re-based after a group that ends below 1e-50
      ++rebased_walks;
      double run = start;
      for (int g = 0; g < 4; ++g) {
        const double* xg = x + 16 * g;
        double t[16];
        for (int l = 0; l < 16; ++l) t[l] = xg[l] >= 1 ? 1.0 : 1.0 - xg[l];
        scan.running_totals(t, run);
        run = t[15];
        for (int l = 0; l < 16 && b + 16 * g + l < n; ++l) {  // entry by entry, inside the row
          const index_t j = b + 16 * g + l;
          if (xg[l] >= 1) {
            keep(j);
          } else if (xg[l] > 0 && t[l] < R) {
            keep(j);
            do R *= uniform();
            while (t[l] < R);
          }
        }
        if (run < 1e-50) {
          R /= run;
          run = 1;
        }
      }
      R /= run;
    }
    scan.restart();
  }
}

template <class T>
void check_scan_written_out() {
  std::int64_t rows = 0, kept = 0, mismatches = 0;
  rebased_walks = 0;
  std::ostringstream first;
  for (index_t n : {1, 15, 16, 17, 63, 64, 65, 100, 128, 130, 200, 1000, 4099})
    for (double spread : {0.5, 3.0, 8.0})  // flat rows, peaked rows, rows with several q = 1
      for (int c : {1, 4, 32, 300})        // 300: more kept entries than one flush of the buffer
        for (Budget b : kBudgets)
          for (Draw d : kDraws) {
            Mat<double> Wd = Mat<double>::Zero(4, n);
            set_random_row(Wd, 0, 900 + static_cast<std::uint64_t>(n), spread);
            set_random_row(Wd, 1, 901 + static_cast<std::uint64_t>(n), spread);
            // row 2 all zero; row 3 (n >= 1000): 200 weights just below 1/300, so at c = 300
            // whole batches of q = 0.99999 whose survival leaves the normal range (the
            // re-based walk), the other third of the mass spread flat
            if (n >= 1000)
              for (index_t j = 0; j < n; ++j) Wd(3, j) = j < 200 ? 0.99999 / 300 : (1 - 200 * (0.99999 / 300)) / double(n - 200);
            const Mat<T> W = Wd.cast<T>();
            const SamplerOptions o = make_options(c, b, d, 17 + static_cast<std::uint64_t>(c));
            sus::RowSampler<T> sampler(o);
            for (index_t i = 0; i < W.rows(); ++i) {
              std::vector<index_t> c1, c2;
              std::vector<T> v1, v2;
              sampler.sample(i, W.row(i).data(), n, c1, v1);
              draw_row_written_out(W.row(i).data(), n, o, i, c2, v2);
              const bool same = c1 == c2 && (v1.empty() || (v1.size() == v2.size() &&
                                                             std::memcmp(v1.data(), v2.data(), v1.size() * sizeof(T)) == 0));
              ++rows;
              kept += static_cast<std::int64_t>(c2.size());
              if (!same && mismatches++ == 0)
                first << "n " << n << " spread " << spread << " c " << c << " " << sus::to_string(b) << "/"
                      << sus::to_string(d) << " row " << i << ": kept " << c1.size() << " vs " << c2.size();
            }
          }
  INFO(rows << " rows, " << kept << " kept entries, " << rebased_walks << " re-based walks; first mismatch: "
            << first.str());
  CHECK(kept > 20000);       // the comparison covers many kept entries
  CHECK(rebased_walks > 0);  // ... and the re-based walk
  CHECK(mismatches == 0);
}

// The vector primitives against their scalar definitions, bit for bit: the lanes' tree, the
// 8-lane prefix, the comparison masks, and q loaded from an array and computed from w (with
// zeros and q = 1 entries).
template <class T>
void check_scan_primitives() {
  using namespace sus::detail;
  std::mt19937_64 gen(5);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<T> w(64), q(64);
  for (auto& x : w) {
    const double r = u(gen);
    x = static_cast<T>(r < 0.1 ? 0.0 : r < 0.15 ? 0.5 : r * r * r * 0.02);  // zeros, q = 1 at c = 4, small
  }
  const PaperQ<T> paper{w.data(), T(4)};
  for (index_t j = 0; j < 64; ++j) q[static_cast<std::size_t>(j)] = paper(j);
  const ArrayQ<T> array{q.data()};
  const auto bits = [](double x) {
    std::uint64_t b;
    std::memcpy(&b, &x, sizeof b);
    return b;
  };
  for (const bool survival : {false, true})
    for (int k = 0; k < 8; ++k) {
      Vec8 a, b, fromw;
      load_q8(array, 8 * k, a);
      load_q8(paper, 8 * k, fromw);
      load_q8(array, (8 * k + 24) % 64, b);
      WrittenOutScan ref{survival, {}, {}, 0};
      for (int l = 0; l < 8; ++l) {
        CHECK(bits(at(a, l)) == bits(static_cast<double>(q[static_cast<std::size_t>(8 * k + l)])));
        CHECK(bits(at(fromw, l)) == bits(at(a, l)));
        ref.lane[l] = at(a, l);
        ref.lane[l + 8] = at(b, l);
      }
      const double tree = survival ? tree_total<ChunkStat::survival>(a, b) : tree_total<ChunkStat::sum>(a, b);
      CHECK(bits(tree) == bits(ref.tree()));
      double t[16];
      for (int l = 0; l < 8; ++l) t[l] = at(a, l), t[l + 8] = at(b, l);
      ref.running_totals(t, 0.375);
      // the same with the library's prefix8 and combine_to
      Vec8 lo = a, hi = b, base;
      if (survival) {
        prefix8<ChunkStat::survival>(lo), prefix8<ChunkStat::survival>(hi);
        set_all(base, 0.375), combine_to<ChunkStat::survival>(lo, base);
        set_all(base, at(lo, 7)), combine_to<ChunkStat::survival>(hi, base);
      } else {
        prefix8<ChunkStat::sum>(lo), prefix8<ChunkStat::sum>(hi);
        set_all(base, 0.375), combine_to<ChunkStat::sum>(lo, base);
        set_all(base, at(lo, 7)), combine_to<ChunkStat::sum>(hi, base);
      }
      for (int l = 0; l < 8; ++l) {
        CHECK(bits(at(lo, l)) == bits(t[l]));
        CHECK(bits(at(hi, l)) == bits(t[l + 8]));
      }
      // a batch into the lanes (from lanes a, b and the sum lanes at 0), then the tree
      ScanLanes lanes;
      lanes.lo = a;
      lanes.hi = b;
      set_all(lanes.q_sum, 0.0);
      Vec8 x[8];
      double xs[64];
      for (int g = 0; g < 8; ++g) {
        load_q8(paper, 8 * ((g + k) % 8), x[g]);
        for (int l = 0; l < 8; ++l) xs[8 * g + l] = at(x[g], l);
      }
      if (survival) add_batch<ChunkStat::survival>(lanes, x);
      else add_batch<ChunkStat::sum>(lanes, x);
      Vec8 groups;  // the groups' totals (the walks' first level)
      if (survival) group_totals<ChunkStat::survival>(x, groups);
      else group_totals<ChunkStat::sum>(x, groups);
      for (int g = 0; g < 8; ++g) {
        const double* v = xs + 8 * g;
        CHECK(bits(at(groups, g)) ==
              bits(ref.op(ref.op(ref.op(v[0], v[4]), ref.op(v[2], v[6])), ref.op(ref.op(v[1], v[5]), ref.op(v[3], v[7])))));
      }
      ref.add_batch(xs);
      for (int l = 0; l < 8; ++l) {
        CHECK(bits(at(lanes.lo, l)) == bits(ref.lane[l]));
        CHECK(bits(at(lanes.hi, l)) == bits(ref.lane[l + 8]));
        if (survival) CHECK(bits(at(lanes.q_sum, l)) == bits(ref.q_sum[l]));
      }
      const double v = t[5];
      unsigned above = 0, below = 0;
      for (int l = 0; l < 16; ++l) {
        above |= unsigned(t[l] > v) << l;
        below |= unsigned(t[l] < v) << l;
      }
      CHECK(compare_mask16(lo, hi, v, true) == above);
      CHECK(compare_mask16(lo, hi, v, false) == below);
    }
}

TEST_CASE("sampler: the scan equals the draw written out in scalar code", "[sampler]") {
  SECTION("double") { check_scan_written_out<double>(); }
  SECTION("float") { check_scan_written_out<float>(); }
  SECTION("vector primitives == scalar, double") { check_scan_primitives<double>(); }
  SECTION("vector primitives == scalar, float") { check_scan_primitives<float>(); }
}

// ---------------------------------------------------------------------------------------------
// Edge cases, float and double, all budgets and draws. Deterministic: no false failures.
// ---------------------------------------------------------------------------------------------
template <class T>
void check_edge_cases() {
  for (Budget b : kBudgets)
    for (Draw d : kDraws) {
      INFO("budget " << sus::to_string(b) << ", draw " << sus::to_string(d));
      for (std::uint64_t seed = 0; seed < 50; ++seed) {
        CAPTURE(seed);
        // n = 1: W = 1 in every row -> q = 1 -> kept with value exactly 1 (any c)
        for (int c : {1, 2, 7}) {
          const Mat<T> one = Mat<T>::Ones(3, 1);
          const Csr<T> m = sus::sample_mask(one, make_options(c, b, d, seed));
          REQUIRE(m.rows == 3);
          REQUIRE(m.cols == 1);
          REQUIRE(m.row_offsets == std::vector<index_t>({0, 1, 2, 3}));
          REQUIRE(m.col_indices == std::vector<index_t>({0, 0, 0}));
          REQUIRE(m.values == std::vector<T>({T(1), T(1), T(1)}));
        }
        // c = 1: systematic keeps at most one entry per row; waterfill q = paper q = w when no
        // weight is 1; one-hot rows keep their 1 exactly
        {
          Mat<double> Wd = Mat<double>::Zero(3, 40);
          set_random_row(Wd, 0, 40 + seed, 1.0);
          Wd(1, 39) = 1;
          const Mat<T> W = Wd.cast<T>();
          const Csr<T> m = sus::sample_mask(W, make_options(1, b, d, seed));
          if (d == Draw::systematic) REQUIRE(m.max_row_nnz() <= 1);
          REQUIRE(m.row_nnz(1) == 1);
          REQUIRE(m.col_indices[static_cast<std::size_t>(m.row_offsets[1])] == 39);
          REQUIRE(m.values[static_cast<std::size_t>(m.row_offsets[1])] == T(1));
          REQUIRE(m.row_nnz(2) == 0);  // all-zero row
          Mat<T> qw(1, 40), qp(1, 40);
          sus::inclusion_probabilities(W.row(0).data(), 40, 1, Budget::waterfill, qw.data());
          sus::inclusion_probabilities(W.row(0).data(), 40, 1, Budget::paper, qp.data());
          REQUIRE(sus_test::max_rel_error(qw, qp) <= (std::is_same<T, float>::value ? 1e-5 : 1e-12));
        }
        // all-zero rows (fully masked) -> empty rows, also in a matrix of only such rows
        {
          const Mat<T> Z = Mat<T>::Zero(5, 9);
          const Csr<T> m = sus::sample_mask(Z, make_options(4, b, d, seed));
          REQUIRE(m.nnz() == 0);
          REQUIRE(m.row_offsets == std::vector<index_t>(6, 0));
          m.validate(0);
        }
      }
      // empty shapes: 0 x n and n x 0 (n x 0 rows are all-zero rows)
      const Csr<T> m0 = sus::sample_mask(Mat<T>(0, 7), make_options(4, b, d, 3));
      CHECK((m0.rows == 0 && m0.cols == 7 && m0.nnz() == 0));
      CHECK_NOTHROW(m0.validate());
      const Csr<T> m1 = sus::sample_mask(Mat<T>(4, 0), make_options(4, b, d, 3));
      CHECK((m1.rows == 4 && m1.cols == 0 && m1.nnz() == 0));
      CHECK_NOTHROW(m1.validate());
      // c much larger than the row: everything with c·w >= 1 is kept exactly
      Mat<T> small(1, 3);
      small << T(0.5), T(0.25), T(0.25);
      const Csr<T> m2 = sus::sample_mask(small, make_options(1000, b, d, 3));
      CHECK(m2.col_indices == std::vector<index_t>({0, 1, 2}));
      CHECK(m2.values == std::vector<T>({T(0.5), T(0.25), T(0.25)}));
    }
}

TEST_CASE("sampler: edge cases c=1 n=1 zero rows empty shapes", "[sampler]") {
  SECTION("double") { check_edge_cases<double>(); }
  SECTION("float") { check_edge_cases<float>(); }
}

// ---------------------------------------------------------------------------------------------
// Argument errors of the sampler: each throws sus::Error with a message naming the problem.
// ---------------------------------------------------------------------------------------------
TEST_CASE("sampler: argument errors", "[sampler][errors]") {
  Mat<double> W = Mat<double>::Zero(2, 4);
  W.row(0).setConstant(0.25);
  using Catch::Contains;
  // target: c < 1
  CHECK_THROWS_WITH(sus::sample_mask(W, make_options(0, Budget::paper, Draw::independent, 0)), Contains("options.c = 0"));
  CHECK_THROWS_WITH(sus::reference::sample_mask<double>(W, make_options(-3, Budget::paper, Draw::systematic, 0)),
                    Contains("options.c = -3"));
  CHECK_THROWS_AS(sus::RowSampler<float>(make_options(0, Budget::paper, Draw::independent, 0)), sus::Error);
  std::vector<double> q(4);
  CHECK_THROWS_WITH(sus::inclusion_probabilities(W.data(), 4, 0, Budget::paper, q.data()), Contains("c = 0"));
  // target: enum values out of range
  CHECK_THROWS_WITH(sus::sample_mask(W, make_options(4, static_cast<Budget>(7), Draw::independent, 0)),
                    Contains("is not a Budget"));
  CHECK_THROWS_WITH(sus::sample_mask(W, make_options(4, Budget::paper, static_cast<Draw>(7), 0)), Contains("is not a Draw"));
  // target: W not a matrix of softmax weights
  Mat<double> bad = W;
  bad(0, 1) = -0.25, bad(0, 2) = 0.75;
  CHECK_THROWS_WITH(sus::sample_mask(bad, make_options(4, Budget::paper, Draw::independent, 0)),
                    Contains("has entry (0, 1)") && Contains(">= 0"));
  bad = W;
  bad(1, 3) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(sus::sample_mask(bad, make_options(4, Budget::paper, Draw::independent, 0)), Contains("(1, 3)"));
  bad = W;
  bad(0, 0) = 0.3;  // row sums to 1.05
  CHECK_THROWS_WITH(sus::sample_mask(bad, make_options(4, Budget::paper, Draw::independent, 0)), Contains("row 0 sums to"));
  Mat<float> badf = W.cast<float>();
  badf(0, 0) = 0.2498f;  // sum 1 − 2e-4: outside the float tolerance 1e-4
  CHECK_THROWS_WITH(sus::sample_mask(badf, make_options(4, Budget::paper, Draw::independent, 0)), Contains("sums to"));
  badf(0, 0) = 0.24995f;  // sum 1 − 5e-5: inside it
  CHECK_NOTHROW(sus::sample_mask(badf, make_options(4, Budget::paper, Draw::independent, 0)));
}

// target: a float row summing to 1 + 5e-5 (inside the row-sum tolerance) gives paper q with
// Σq = c·(1 + 5e-5) before the guard; q must be scaled to Σq ≤ c so that the systematic draw's
// c points reach every entry (else the last entries are kept less often than q says).
TEST_CASE("sampler: paper q is scaled to sum c when a row sums above 1 within tolerance", "[sampler]") {
  const int c = 4;
  Mat<float> W(1, 8);
  W.setConstant(0.125f * (1 + 5e-5f));
  std::vector<float> q(8);
  const double sum = sus::inclusion_probabilities(W.data(), 8, c, Budget::paper, q.data());
  CAPTURE(sum);
  CHECK(sum <= c + 1e-6);
  CHECK(sum >= c - 1e-6);
  // Every entry is equally likely, so over N draws each column is kept N/2 times on average;
  // a systematic row of 8 equal q = 1/2 keeps exactly 4 (every other column).
  const int N = 2000;
  std::vector<int> kept(8, 0);
  for (int t = 0; t < N; ++t) {
    const auto m = sus::sample_mask(W, make_options(c, Budget::paper, Draw::systematic, static_cast<std::uint64_t>(t)));
    REQUIRE(m.nnz() == 4);
    for (index_t j : m.col_indices) ++kept[j];
  }
  // Binomial(N, 1/2) per column: |kept − N/2| ≤ 5·sqrt(N/4) ≈ 112 fails with probability < 1e-5 (8 columns).
  for (int j = 0; j < 8; ++j) {
    CAPTURE(j, kept[j]);
    CHECK(std::abs(kept[j] - N / 2) <= 5 * std::sqrt(N / 4.0));
  }
}
