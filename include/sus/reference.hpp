// sus::reference — plain-loop versions of every kernel, kept in the library permanently.
// They are slow (O(n_q·n_k·d) loops, no blocking) and meant to be read and tested against:
// the fast paths are tested against them, and they are tested against float64 finite
// differences. Argument checks are the same as the fast paths'.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "backward.hpp"
#include "csr.hpp"
#include "forward.hpp"
#include "sampler.hpp"
#include "types.hpp"

namespace sus {
namespace reference {

/// O = softmax(s·Q·Kᵀ [+ causal] [+ mask])·V, one row at a time; hands each row of W to
/// `recorder`. A row that sees no key gets zero weights, zero output and lse −inf.
template <class T, class Recorder>
void attention_forward(const detail::nodeduce_t<ConstMatrixRef<T>>& Q, const detail::nodeduce_t<ConstMatrixRef<T>>& K,
                       const detail::nodeduce_t<ConstMatrixRef<T>>& V, detail::nodeduce_t<MatrixRef<T>> O,
                       Recorder&& recorder, const AttentionOptions& options = {},
                       const detail::nodeduce_t<ScoreMask<T>>& mask = {}) {
  constexpr const char* fn = "reference::attention_forward";
  detail::check_forward_args<T>(fn, Q, K, V, O, options);
  detail::check_score_mask(fn, mask, Q.rows(), K.rows());
  const index_t n_q = Q.rows(), d = Q.cols(), n_k = K.rows(), d_v = V.cols();
  const T s = static_cast<T>(detail::resolve_scale<T>(fn, options, d));
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  recorder.begin(n_q, n_k);
  std::vector<T> w(static_cast<std::size_t>(n_k));
  for (index_t i = 0; i < n_q; ++i) {
    index_t len = sus::detail::visible_keys(i, n_q, n_k, options);  // keys j < len are visible
    // S_ij = s · Σ_k Q_ik K_jk + add_ij  (−∞ where masked)
    T m = kNegInf;
    index_t open = 0;
    for (index_t j = 0; j < len; ++j) {
      if (!mask.visible(i, j)) {
        w[j] = kNegInf;
        continue;
      }
      T dot = 0;
      for (index_t k = 0; k < d; ++k) dot += Q(i, k) * K(j, k);
      w[j] = s * dot + mask.bias(i, j);
      m = std::max(m, w[j]);
      ++open;
    }
    if (open == 0) len = 0;  // fully masked row
    // W_ij = exp(S_ij − m) / Σ_l exp(S_il − m),  lse_i = m + log Σ_l exp(S_il − m)
    T l = 0;
    for (index_t j = 0; j < len; ++j) {
      w[j] = w[j] == kNegInf ? T(0) : std::exp(w[j] - m);
      l += w[j];
    }
    if (len > 0 && (!std::isfinite(m) || !std::isfinite(l))) sus::detail::throw_score_overflow<T>(fn, i, Q, K, s);
    for (index_t j = 0; j < len; ++j) w[j] /= l;
    for (index_t j = len; j < n_k; ++j) w[j] = 0;
    // O_i = Σ_j W_ij V_j
    for (index_t k = 0; k < d_v; ++k) {
      T acc = 0;
      for (index_t j = 0; j < len; ++j) acc += w[j] * V(j, k);
      O(i, k) = acc;
    }
    const T lse = len > 0 ? m + std::log(l) : kNegInf;
    recorder.record(i, w.data(), len, lse);
  }
  recorder.end();
}

namespace detail_ref {

// The shared loop of both reference backwards: for every (i, j) with weight Wt_ij ≠ 0
// (the dense W, or the sampled W̃):
//   dP_ij = dO_i · V_j,   dS_ij = Wt_ij (dP_ij − D_i),   D_i = dO_i · O_i
//   dQ_i += s dS_ij K_j,  dK_j += s dS_ij Q_i,  dV_j += Wt_ij dO_i
template <class T, class ForEachWeight>
void backward_loops(const char* fn, const sus::detail::BackwardArgs<T>& a, const AttentionOptions& o,
                    ForEachWeight for_each_weight) {
  const index_t n_q = a.Q.rows(), d = a.Q.cols(), n_k = a.K.rows(), d_v = a.V.cols();
  const T s = static_cast<T>(sus::detail::resolve_scale<T>(fn, o, d));
  Matrix<T> dQ = Matrix<T>::Zero(n_q, d), dK = Matrix<T>::Zero(n_k, d), dV = Matrix<T>::Zero(n_k, d_v);
  for (index_t i = 0; i < n_q; ++i) {
    T D = 0;
    for (index_t k = 0; k < d_v; ++k) D += a.dO(i, k) * a.O(i, k);
    for_each_weight(i, [&](index_t j, T wt) {
      T dP = 0;
      for (index_t k = 0; k < d_v; ++k) dP += a.dO(i, k) * a.V(j, k);
      const T dS = wt * (dP - D);
      for (index_t k = 0; k < d; ++k) dQ(i, k) += s * dS * a.K(j, k);
      for (index_t k = 0; k < d; ++k) dK(j, k) += s * dS * a.Q(i, k);
      for (index_t k = 0; k < d_v; ++k) dV(j, k) += wt * a.dO(i, k);
    });
  }
  sus::detail::store_grads<T>(a, dQ, dK, dV, o.accumulate);
}

}  // namespace detail_ref

/// Exact backward from dense W with plain loops (see backward.hpp for the formulas).
template <class T>
void attention_backward_dense(const detail::nodeduce_t<ConstMatrixRef<T>>& Q, const detail::nodeduce_t<ConstMatrixRef<T>>& K,
                              const detail::nodeduce_t<ConstMatrixRef<T>>& V, const detail::nodeduce_t<ConstMatrixRef<T>>& O,
                              const detail::nodeduce_t<ConstMatrixRef<T>>& dO, const detail::nodeduce_t<ConstMatrixRef<T>>& W,
                              detail::nodeduce_t<MatrixRef<T>> dQ, detail::nodeduce_t<MatrixRef<T>> dK,
                              detail::nodeduce_t<MatrixRef<T>> dV, const AttentionOptions& options = {}) {
  constexpr const char* fn = "reference::attention_backward_dense";
  const sus::detail::BackwardArgs<T> a{Q, K, V, O, dO, dQ, dK, dV};
  sus::detail::check_backward_args(fn, a, options);
  sus::detail::check_dense_weights(fn, a, W, options);
  detail_ref::backward_loops<T>(fn, a, options, [&](index_t i, auto&& visit) {
    for (index_t j = 0; j < W.cols(); ++j)
      if (W(i, j) != T(0)) visit(j, W(i, j));
  });
}

/// SUS backward with plain loops over the CSR mask (scatter into dK, dV; serial).
template <class T>
void attention_backward_sparse(const detail::nodeduce_t<ConstMatrixRef<T>>& Q, const detail::nodeduce_t<ConstMatrixRef<T>>& K,
                               const detail::nodeduce_t<ConstMatrixRef<T>>& V, const detail::nodeduce_t<ConstMatrixRef<T>>& O,
                               const detail::nodeduce_t<ConstMatrixRef<T>>& dO, const Csr<T>& mask,
                               detail::nodeduce_t<MatrixRef<T>> dQ, detail::nodeduce_t<MatrixRef<T>> dK,
                               detail::nodeduce_t<MatrixRef<T>> dV, const AttentionOptions& options = {}) {
  constexpr const char* fn = "reference::attention_backward_sparse";
  const sus::detail::BackwardArgs<T> a{Q, K, V, O, dO, dQ, dK, dV};
  sus::detail::check_backward_args(fn, a, options);
  sus::detail::check_mask(fn, mask, Q.rows(), K.rows(), options);
  detail_ref::backward_loops<T>(fn, a, options, [&](index_t i, auto&& visit) {
    for (index_t p = mask.row_offsets[i]; p < mask.row_offsets[i + 1]; ++p) visit(mask.col_indices[p], mask.values[p]);
  });
}

/// The sampler by its textbook definition, one row at a time, in double:
///   systematic:  prefix sums C_j = Σ_{l≤j} q_l; keep j iff one of the points u, u+1, …, u+c−1
///                lies in [C_{j−1}, C_j), with the same per-row uniform u as the fast sampler
///                (so masks match it up to rounding of the prefix sums).
///   independent: one Bernoulli(q_j) per entry, from its own Philox stream (so masks match the
///                fast sampler in distribution only).
template <class T>
Csr<T> sample_mask(const detail::nodeduce_t<ConstMatrixRef<T>>& W, const SamplerOptions& options) {
  constexpr const char* fn = "reference::sample_mask";
  sus::detail::check_sampler_options(fn, options);
  sus::detail::check_weights(fn, "W", W);
  const sus::detail::Philox4x32 rng(options.seed);
  constexpr std::uint64_t kReferenceStream = std::uint64_t{1} << 62;
  Csr<T> mask(W.rows(), W.cols());
  std::vector<T> q(static_cast<std::size_t>(W.cols()));
  for (index_t i = 0; i < W.rows(); ++i) {
    const T* w = W.row(i).data();
    inclusion_probabilities(w, W.cols(), options.c, options.budget, q.data());
    if (options.draw == Draw::systematic) {
      const double u = rng.uniform2(static_cast<std::uint64_t>(i), sus::detail::kSystematicStream)[0];
      // Points u + k, k = 0 .. c−1. The interval [C_{j−1}, C_j) holds the points with
      // ceil(C_{j−1} − u) ≤ k < ceil(C_j − u).
      const double cap = options.c;
      double C = 0;
      for (index_t j = 0; j < W.cols(); ++j) {
        const double C_next = C + q[j];
        const double first = std::min(std::ceil(C - u), cap), end = std::min(std::ceil(C_next - u), cap);
        if (end > first) {
          mask.col_indices.push_back(j);
          mask.values.push_back(w[j] / q[j]);
        }
        C = C_next;
      }
    } else {
      for (index_t j = 0; j < W.cols(); ++j) {
        const double u = rng.uniform2(static_cast<std::uint64_t>(i), kReferenceStream + static_cast<std::uint64_t>(j))[0];
        if (u < q[j]) {
          mask.col_indices.push_back(j);
          mask.values.push_back(w[j] / q[j]);
        }
      }
    }
    mask.row_offsets[i + 1] = mask.nnz();
  }
  return mask;
}

}  // namespace reference
}  // namespace sus
