// sus — the low-rank (polynomial) attention gradient of Liang, Sha, Shi, Song and Zhou (2024,
// "Multi-Layer Transformers Gradient Can be Approximated in Almost Linear Time"), as a
// deterministic, biased comparison estimator for SUS.
//
// exp(x) is replaced by its Taylor polynomial T_g(x) = Σ_{m≤g} x^m / m!, which factors through
// a feature map of dimension r = C(d + g, g) (one feature per monomial of degree ≤ g in d
// variables):
//   φ(x)_α = x^α / √α!,   φ(s·q) · φ(k) = Σ_{|α|≤g} (s·q)^α k^α / α! = T_g(s·q·k).
// With the exact forward's log-sum-exp, the approximate weights are
//   W̃_ij = exp(−lse_i) · φ(s·Q_i) · φ(K_j)    (j visible to i)
// and the backward is backward.hpp's formulas with W̃ in place of W (D_i = dO_i · O_i exact):
//   dV_j = Σ_i W̃_ij dO_i,   dS_ij = W̃_ij (dO_i·V_j − D_i),   dQ = s·dS·K,   dK = s·dSᵀ·Q.
// Every term is computed through r-dimensional states, never an n x n matrix:
//   dQ_i = s·a_i [ Σ_v dO_iv (φ_i N1)[v, :] − D_i φ_i N2 ],
//        N1 = Σ_j φ(K_j) ⊗ V_j ⊗ K_j (r x d_v·d),  N2 = Σ_j φ(K_j) ⊗ K_j (r x d)
//   dK_j = s [ Σ_v V_jv (φ(K_j) N3)[v, :] − φ(K_j) N4 ],   dV_j = φ(K_j) N5,
//        N3 = Σ_i φ_i ⊗ a_i dO_i ⊗ Q_i,  N4 = Σ_i φ_i ⊗ a_i D_i Q_i,  N5 = Σ_i φ_i ⊗ a_i dO_i
// with φ_i = φ(s·Q_i) and a_i = exp(−lse_i). Causal masks use prefix sums over row blocks
// (as in causal linear attention): the state holds the keys every query of a block sees, and
// the block's few partly visible keys are done explicitly (a block x block product). Cost
// O(n·r·d·d_v) time and O(r·d·d_v) memory: linear in n, but r grows like d^g / g!.
//
// Accuracy: |T_g(x) − eˣ| ≤ e^|x| |x|^{g+1} / (g+1)!, so with B = max |s·Q_i·K_j| every weight
// has relative error ≤ ε_g = e^{2B} B^{g+1} / (g+1)! (tested). Odd g can make W̃ negative for
// very negative scores.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "backward.hpp"
#include "error.hpp"
#include "forward.hpp"
#include "reference.hpp"
#include "types.hpp"

namespace sus {
namespace lowrank {

using sus::detail::fail;
using sus::detail::shape;

/// Options of the low-rank estimator.
struct Options {
  /// Taylor degree g ≥ 0 (g = 0 is uniform attention over the visible keys).
  int degree = 2;
  /// Rows per block of the prefix sums (queries, or keys): the partly visible keys of a causal
  /// block are done explicitly, block x block.
  index_t block = 64;
  /// Largest state allowed, in values: r·d·d_v must not exceed it (the memory guard; the
  /// default, 2^28 floats, is 1 GiB).
  index_t max_state = index_t(1) << 28;
};

/// r = C(d + g, g): the number of monomials of degree ≤ g in d variables. Throws sus::Error
/// when it would exceed 2^50.
inline index_t feature_dim(index_t d, int degree) {
  constexpr const char* fn = "lowrank::feature_dim";
  if (d < 1) fail(fn, "head dim d = ", d, " must be >= 1");
  if (degree < 0) fail(fn, "degree = ", degree, " must be >= 0");
  // C(d + m, m) = C(d + m − 1, m − 1)·(d + m) / m, exact at every step.
  index_t r = 1;
  for (int m = 1; m <= degree; ++m) {
    if (r > (index_t(1) << 50) / (d + m)) fail(fn, "C(d + g, g) for d = ", d, ", g = ", degree, " exceeds 2^50");
    r = r * (d + m) / m;
  }
  return r;
}

/// The polynomial feature map φ of degree g on d-dimensional rows: φ(x)·φ(y) = T_g(x·y).
/// Features are the monomials x^α / √α!, |α| ≤ g, in graded order (degree 0, then 1, ...);
/// each is its parent monomial (one variable fewer) times one variable.
template <class T>
class FeatureMap {
 public:
  FeatureMap(index_t d, int degree) : d_(d), degree_(degree) {
    const index_t r = feature_dim(d, degree);
    parent_.reserve(static_cast<std::size_t>(r));
    var_.reserve(static_cast<std::size_t>(r));
    factor_.reserve(static_cast<std::size_t>(r));
    std::vector<index_t> run;  // multiplicity of the monomial's last variable
    parent_.push_back(-1), var_.push_back(-1), factor_.push_back(T(1)), run.push_back(0);
    index_t begin = 0, end = 1;  // the monomials of the previous degree
    for (int m = 1; m <= degree; ++m) {
      for (index_t p = begin; p < end; ++p) {
        const index_t last = var_[static_cast<std::size_t>(p)];
        for (index_t k = std::max<index_t>(last, 0); k < d; ++k) {
          // Appending x_k raises α_k by one: α! gains the factor (new multiplicity).
          const index_t mult = k == last ? run[static_cast<std::size_t>(p)] + 1 : 1;
          parent_.push_back(p);
          var_.push_back(k);
          factor_.push_back(static_cast<T>(1.0 / std::sqrt(static_cast<double>(mult))));
          run.push_back(mult);
        }
      }
      begin = end;
      end = static_cast<index_t>(parent_.size());
    }
    SUS_ASSERT(static_cast<index_t>(parent_.size()) == r);
  }

