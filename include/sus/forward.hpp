// sus — dense attention forward that hands every finished row of W to a recorder.
//
//   S = s·Q·Kᵀ [+ mask] (causal: S_ij = −∞ for keys j the query cannot see)   Q: n_q x d, K: n_k x d
//   W = softmax_row(S)                            n_q x n_k
//   O = W·V                                       V: n_k x d_v, O: n_q x d_v
//
// Computed in blocks of rows with two GEMMs per block (S_b = (s·Q_b)·Kᵀ, O_b = W_b·V), so the
// only n_k-wide buffer is one row block; causal blocks only touch the keys their last row sees.
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
  check_head_dim(fn, "Q", shape(n_q, d), d, "head dim d");
  check_head_dim(fn, "V", shape(V.rows(), d_v), d_v, "value dim d_v");
  check_shape(fn, "K", K, n_k, d, "n_k x d, d = Q.cols()");
  check_shape(fn, "V", V, n_k, d_v, "n_k x d_v, n_k = K.rows()");
  check_shape(fn, "O", O, n_q, d_v, "n_q x d_v");
  resolve_scale<T>(fn, o, d);
  check_finite(fn, "Q", Q);
  check_finite(fn, "K", K);
  check_finite(fn, "V", V);
  check_no_overlap(fn, "O", O, "Q", Q);
  check_no_overlap(fn, "O", O, "K", K);
  check_no_overlap(fn, "O", O, "V", V);
}

// A score mask must match n_q x n_k (or be one shared row), set at most one of keep/add,
// and have no NaN or +inf additive entries.
template <class T>
void check_score_mask(const char* fn, const ScoreMask<T>& m, index_t n_q, index_t n_k) {
  if (m.empty()) return;
  if (m.keep && m.add) fail(fn, "argument 'mask' sets both a boolean and an additive mask; pass one");
  const bool shared_row = m.row_stride == 0;
  if (m.cols != n_k || (shared_row ? m.rows != 1 && m.rows != n_q : m.rows != n_q))
    fail(fn, "argument 'mask' has shape ", shape(m.rows, m.cols), ", expected ", shape(n_q, n_k),
         " (n_q x n_k) or ", shape(1, n_k), " (one row shared by every query)");
  if (!shared_row && m.row_stride < m.cols)
    fail(fn, "argument 'mask' (", shape(m.rows, m.cols), ") has row_stride ", m.row_stride,
         " < cols: its rows overlap");
  if (m.add) {
    const index_t rows = shared_row ? 1 : m.rows;
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < m.cols; ++j) {
        const T a = m.add[i * m.row_stride + j];
        if (std::isnan(a) || a == std::numeric_limits<T>::infinity())
          fail(fn, "argument 'mask' (additive, ", shape(m.rows, m.cols), ") has entry (", i, ", ", j, ") = ", a,
               "; additive entries must be finite or -inf");
      }
  }
}

template <class T>
[[noreturn]] void throw_score_overflow(const char* fn, index_t row, const ConstMatrixRef<T>& Q,
                                       const ConstMatrixRef<T>& K, double scale) {
  fail(fn, "the scores s·Q·Kᵀ of row ", row, " are not finite (floating-point overflow); Q ",
       shape(Q.rows(), Q.cols()), ", K ", shape(K.rows(), K.cols()), ", scale ", scale,
       ". Rescale Q and K, or compute in double");
}

// Scratch of one thread of the forward: the scores of one row block and s·Q_b.
template <class T>
struct ForwardWorkspace {
  Matrix<T> S, Qs;
  ForwardWorkspace(index_t n_q, index_t n_k, index_t d)
      : S(std::min(ForwardConfig::row_block, n_q), n_k), Qs(std::min(ForwardConfig::row_block, n_q), d) {}
};

