// sus — dense attention forward that hands every finished row of W to a recorder.
//
//   S = s·Q·Kᵀ (causal: S_ij = −∞ for j > i)     Q: n_q x d, K: n_k x d
//   W = softmax_row(S)                            n_q x n_k
//   O = W·V                                       V: n_k x d_v, O: n_q x d_v
//
// Computed in blocks of rows with two GEMMs per block (S_b = (s·Q_b)·Kᵀ, O_b = W_b·V), so the
// only n_k-wide buffer is one row block; causal blocks only touch keys j < (last row + 1).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "error.hpp"
#include "recorders.hpp"
#include "types.hpp"

namespace sus {
namespace detail {

struct ForwardConfig {
  // Query rows per block: Eigen repacks all of K for every block, so larger blocks amortise
  // that; smaller ones keep the row_block x n_k score buffer near cache (128 x 8192 floats =
  // 4 MiB).
  static constexpr index_t row_block = 128;
  static_assert(row_block > 0, "ForwardConfig::row_block must be positive");
};

template <class T>
void check_forward_args(const char* fn, const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K,
                        const ConstMatrixRef<T>& V, const MatrixRef<T>& O, const AttentionOptions& o) {
  const index_t n_q = Q.rows(), d = Q.cols(), n_k = K.rows(), d_v = V.cols();
  if (d < 1) fail(fn, "argument 'Q' has shape ", shape(n_q, d), ": head dim d must be >= 1");
  if (d_v < 1) fail(fn, "argument 'V' has shape ", shape(V.rows(), d_v), ": value dim d_v must be >= 1");
  check_shape(fn, "K", K, n_k, d, "n_k x d, d = Q.cols()");
  check_shape(fn, "V", V, n_k, d_v, "n_k x d_v, n_k = K.rows()");
  check_shape(fn, "O", O, n_q, d_v, "n_q x d_v");
  if (o.causal && n_q != n_k)
    fail(fn, "options.causal needs n_q = n_k, got Q ", shape(n_q, d), " and K ", shape(n_k, d));
  check_finite(fn, "Q", Q);
  check_finite(fn, "K", K);
  check_finite(fn, "V", V);
  check_no_overlap(fn, "O", O, "Q", Q);
  check_no_overlap(fn, "O", O, "K", K);
  check_no_overlap(fn, "O", O, "V", V);
}

template <class T>
[[noreturn]] void throw_score_overflow(const char* fn, index_t row, const ConstMatrixRef<T>& Q,
                                       const ConstMatrixRef<T>& K, double scale) {
  fail(fn, "the scores s·Q·Kᵀ of row ", row, " are not finite (floating-point overflow); Q ",
       shape(Q.rows(), Q.cols()), ", K ", shape(K.rows(), K.cols()), ", scale ", scale,
       ". Rescale Q and K, or compute in double");
}

template <class T, class Recorder>
void attention_forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                       MatrixRef<T> O, Recorder& recorder, const AttentionOptions& options) {
  constexpr const char* fn = "attention_forward";
  check_forward_args<T>(fn, Q, K, V, O, options);
  const index_t n_q = Q.rows(), d = Q.cols(), n_k = K.rows();
  const T scale = static_cast<T>(resolve_scale(fn, options, d));
  constexpr index_t Br = ForwardConfig::row_block;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  recorder.begin(n_q, n_k);
  Matrix<T> S(std::min(Br, n_q), n_k);  // scores, then weights, of one row block
  Matrix<T> Qs(std::min(Br, n_q), d);   // s·Q_b
  Vector<T> lse(std::min(Br, n_q));
  for (index_t i0 = 0; i0 < n_q; i0 += Br) {
    const index_t rows = std::min(Br, n_q - i0);
    const index_t kv = options.causal ? i0 + rows : n_k;  // keys any row of the block can see
    if (kv == 0) {  // no keys at all: every row is fully masked
      O.middleRows(i0, rows).setZero();
      for (index_t r = 0; r < rows; ++r) recorder.record(i0 + r, S.data(), index_t{0}, kNegInf);
      continue;
    }
    auto Sb = S.topLeftCorner(rows, kv);
    // S_b = (s·Q_b)·K_{0:kv}ᵀ
    Qs.topRows(rows).noalias() = scale * Q.middleRows(i0, rows);
    Sb.noalias() = Qs.topRows(rows) * K.topRows(kv).transpose();
    // W_b = softmax_row(S_b), keys j ≥ len masked (exactly zero)
    for (index_t r = 0; r < rows; ++r) {
      const index_t len = options.causal ? i0 + r + 1 : kv;
      auto s_row = Sb.row(r).head(len).array();
      const T m = s_row.maxCoeff();
      s_row = (s_row - m).exp();
      const T l = s_row.sum();
      // Finite inputs can still overflow s·Q·Kᵀ (to ±inf, or NaN from inf − inf): a non-finite
      // max or sum catches every case (a NaN anywhere in the row makes the sum NaN).
      if (!std::isfinite(m) || !std::isfinite(l)) throw_score_overflow(fn, i0 + r, Q, K, scale);
      s_row *= T(1) / l;
      Sb.row(r).tail(kv - len).setZero();
      lse[r] = m + std::log(l);
    }
    // O_b = W_b·V_{0:kv}
    O.middleRows(i0, rows).noalias() = Sb * V.topRows(kv);
    for (index_t r = 0; r < rows; ++r) {
      const index_t len = options.causal ? i0 + r + 1 : kv;
      recorder.record(i0 + r, Sb.row(r).data(), len, lse[r]);
    }
  }
  recorder.end();
}

}  // namespace detail

/// Dense attention forward: O = softmax(s·Q·Kᵀ [+ causal mask])·V, handing each finished row
/// of W to `recorder` (DenseWeights, LogSumExp, SusMask, NoRecord, recorders(a, b), or your own;
/// see recorders.hpp).
///   Q: n_q x d, K: n_k x d, V: n_k x d_v — row-major, finite.
///   O: n_q x d_v, caller-owned, overwritten. Must not overlap Q, K or V.
/// Throws sus::Error on bad shapes, non-finite input, or causal with n_q ≠ n_k.
template <class Recorder>
void attention_forward(const ConstMatrixRef<float>& Q, const ConstMatrixRef<float>& K,
                       const ConstMatrixRef<float>& V, MatrixRef<float> O, Recorder&& recorder,
                       const AttentionOptions& options = {}) {
  detail::attention_forward<float>(Q, K, V, O, recorder, options);
}
template <class Recorder>
void attention_forward(const ConstMatrixRef<double>& Q, const ConstMatrixRef<double>& K,
                       const ConstMatrixRef<double>& V, MatrixRef<double> O, Recorder&& recorder,
                       const AttentionOptions& options = {}) {
  detail::attention_forward<double>(Q, K, V, O, recorder, options);
}

}  // namespace sus
