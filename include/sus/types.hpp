// sus — matrix types and options shared by the forward and the backward.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include <Eigen/Core>

#include "error.hpp"

// Forces inlining where the compiler supports it: the sparse kernels call dot and axpy once
// per kept entry, on rows of 64 or 128 values, and inlined with a constant length each becomes
// a few unrolled vector instructions; the sampler's lane sums and products run once per chunk
// of 16 weights.
#if defined(__GNUC__) || defined(__clang__)
#define SUS_ALWAYS_INLINE inline __attribute__((always_inline))
#define SUS_NOINLINE __attribute__((noinline))
#else
#define SUS_ALWAYS_INLINE inline
#define SUS_NOINLINE
#endif

// GCC >= 12 and Clang: the kernels' fixed-order lane arithmetic is written with vector
// extensions (vector_size types, __builtin_shufflevector, __builtin_convertvector), which the
// compiler maps onto the target's widest registers. Other compilers get scalar loops with the
// same order of operations (same bits; each pair is tested).
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SUS_VECTOR_EXTENSIONS 1
// The target's vector register width in bytes, which the kernels' compiler vectors use: 64
// with AVX-512, 32 with AVX, else 16 (SSE2, NEON). A compiler vector wider than the target's
// registers lives on the stack, each operation a store and a reload of its parts, which made
// the sparse backward and the sampler slower. Measured: docs/method.md (SUS backprop: the
// register width).
#if defined(__AVX512F__)
#define SUS_VECTOR_BYTES 64
#elif defined(__AVX__)
#define SUS_VECTOR_BYTES 32
#else
#define SUS_VECTOR_BYTES 16
#endif
#endif

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

/// Where the causal diagonal sits when n_q ≠ n_k (they agree when n_q = n_k).
///   top_left:     query i sees keys j ≤ i                  (PyTorch's is_causal, tril(ones(n_q, n_k)))
///   bottom_right: query i sees keys j ≤ i + n_k − n_q      (FlashAttention ≥ 2.1: the last query
///                 sees every key; with n_q > n_k the first n_q − n_k queries see none)
enum class CausalAlignment { top_left, bottom_right };

inline const char* to_string(CausalAlignment a) { return a == CausalAlignment::top_left ? "top_left" : "bottom_right"; }

/// Options shared by attention_forward and both backwards.
struct AttentionOptions {
  /// Softmax scale s in S = s·Q·Kᵀ. Unset: 1/√d. Must be finite.
  std::optional<double> scale;
  /// Causal mask, aligned as `alignment` says. The forward applies it; the backwards check
  /// that the mask / W respect it. A query that sees no key is a fully masked row: zero
  /// output, zero gradient.
  bool causal = false;
  CausalAlignment alignment = CausalAlignment::top_left;
  /// Backward only: false (default) overwrites dQ, dK, dV; true adds the gradient to them.
  bool accumulate = false;
};

/// An optional mask on the scores of one head, n_q x n_k, read as mask[i·row_stride + j]:
///   boolean:  `keep` — true: query i attends to key j; false: W_ij = 0 exactly.
///   additive: `add`  — S_ij = s·Q_i·K_j + add_ij; −inf entries are masked (W_ij = 0 exactly);
///             NaN and +inf are rejected.
/// row_stride may be 0: one row shared by every query (a key-padding mask). Rows whose keys
/// are all masked give zero output and zero gradient. At most one of keep/add is set; neither
/// means no mask. The memory is the caller's and is only read.
template <class T>
struct ScoreMask {
  const bool* keep = nullptr;
  const T* add = nullptr;
  index_t rows = 0, cols = 0, row_stride = 0;

  bool empty() const { return keep == nullptr && add == nullptr; }
  /// Whether key j is visible to query i (additive: add_ij ≠ −inf).
  bool visible(index_t i, index_t j) const {
    if (keep) return keep[i * row_stride + j];
    if (add) return add[i * row_stride + j] != -std::numeric_limits<T>::infinity();
    return true;
  }
  T bias(index_t i, index_t j) const { return add ? add[i * row_stride + j] : T(0); }
};