  index_t input_dim() const { return d_; }
  int degree() const { return degree_; }
  /// r = C(d + g, g)
  index_t dim() const { return static_cast<index_t>(parent_.size()); }

  /// out.row(i) = φ(multiplier · X.row(i)); X: rows x d, out: rows x dim().
  void apply(const ConstMatrixRef<T>& X, T multiplier, MatrixRef<T> out) const {
    SUS_ASSERT(X.cols() == d_ && out.rows() == X.rows() && out.cols() == dim());
    std::vector<T> x(static_cast<std::size_t>(d_));
    const index_t r = dim();
    for (index_t i = 0; i < X.rows(); ++i) {
      for (index_t k = 0; k < d_; ++k) x[static_cast<std::size_t>(k)] = multiplier * X(i, k);
      T* f = out.row(i).data();
      f[0] = T(1);
      for (index_t a = 1; a < r; ++a) {
        const std::size_t u = static_cast<std::size_t>(a);
        f[a] = f[parent_[u]] * x[static_cast<std::size_t>(var_[u])] * factor_[u];
      }
    }
  }

 private:
  index_t d_;
  int degree_;
  std::vector<index_t> parent_, var_;
  std::vector<T> factor_;
};

/// T_g(x) = Σ_{m≤g} x^m / m! (Horner), the scalar the feature map factors.
template <class T>
T taylor_exp(T x, int degree) {
  T acc = T(1);
  for (int m = degree; m >= 1; --m) acc = T(1) + acc * x / static_cast<T>(m);
  return acc;
}

namespace detail {

using sus::detail::BackwardArgs;

// Options, lse and the state size; returns r.
template <class T>
index_t check_lowrank(const char* fn, const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, index_t d_v,
                      const Eigen::Ref<const Vector<T>>* lse, const AttentionOptions& o, const Options& lo) {
  const index_t n_q = Q.rows(), n_k = K.rows(), d = Q.cols();
  if (lo.degree < 0) fail(fn, "options.degree = ", lo.degree, " must be >= 0");
  if (lo.block < 1) fail(fn, "options.block = ", lo.block, " must be >= 1");
  if (lo.max_state < 1) fail(fn, "options.max_state = ", lo.max_state, " must be >= 1");
  const index_t r = feature_dim(d, lo.degree);
  if (r > lo.max_state / (d * d_v))
    fail(fn, "degree g = ", lo.degree, " with Q ", shape(n_q, d), " and V ", shape(n_k, d_v),
         " needs a state of r·d·d_v = ", r, "·", d, "·", d_v, " values (r = C(d + g, g)), over options.max_state = ",
         lo.max_state, ": lower the degree");
  if (lse) {
    const auto& L = *lse;
    if (L.size() != n_q) fail(fn, "argument 'lse' has ", L.size(), " entries, expected n_q = ", n_q, " (one per row of Q)");
    for (index_t i = 0; i < n_q; ++i) {
      const bool sees = sus::detail::visible_keys(i, n_q, n_k, o) > 0;
      const T v = L[i];
      if (sees ? !std::isfinite(static_cast<double>(v)) : v != -std::numeric_limits<T>::infinity())
        fail(fn, "argument 'lse' (", n_q, " entries) has ", v, " at row ", i, ", expected ",
             sees ? "a finite log-sum-exp (the row sees keys)" : "-inf (the row sees no key)");
      if (sees && !std::isfinite(static_cast<double>(static_cast<T>(std::exp(-static_cast<double>(v))))))
        fail(fn, "argument 'lse' has ", v, " at row ", i, ": exp(-lse) overflows");
    }
  }
  return r;
}

// Every argument of a low-rank backward (the fast one and its reference check the same).
template <class T>
void check_lowrank_backward(const char* fn, const BackwardArgs<T>& a, const Eigen::Ref<const Vector<T>>& lse,
                            const AttentionOptions& o, const Options& lo) {
  sus::detail::check_backward_args(fn, a, o);
  check_lowrank<T>(fn, a.Q, a.K, a.V.cols(), &lse, o, lo);
}

template <class T>
void lowrank_backward(const BackwardArgs<T>& a, const Eigen::Ref<const Vector<T>>& lse, const AttentionOptions& o,
                      const Options& lo) {
  const index_t n_q = a.Q.rows(), d = a.Q.cols(), n_k = a.K.rows(), d_v = a.V.cols();
  const T s = static_cast<T>(sus::detail::resolve_scale<T>("lowrank::attention_backward", o, d));
  const FeatureMap<T> phi(d, lo.degree);
  const index_t r = phi.dim(), b = lo.block, dvd = d_v * d;
  auto visible = [&](index_t i) { return sus::detail::visible_keys(i, n_q, n_k, o); };
  Vector<T> A(n_q), D(n_q);  // a_i = exp(−lse_i) (0 for rows that see nothing), D_i = dO_i·O_i
  for (index_t i = 0; i < n_q; ++i) {
    A[i] = visible(i) > 0 ? static_cast<T>(std::exp(-static_cast<double>(lse[i]))) : T(0);
    D[i] = a.dO.row(i).dot(a.O.row(i));
  }
  Matrix<T> gQ = Matrix<T>::Zero(n_q, d), gK = Matrix<T>::Zero(n_k, d), gV = Matrix<T>::Zero(n_k, d_v);
  const index_t rows_max = std::min(b, std::max(n_q, n_k));
  Matrix<T> phi_q(rows_max, r), phi_k(rows_max, r), Z(rows_max, dvd), G, H;
  const index_t blocks = (n_q + b - 1) / b;
  auto first_key = [&](index_t c) { return c < 0 ? index_t(0) : visible(c * b); };  // lo_c: seen by all of block c

  // Pass 1, queries in ascending blocks: N1, N2 over the keys every query of the block sees,
  // then the block's partly visible keys [lo, hi) explicitly (for dQ, dK and dV).
  Matrix<T> N1 = Matrix<T>::Zero(r, dvd), N2 = Matrix<T>::Zero(r, d);
  index_t added = 0;
  for (index_t c = 0; c < blocks; ++c) {
    const index_t i0 = c * b, rows = std::min(b, n_q - i0), lo_c = first_key(c), hi_c = visible(i0 + rows - 1);
    while (added < lo_c) {
      const index_t m = std::min(b, lo_c - added);
      phi.apply(a.K.middleRows(added, m), T(1), phi_k.topRows(m));
      for (index_t jj = 0; jj < m; ++jj)
        for (index_t v = 0; v < d_v; ++v) Z.row(jj).segment(v * d, d) = a.V(added + jj, v) * a.K.row(added + jj);
      N1.noalias() += phi_k.topRows(m).transpose() * Z.topRows(m);
      N2.noalias() += phi_k.topRows(m).transpose() * a.K.middleRows(added, m);
      added += m;
    }
    phi.apply(a.Q.middleRows(i0, rows), s, phi_q.topRows(rows));
    if (added > 0) {
      G.noalias() = phi_q.topRows(rows) * N1;
      H.noalias() = phi_q.topRows(rows) * N2;
      for (index_t rr = 0; rr < rows; ++rr) {
        const index_t i = i0 + rr;
        Eigen::Matrix<T, 1, Eigen::Dynamic> acc = -D[i] * H.row(rr);
        for (index_t v = 0; v < d_v; ++v) acc.noalias() += a.dO(i, v) * G.row(rr).segment(v * d, d);
        gQ.row(i).noalias() += (s * A[i]) * acc;
      }
    }
    if (hi_c > lo_c) {
      const index_t m = hi_c - lo_c;
      Matrix<T> phi_kb(m, r);
      phi.apply(a.K.middleRows(lo_c, m), T(1), phi_kb);
      Matrix<T> Wt = phi_q.topRows(rows) * phi_kb.transpose();
      for (index_t rr = 0; rr < rows; ++rr) {
        const index_t i = i0 + rr, len = visible(i);
        for (index_t jj = 0; jj < m; ++jj) Wt(rr, jj) = lo_c + jj < len ? A[i] * Wt(rr, jj) : T(0);
      }
      Matrix<T> dS = a.dO.middleRows(i0, rows) * a.V.middleRows(lo_c, m).transpose();
      dS.colwise() -= D.segment(i0, rows);
      dS.array() *= Wt.array();
      gQ.middleRows(i0, rows).noalias() += s * dS * a.K.middleRows(lo_c, m);
      gK.middleRows(lo_c, m).noalias() += s * dS.transpose() * a.Q.middleRows(i0, rows);
      gV.middleRows(lo_c, m).noalias() += Wt.transpose() * a.dO.middleRows(i0, rows);
    }
  }

  // Pass 2, queries in descending blocks: N3, N4, N5 over blocks c.. ; the keys in
  // [lo_{c−1}, lo_c) are seen in full by exactly those blocks.
  Matrix<T> N3 = Matrix<T>::Zero(r, dvd), N4 = Matrix<T>::Zero(r, d), N5 = Matrix<T>::Zero(r, d_v);
  Matrix<T> Y4(rows_max, d), Y5(rows_max, d_v);
  for (index_t c = blocks - 1; c >= 0; --c) {
    const index_t i0 = c * b, rows = std::min(b, n_q - i0);
    phi.apply(a.Q.middleRows(i0, rows), s, phi_q.topRows(rows));
    for (index_t rr = 0; rr < rows; ++rr) {
      const index_t i = i0 + rr;
      for (index_t v = 0; v < d_v; ++v) Z.row(rr).segment(v * d, d) = (A[i] * a.dO(i, v)) * a.Q.row(i);
      Y4.row(rr) = (A[i] * D[i]) * a.Q.row(i);
      Y5.row(rr) = A[i] * a.dO.row(i);
    }
    N3.noalias() += phi_q.topRows(rows).transpose() * Z.topRows(rows);
    N4.noalias() += phi_q.topRows(rows).transpose() * Y4.topRows(rows);
    N5.noalias() += phi_q.topRows(rows).transpose() * Y5.topRows(rows);
    for (index_t j0 = first_key(c - 1); j0 < first_key(c);) {
      const index_t m = std::min(b, first_key(c) - j0);
      phi.apply(a.K.middleRows(j0, m), T(1), phi_k.topRows(m));
      G.noalias() = phi_k.topRows(m) * N3;
      H.noalias() = phi_k.topRows(m) * N4;
      for (index_t jj = 0; jj < m; ++jj) {
        const index_t j = j0 + jj;
        Eigen::Matrix<T, 1, Eigen::Dynamic> acc = -H.row(jj);
        for (index_t v = 0; v < d_v; ++v) acc.noalias() += a.V(j, v) * G.row(jj).segment(v * d, d);
        gK.row(j).noalias() += s * acc;
      }
      gV.middleRows(j0, m).noalias() += phi_k.topRows(m) * N5;
      j0 += m;
    }
  }
  sus::detail::store_grads<T>(a, gQ, gK, gV, o.accumulate);
}

template <class T>
void lowrank_forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V, MatrixRef<T>& O,
                     const AttentionOptions& o, const Options& lo) {
  constexpr const char* fn = "lowrank::attention_forward";
  const index_t n_q = Q.rows(), d = Q.cols(), n_k = K.rows(), d_v = V.cols();
  const T s = static_cast<T>(sus::detail::resolve_scale<T>(fn, o, d));
  const FeatureMap<T> phi(d, lo.degree);
  const index_t r = phi.dim(), b = lo.block;
  auto visible = [&](index_t i) { return sus::detail::visible_keys(i, n_q, n_k, o); };
  const index_t rows_max = std::min(b, std::max(n_q, n_k));
  Matrix<T> M1 = Matrix<T>::Zero(r, d_v), phi_q(rows_max, r), phi_k(rows_max, r);
  Vector<T> m2 = Vector<T>::Zero(r);
  index_t added = 0;
  for (index_t i0 = 0; i0 < n_q; i0 += b) {
    const index_t rows = std::min(b, n_q - i0), lo_c = visible(i0), hi_c = visible(i0 + rows - 1);
    while (added < lo_c) {
      const index_t m = std::min(b, lo_c - added);
      phi.apply(K.middleRows(added, m), T(1), phi_k.topRows(m));
      M1.noalias() += phi_k.topRows(m).transpose() * V.middleRows(added, m);
      m2.noalias() += phi_k.topRows(m).transpose() * Vector<T>::Ones(m);
      added += m;
    }
    phi.apply(Q.middleRows(i0, rows), s, phi_q.topRows(rows));
    Matrix<T> num = phi_q.topRows(rows) * M1;
    Vector<T> den = phi_q.topRows(rows) * m2;
    if (hi_c > lo_c) {
      const index_t m = hi_c - lo_c;
      Matrix<T> phi_kb(m, r);
      phi.apply(K.middleRows(lo_c, m), T(1), phi_kb);
      Matrix<T> At = phi_q.topRows(rows) * phi_kb.transpose();
      for (index_t rr = 0; rr < rows; ++rr)
        for (index_t jj = lo_c; jj < hi_c; ++jj)
          if (jj >= visible(i0 + rr)) At(rr, jj - lo_c) = T(0);
      num.noalias() += At * V.middleRows(lo_c, m);
      den.noalias() += At.rowwise().sum();
    }
    for (index_t rr = 0; rr < rows; ++rr) {
      const index_t i = i0 + rr;
      if (visible(i) == 0) {
        O.row(i).setZero();
        continue;
      }
      if (!(den[rr] > T(0)) || !std::isfinite(static_cast<double>(den[rr])))
        fail(fn, "row ", i, " of Q ", shape(n_q, d), ": the degree-", lo.degree, " normaliser Σ_j T_g(s·q·k) = ",
             den[rr], " is not positive and finite (odd degrees go negative on very negative scores): use an even "
             "degree or smaller entries");
      O.row(i) = num.row(rr) / den[rr];
    }
  }
}

}  // namespace detail

/// Low-rank approximate backward, O(n·r·d·d_v) with r = C(d + g, g): dQ, dK, dV with the
/// degree-g weights W̃ in place of W (see the top of this header). Takes the exact forward's
/// state: Q, K, V, O, dO as attention_backward_sparse, and lse (n_q entries, the forward's
/// log-sum-exp: sus::LogSumExp records it; −inf exactly for rows that see no key).
/// Causal (either alignment) and non-causal; no ScoreMask. options.accumulate adds.
/// Throws sus::Error on bad shapes, non-finite input, a bad lse, or a state over
/// lowrank.max_state.
template <class T>
void attention_backward(const sus::detail::nodeduce_t<ConstMatrixRef<T>>& Q,
                        const sus::detail::nodeduce_t<ConstMatrixRef<T>>& K,
                        const sus::detail::nodeduce_t<ConstMatrixRef<T>>& V,
                        const sus::detail::nodeduce_t<ConstMatrixRef<T>>& O,
                        const sus::detail::nodeduce_t<ConstMatrixRef<T>>& dO,
                        const Eigen::Ref<const Vector<T>>& lse, sus::detail::nodeduce_t<MatrixRef<T>> dQ,
                        sus::detail::nodeduce_t<MatrixRef<T>> dK, sus::detail::nodeduce_t<MatrixRef<T>> dV,
                        const AttentionOptions& options = {}, const Options& lowrank = {}) {
  constexpr const char* fn = "lowrank::attention_backward";
  const sus::detail::BackwardArgs<T> a{Q, K, V, O, dO, dQ, dK, dV};
  detail::check_lowrank_backward<T>(fn, a, lse, options, lowrank);
  detail::lowrank_backward<T>(a, lse, options, lowrank);
}

/// Low-rank approximate forward (for completeness): O_i = Σ_j Ã_ij V_j / Σ_j Ã_ij with
/// Ã_ij = T_g(s·Q_i·K_j) over the visible keys, through the same states (O(n·r·d_v)).
/// Throws sus::Error when a row's normaliser is not positive (possible for odd g).
template <class T>
void attention_forward(const sus::detail::nodeduce_t<ConstMatrixRef<T>>& Q,
                       const sus::detail::nodeduce_t<ConstMatrixRef<T>>& K,
                       const sus::detail::nodeduce_t<ConstMatrixRef<T>>& V, sus::detail::nodeduce_t<MatrixRef<T>> O,
                       const AttentionOptions& options = {}, const Options& lowrank = {}) {
  constexpr const char* fn = "lowrank::attention_forward";
  sus::detail::check_forward_args<T>(fn, Q, K, V, O, options);
  detail::check_lowrank<T>(fn, Q, K, V.cols(), nullptr, options, lowrank);
  detail::lowrank_forward<T>(Q, K, V, O, options, lowrank);
}

namespace reference {

/// The low-rank backward by its definition: W̃_ij = exp(−lse_i)·T_g(s·Q_i·K_j) formed entry by
/// entry (the n x n approximate matrix, never the feature map), then the plain backward loops.
template <class T>
void attention_backward(const sus::detail::nodeduce_t<ConstMatrixRef<T>>& Q,
                        const sus::detail::nodeduce_t<ConstMatrixRef<T>>& K,
                        const sus::detail::nodeduce_t<ConstMatrixRef<T>>& V,
                        const sus::detail::nodeduce_t<ConstMatrixRef<T>>& O,
                        const sus::detail::nodeduce_t<ConstMatrixRef<T>>& dO,
                        const Eigen::Ref<const Vector<T>>& lse, sus::detail::nodeduce_t<MatrixRef<T>> dQ,
                        sus::detail::nodeduce_t<MatrixRef<T>> dK, sus::detail::nodeduce_t<MatrixRef<T>> dV,
                        const AttentionOptions& options = {}, const Options& lowrank = {}) {
  constexpr const char* fn = "lowrank::reference::attention_backward";
  const sus::detail::BackwardArgs<T> a{Q, K, V, O, dO, dQ, dK, dV};
  detail::check_lowrank_backward<T>(fn, a, lse, options, lowrank);
  const index_t n_q = Q.rows(), n_k = K.rows();
  const T s = static_cast<T>(sus::detail::resolve_scale<T>(fn, options, Q.cols()));
  sus::reference::detail_ref::backward_loops<T>(fn, a, options, [&](index_t i, auto&& visit) {
    const index_t len = sus::detail::visible_keys(i, n_q, n_k, options);
    if (len == 0) return;
    const T a_i = static_cast<T>(std::exp(-static_cast<double>(lse[i])));
    for (index_t j = 0; j < len; ++j) visit(j, a_i * taylor_exp<T>(s * Q.row(i).dot(K.row(j)), lowrank.degree));
  });
}

/// The low-rank forward by its definition: Ã_ij = T_g(s·Q_i·K_j), O_i = Σ_j Ã_ij V_j / Σ_j Ã_ij.
template <class T>
void attention_forward(const sus::detail::nodeduce_t<ConstMatrixRef<T>>& Q,
                       const sus::detail::nodeduce_t<ConstMatrixRef<T>>& K,
                       const sus::detail::nodeduce_t<ConstMatrixRef<T>>& V, sus::detail::nodeduce_t<MatrixRef<T>> O,
                       const AttentionOptions& options = {}, const Options& lowrank = {}) {
  constexpr const char* fn = "lowrank::reference::attention_forward";
  sus::detail::check_forward_args<T>(fn, Q, K, V, O, options);  // the checks of the fast forward
  detail::check_lowrank<T>(fn, Q, K, V.cols(), nullptr, options, lowrank);
  const index_t n_q = Q.rows(), n_k = K.rows();
  const T s = static_cast<T>(sus::detail::resolve_scale<T>(fn, options, Q.cols()));
  for (index_t i = 0; i < n_q; ++i) {
    const index_t len = sus::detail::visible_keys(i, n_q, n_k, options);
    O.row(i).setZero();
    T den = 0;
    for (index_t j = 0; j < len; ++j) {
      const T w = taylor_exp<T>(s * Q.row(i).dot(K.row(j)), lowrank.degree);
      O.row(i) += w * V.row(j);
      den += w;
    }
    if (len == 0) continue;
    if (!(den > T(0)) || !std::isfinite(static_cast<double>(den)))
      fail(fn, "row ", i, " of Q ", shape(n_q, Q.cols()), ": the degree-", lowrank.degree,
           " normaliser Σ_j T_g(s·q·k) = ", den, " is not positive and finite");
    O.row(i) /= den;
  }
}

}  // namespace reference
}  // namespace lowrank
}  // namespace sus
