// Shared helpers for the sus tests.
#pragma once

#include <catch2/catch.hpp>
#include <sus/sus.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace sus_test {

using sus::index_t;
template <class T>
using M = sus::Matrix<T>;

// Random matrix with entries uniform in [-scale, scale], fixed seed.
template <class T>
M<T> random_matrix(index_t rows, index_t cols, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(-scale, scale);
  M<T> m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) m(i, j) = static_cast<T>(dist(gen));
  return m;
}

// Norm-wise relative error: max|a − b| / max|b| (max|b| floored at 1e-30).
// Elementwise relative error is meaningless for entries near zero; this is the error
// relative to the scale of the reference.
template <class A, class B>
double max_rel_error(const A& a, const B& b) {
  const auto ad = a.template cast<double>();
  const auto bd = b.template cast<double>();
  const double scale = std::max(bd.cwiseAbs().maxCoeff(), 1e-30);
  return (ad - bd).cwiseAbs().maxCoeff() / scale;
}

// A row of a test table: one problem shape, and the bug it targets.
struct Shape {
  index_t n_q, n_k, d, d_v;
  bool causal;
  const char* targets;
  sus::CausalAlignment alignment = sus::CausalAlignment::top_left;
};

// One attention problem (single head) with its exact forward state.
template <class T>
struct Problem {
  M<T> Q, K, V, dO, O, W;
  sus::AttentionOptions options;

  Problem(index_t n_q, index_t n_k, index_t d, index_t d_v, bool causal, std::uint64_t seed, double qk_scale = 1.0,
          sus::CausalAlignment alignment = sus::CausalAlignment::top_left)
      : Q(random_matrix<T>(n_q, d, seed, qk_scale)),
        K(random_matrix<T>(n_k, d, seed + 1, qk_scale)),
        V(random_matrix<T>(n_k, d_v, seed + 2)),
        dO(random_matrix<T>(n_q, d_v, seed + 3)),
        O(n_q, d_v) {
    options.causal = causal;
    options.alignment = alignment;
    sus::DenseWeights<T> rec;
    sus::attention_forward(Q, K, V, O, rec, options);
    W = rec.W;
  }
};

// Gradients of one backward call.
template <class T>
struct Grads {
  M<T> dQ, dK, dV;
  Grads(index_t n_q, index_t n_k, index_t d, index_t d_v) : dQ(n_q, d), dK(n_k, d), dV(n_k, d_v) {}
  template <class P>
  explicit Grads(const P& p) : Grads(p.Q.rows(), p.K.rows(), p.Q.cols(), p.V.cols()) {}
};

// Checks each of dQ, dK, dV against a reference: max_rel_error ≤ tol (reported on failure).
template <class A, class B>
void check_grads_close(const A& got, const B& ref, double tol) {
  const double eQ = max_rel_error(got.dQ, ref.dQ), eK = max_rel_error(got.dK, ref.dK),
               eV = max_rel_error(got.dV, ref.dV);
  CAPTURE(eQ, eK, eV, tol);
  CHECK(eQ <= tol);
  CHECK(eK <= tol);
  CHECK(eV <= tol);
}

// The message of the sus::Error thrown by f, or a marker that makes every matcher of a
// message fail.
// With SUS_BAD_INPUT_LOG set, every sus::Error message is appended to that file, one per line:
// scripts/bad-input-table turns them into the table of tested bad-input classes in
// docs/bad-inputs.md, and scripts/test checks that the table is the tests' own.
inline void log_bad_input(const std::string& message) {
  const char* path = std::getenv("SUS_BAD_INPUT_LOG");
  if (path == nullptr || *path == '\0') return;
  std::string line = message;
  std::replace(line.begin(), line.end(), '\n', ' ');
  line += '\n';
  if (std::FILE* f = std::fopen(path, "a")) {  // one write of a short line: whole under O_APPEND
    std::fwrite(line.data(), 1, line.size(), f);
    std::fclose(f);
  }
}

template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const sus::Error& e) {
    log_bad_input(e.what());
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<threw a std::exception that is not sus::Error> ") + e.what();
  } catch (...) {
    return "<threw a non-std exception>";
  }
  return "<no exception>";
}

// Two-sided standard normal tail: P(|Z| > z).
inline double normal_two_sided_tail(double z) { return std::erfc(z / std::sqrt(2.0)); }

// Smallest z with P(|Z| > z) ≤ alpha (bisection; used for Bonferroni thresholds).
inline double normal_two_sided_quantile(double alpha) {
  double lo = 0, hi = 40;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    (normal_two_sided_tail(mid) > alpha ? lo : hi) = mid;
  }
  return hi;
}

// Mean-within-kσ/√N tests of unbiasedness: running sums of x and x² per coordinate over N
// draws, judged against the exact values.
struct Moments {
  std::vector<double> sum, sum2;
  explicit Moments(std::size_t n) : sum(n, 0), sum2(n, 0) {}
  void add(const std::vector<double>& x) {
    for (std::size_t i = 0; i < x.size(); ++i) sum[i] += x[i], sum2[i] += x[i] * x[i];
  }
};

struct Verdict {
  double worst_z = 0;         // max over the random coordinates of |mean − exact| / (σ/√N)
  index_t violations = 0;     // coordinates with |mean − exact| > k·σ/√N + slack
  index_t random_coords = 0;  // coordinates with σ/√N > random_rel·max|exact| (those the masks make random)
};

// σ is the sample standard deviation over the N draws. slack = slack_rel·max|exact| covers the
// rounding of the two computation orders, for coordinates that are exact in every draw (σ = 0).
inline Verdict judge_means(const Moments& m, const std::vector<double>& exact, int N, double k, double slack_rel,
                           double random_rel = 0) {
  double scale = 0;
  for (double x : exact) scale = std::max(scale, std::abs(x));
  const double slack = slack_rel * scale;
  Verdict v;
  for (std::size_t e = 0; e < exact.size(); ++e) {
    const double mean = m.sum[e] / N;
    const double var = std::max(0.0, (m.sum2[e] - N * mean * mean) / (N - 1));
    const double se = std::sqrt(var / N);
    const double err = std::abs(mean - exact[e]);
    if (err > k * se + slack) ++v.violations;
    if (se > random_rel * scale) {
      ++v.random_coords;
      v.worst_z = std::max(v.worst_z, err / se);
    }
  }
  return v;
}

}  // namespace sus_test