/// A boolean mask over a row-major n_q x n_k array (row_stride = n_k), or one row of n_k
/// entries shared by every query (key padding: pass rows = 1).
template <class T>
ScoreMask<T> bool_mask(const bool* keep, index_t rows, index_t cols) {
  return {keep, nullptr, rows, cols, rows == 1 ? 0 : cols};
}
/// An additive mask over a row-major n_q x n_k array, or one shared row (rows = 1).
template <class T>
ScoreMask<T> additive_mask(const T* add, index_t rows, index_t cols) {
  return {nullptr, add, rows, cols, rows == 1 ? 0 : cols};
}
/// Eigen conveniences: a row-major matrix (n_q x n_k, or 1 x n_k shared by every query).
template <class T>
ScoreMask<T> bool_mask(const Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& keep) {
  return {keep.data(), nullptr, keep.rows(), keep.cols(), keep.rows() == 1 ? 0 : keep.cols()};
}
template <class T>
ScoreMask<T> additive_mask(const Matrix<T>& add) {
  return additive_mask<T>(add.data(), add.rows(), add.cols());
}

namespace detail {

#if defined(SUS_VECTOR_EXTENSIONS)
// Compiler vectors of fixed widths, shared by the backward's lanes (sparse.hpp) and the
// sampler's groups of 8 doubles (sampler.hpp).
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x2 __attribute__((vector_size(8)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x2 __attribute__((vector_size(16)));
#endif

// Keys visible to query i: j < visible_keys(i). Monotone in i; n_k when not causal.
inline index_t visible_keys(index_t i, index_t n_q, index_t n_k, const AttentionOptions& o) {
  if (!o.causal) return n_k;
  const index_t last = o.alignment == CausalAlignment::top_left ? i : i + n_k - n_q;  // last visible key
  return std::min(n_k, std::max<index_t>(0, last + 1));
}

// The largest head dim d or d_v: a row of 2^32 values is already 16 GiB, and the kernels count
// rows of K, V, dK, dV in bytes (4·(d + d_v)·sizeof(T)). Checked even where no row exists (S = 0).
constexpr index_t max_head_dim = index_t(1) << 32;

inline void check_head_dim(const char* fn, const char* arg, const std::string& arg_shape, index_t dim,
                           const char* what) {
  if (dim < 1) fail(fn, "argument '", arg, "' has shape ", arg_shape, ": ", what, " must be >= 1");
  if (dim > max_head_dim) fail(fn, "argument '", arg, "' has shape ", arg_shape, ": ", what, " must be <= ", max_head_dim);
}

// The softmax scale the kernels use in T: options.scale must be finite, in T too (1e39 is a
// finite double but an infinite float, and inf·0 would make NaN gradients).
template <class T>
double resolve_scale(const char* fn, const AttentionOptions& o, index_t d) {
  if (o.scale) {
    if (!std::isfinite(*o.scale)) fail(fn, "options.scale = ", *o.scale, " must be finite");
    if (!std::isfinite(static_cast<T>(*o.scale)))
      fail(fn, "options.scale = ", *o.scale, " must be finite in ", sizeof(T) == 4 ? "float" : "double",
           " (at most ", std::numeric_limits<T>::max(), " in magnitude)");
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

// Whether every entry of a row-major matrix (or array) is finite, vectorised: x·0 is 0 for
// finite x and NaN for ±inf or NaN, so the sum of x·0 is NaN exactly when some entry is not
// finite. Strided views (a head of a fused QKV buffer) are summed row by row: each row is
// contiguous and vectorises; Eigen's reduction over the whole strided view does not as well.
template <class M>
bool all_finite(const M& m) {
  using T = typename M::Scalar;
  T probe = T(0);
  if (m.rows() <= 1 || m.outerStride() == m.cols()) {
    probe = (m.array() * T(0)).sum();
  } else {
    for (index_t i = 0; i < m.rows(); ++i) probe += (m.row(i).array() * T(0)).sum();
  }
  return !std::isnan(static_cast<double>(probe));
}

// The largest |entry| of a row-major matrix (0 if empty): NaN if an entry is NaN, inf if one
// is ±inf and none is NaN. A scalar loop: magnitude_bound is the fast path.
template <class M>
double max_abs(const M& m) {
  double top = 0;
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t j = 0; j < m.cols(); ++j) {
      const double a = std::abs(static_cast<double>(m(i, j)));
      if (std::isnan(a)) return a;
      top = std::max(top, a);
    }
  return top;
}

// An upper bound on every |entry| of a row-major matrix: its Frobenius norm, in one vectorised
// pass like all_finite (a sum of squares is NaN or inf when an entry is). Not finite also when
// the squares overflow T (entries beyond ~sqrt(T's largest / size)): then max_abs, exactly.
template <class M>
double magnitude_bound(const M& m) {
  using T = typename M::Scalar;
  T squares = T(0);
  if (m.rows() <= 1 || m.outerStride() == m.cols()) {
    squares = m.array().square().sum();
  } else {
    for (index_t i = 0; i < m.rows(); ++i) squares += m.row(i).array().square().sum();
  }
  const double bound = std::sqrt(static_cast<double>(squares));
  return std::isfinite(bound) ? bound : max_abs(m);
}

template <class M>
void check_finite(const char* fn, const char* arg, const M& m) {
  // Fast path all_finite; the slow scan only builds the message.
  if (!all_finite(m)) {
    for (index_t i = 0; i < m.rows(); ++i)
      for (index_t j = 0; j < m.cols(); ++j)
        if (!std::isfinite(static_cast<double>(m(i, j))))
          fail(fn, "argument '", arg, "' (", shape(m.rows(), m.cols()), ") has a non-finite entry at (", i, ", ", j,
               "): ", m(i, j));
  }
}

// check_finite that also returns magnitude_bound(m), in the same one pass when every entry is
// finite.
template <class M>
double check_finite_bound(const char* fn, const char* arg, const M& m) {
  const double bound = magnitude_bound(m);
  if (!std::isfinite(bound)) check_finite(fn, arg, m);  // names the entry
  return bound;
}

// A row-major matrix in memory, in bytes: `rows` runs of `width` bytes, `stride` bytes apart,
// occupying [start, end).
struct RowSpan {
  std::uintptr_t start, end;
  index_t rows, width, stride;
};

// Whether two row spans share a byte. Exact when their strides agree (column blocks of one
// packed buffer, such as dQ, dK, dV in an [n, 3·d] gradient); otherwise any overlap of their
// address ranges counts.
inline bool rows_overlap(const RowSpan& a, const RowSpan& b) {
  if (a.start >= b.end || b.start >= a.end) return false;
  if (a.stride != b.stride || a.width > a.stride || b.width > b.stride) return true;
  // Row s1 of a meets row s2 of b iff δ − t·R ∈ (−width_b, width_a), t = s1 − s2, δ = b − a.
  const index_t R = a.stride;
  const index_t delta = b.start >= a.start ? static_cast<index_t>(b.start - a.start)
                                           : -static_cast<index_t>(a.start - b.start);
  auto floor_div = [](index_t x, index_t y) { return x >= 0 ? x / y : -((-x + y - 1) / y); };
  const index_t t_lo = std::max(-(b.rows - 1), floor_div(delta - a.width, R) + 1);
  const index_t t_hi = std::min(a.rows - 1, -floor_div(-(delta + b.width), R) - 1);
  return t_lo <= t_hi;
}

template <class M>
RowSpan row_span(const M& m) {
  using T = typename M::Scalar;
  const index_t sz = sizeof(T), width = m.cols() * sz, stride = m.rows() > 1 ? m.outerStride() * sz : width;
  const auto start = reinterpret_cast<std::uintptr_t>(m.data());
  return {start, start + static_cast<std::uintptr_t>((m.rows() - 1) * stride + width), m.rows(), width, stride};
}

// Outputs must not share memory with inputs (or each other): the kernels write while reading.
// Row-major with unit inner stride; exact for column blocks of one packed buffer.
template <class A, class B>
void check_no_overlap(const char* fn, const char* out, const A& a, const char* in, const B& b) {
  if (a.size() == 0 || b.size() == 0) return;
  if (rows_overlap(row_span(a), row_span(b))) fail(fn, "output '", out, "' overlaps argument '", in, "' in memory");
}

}  // namespace detail
}  // namespace sus
