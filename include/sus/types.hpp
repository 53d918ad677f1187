// sus — matrix types and options shared by the forward and the backward.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>

#include <Eigen/Core>

#include "error.hpp"

namespace sus {

/// Row-major dense matrix: the layout of every operand (Q: n_q x d, K: n_k x d, ...).
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Read-only view of any row-major matrix with unit inner stride (a Matrix, a Map, a block of rows).
template <class T>
using ConstMatrixRef = Eigen::Ref<const Matrix<T>>;
/// Writable view; the caller owns the memory and sizes it (outputs are never resized).
template <class T>
using MatrixRef = Eigen::Ref<Matrix<T>>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// Options shared by attention_forward and both backwards.
struct AttentionOptions {
  /// Softmax scale s in S = s·Q·Kᵀ. Unset: 1/√d. Must be finite.
  std::optional<double> scale;
  /// Causal mask: query i sees keys j ≤ i (requires n_q = n_k). The forward applies it; the
  /// backwards check that the mask / W respect it.
  bool causal = false;
  /// Backward only: false (default) overwrites dQ, dK, dV; true adds the gradient to them.
  bool accumulate = false;
};

namespace detail {

inline double resolve_scale(const char* fn, const AttentionOptions& o, index_t d) {
  if (o.scale) {
    if (!std::isfinite(*o.scale)) fail(fn, "options.scale = ", *o.scale, " must be finite");
    return *o.scale;
  }
  return 1.0 / std::sqrt(static_cast<double>(d));
}

template <class M>
void check_shape(const char* fn, const char* arg, const M& m, index_t rows, index_t cols, const char* expected) {
  if (m.rows() != rows || m.cols() != cols)
    fail(fn, "argument '", arg, "' has shape ", shape(m.rows(), m.cols()), ", expected ", shape(rows, cols), " (",
         expected, ")");
}

template <class M>
void check_finite(const char* fn, const char* arg, const M& m) {
  // Fast path, vectorised: x·0 is 0 for finite x and NaN for ±inf or NaN, so the sum of
  // x·0 is NaN exactly when some entry is not finite. The slow scan only builds the message.
  using T = typename M::Scalar;
  if (std::isnan(static_cast<double>((m.array() * T(0)).sum()))) {
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j)
        if (!std::isfinite(static_cast<double>(m(i, j))))
          fail(fn, "argument '", arg, "' (", shape(m.rows(), m.cols()), ") has a non-finite entry at (", i, ", ", j,
               "): ", m(i, j));
  }
}

// Outputs must not share memory with inputs (or each other): the kernels write while reading.
// Row-major with unit inner stride: a view spans [data, data + (rows − 1)·outerStride + cols).
template <class A, class B>
void check_no_overlap(const char* fn, const char* out, const A& a, const char* in, const B& b) {
  if (a.size() == 0 || b.size() == 0) return;
  // Compared as integers: relational operators on pointers into different objects are unspecified.
  const auto a0 = reinterpret_cast<std::uintptr_t>(a.data());
  const auto a1 = reinterpret_cast<std::uintptr_t>(a.data() + (a.rows() - 1) * a.outerStride() + a.cols());
  const auto b0 = reinterpret_cast<std::uintptr_t>(b.data());
  const auto b1 = reinterpret_cast<std::uintptr_t>(b.data() + (b.rows() - 1) * b.outerStride() + b.cols());
  if (a0 < b1 && b0 < a1) fail(fn, "output '", out, "' overlaps argument '", in, "' in memory");
}

}  // namespace detail
}  // namespace sus