// One row block of the forward: rows [i0, i0 + rows) of O, and sink(i, w, len, lse) for each
// row in ascending order as soon as its softmax is done, before O_b is computed (w: W_i[0, len);
// every W_ij with j ≥ len is 0; a fully masked row hands len 0). Arguments checked by
// the caller. Touches only O's rows of the block and the workspace: blocks can run in parallel.
template <class T, class Sink>
void forward_block(const char* fn, const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                   MatrixRef<T>& O, const ScoreMask<T>& mask, const AttentionOptions& options, T scale, index_t i0,
                   index_t rows, ForwardWorkspace<T>& ws, Sink&& sink) {
  const index_t n_q = Q.rows(), n_k = K.rows();
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const index_t kv = visible_keys(i0 + rows - 1, n_q, n_k, options);  // keys any row of the block can see
  if (kv == 0) {  // no keys at all: every row is fully masked
    O.middleRows(i0, rows).setZero();
    for (index_t r = 0; r < rows; ++r) sink(i0 + r, ws.S.data(), index_t{0}, kNegInf);
    return;
  }
  auto Sb = ws.S.topLeftCorner(rows, kv);
  // S_b = (s·Q_b)·K_{0:kv}ᵀ
  ws.Qs.topRows(rows).noalias() = scale * Q.middleRows(i0, rows);
  Sb.noalias() = ws.Qs.topRows(rows) * K.topRows(kv).transpose();
  // W_b = softmax_row(S_b [+ mask]); keys j ≥ len and masked keys exactly zero
  for (index_t r = 0; r < rows; ++r) {
    const index_t i = i0 + r, len = visible_keys(i, n_q, n_k, options);
    auto s_row = Sb.row(r).head(len).array();
    T* s = Sb.row(r).data();
    index_t open = len;  // keys the query attends to
    if (!mask.empty()) {
      open = 0;
      for (index_t j = 0; j < len; ++j) {
        const bool v = mask.visible(i, j);
        s[j] = v ? s[j] + mask.bias(i, j) : kNegInf;
        open += v;
      }
    }
    Sb.row(r).tail(kv - len).setZero();
    if (open == 0) {  // fully masked row: zero weights, zero output; handed with len 0
      Sb.row(r).head(len).setZero();
      sink(i, s, index_t{0}, kNegInf);
      continue;
    }
    const T m = s_row.maxCoeff();
    s_row = (s_row - m).exp();
    // The vectorised exp returns ~1e-39, not 0, for −inf: masked keys are zeroed explicitly.
    if (!mask.empty())
      for (index_t j = 0; j < len; ++j)
        if (!mask.visible(i, j)) s[j] = T(0);
    const T l = s_row.sum();
    // Finite inputs can still overflow s·Q·Kᵀ (to ±inf, or NaN from inf − inf): a non-finite
    // max or sum catches every case (a NaN anywhere in the row makes the sum NaN).
    if (!std::isfinite(m) || !std::isfinite(l)) throw_score_overflow(fn, i, Q, K, scale);
    s_row *= T(1) / l;
    // Handed on at once, while the row is still in L1 (the block's scores are 4 MiB at
    // n_k = 8192: by the end of the block the first rows are out of L2); the sink needs W_i
    // only, not O_i.
    sink(i, s, len, m + std::log(l));
  }
  // O_b = W_b·V_{0:kv}
  O.middleRows(i0, rows).noalias() = Sb * V.topRows(kv);
}

template <class T, class Recorder>
void attention_forward(const ConstMatrixRef<T>& Q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                       MatrixRef<T> O, Recorder& recorder, const AttentionOptions& options,
                       const ScoreMask<T>& mask) {
  constexpr const char* fn = "attention_forward";
  check_forward_args<T>(fn, Q, K, V, O, options);
  check_score_mask(fn, mask, Q.rows(), K.rows());
  const index_t n_q = Q.rows(), d = Q.cols(), n_k = K.rows();
  const T scale = static_cast<T>(resolve_scale<T>(fn, options, d));
  constexpr index_t Br = ForwardConfig::row_block;

  recorder.begin(n_q, n_k);
  ForwardWorkspace<T> ws(n_q, n_k, d);
  for (index_t i0 = 0; i0 < n_q; i0 += Br)
    forward_block<T>(fn, Q, K, V, O, mask, options, scale, i0, std::min(Br, n_q - i0), ws,
                     [&](index_t i, const T* w, index_t len, T lse) { recorder.record(i, w, len, lse); });
  recorder.end();
}

}  // namespace detail

/// Dense attention forward: O = softmax(s·Q·Kᵀ [+ causal mask] [+ score mask])·V, handing
/// each finished row of W to `recorder` (DenseWeights, LogSumExp, SusMask, NoRecord,
/// recorders(a, b), or your own; see recorders.hpp).
///   Q: n_q x d, K: n_k x d, V: n_k x d_v — row-major, finite.
///   O: n_q x d_v, caller-owned, overwritten. Must not overlap Q, K or V.
///   mask (optional): a ScoreMask (bool_mask / additive_mask), n_q x n_k or one shared row.
/// A query that sees no key (causal alignment, or masked out) gets a zero row of O and W and
/// log-sum-exp −inf. Throws sus::Error on bad shapes, non-finite input, or a bad mask.
template <class Recorder>
void attention_forward(const ConstMatrixRef<float>& Q, const ConstMatrixRef<float>& K,
                       const ConstMatrixRef<float>& V, MatrixRef<float> O, Recorder&& recorder,
                       const AttentionOptions& options = {}, const ScoreMask<float>& mask = {}) {
  detail::attention_forward<float>(Q, K, V, O, recorder, options, mask);
}
template <class Recorder>
void attention_forward(const ConstMatrixRef<double>& Q, const ConstMatrixRef<double>& K,
                       const ConstMatrixRef<double>& V, MatrixRef<double> O, Recorder&& recorder,
                       const AttentionOptions& options = {}, const ScoreMask<double>& mask = {}) {
  detail::attention_forward<double>(Q, K, V, O, recorder, options, mask);
}

}  // namespace sus
