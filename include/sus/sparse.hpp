// sus — the sparse primitives of the SUS backward, each O(nnz·d):
//   SDDMM             out_p = A_i · B_j          for every stored (i, j) = entry p of the pattern
//   SpMM              C     = α·M·B              M: the pattern with values (rows x cols)
//   transposed SpMM   C     = α·Mᵀ·B             through the transposed pattern: each output row
//                                                is one gather-sum, so no atomics and a fixed order
#pragma once

#include <cstring>
#include <type_traits>

#include "csr.hpp"
#include "error.hpp"
#include "types.hpp"

namespace sus {
namespace detail {
template <class T>
struct type_identity {
  using type = T;
};
// Keeps T out of deduction so an Eigen::Matrix converts to the Ref parameter.
template <class T>
using nodeduce_t = typename type_identity<T>::type;


// Calls f(dk, dv) with the row lengths of a kernel: std::integral_constant<index_t, D> for
// both when d = d_v is one of the common head dims 64 and 128, else the run-time d and d_v.
// Kernels pass them straight to dot and axpy, so the compiler unrolls those loops for the
// common cases; the operations, and so the bits, are the same either way.
template <class F>
SUS_ALWAYS_INLINE void with_head_dims(index_t d, index_t d_v, F&& f) {
  using D64 = std::integral_constant<index_t, 64>;
  using D128 = std::integral_constant<index_t, 128>;
  if (d == d_v && d == 64) f(D64{}, D64{});
  else if (d == d_v && d == 128) f(D128{}, D128{});
  else f(d, d_v);
}

// Dot product with a fixed summation order: 64 bytes of lanes, then a fixed pairwise tree.
// Unlike Eigen's dot, the order does not depend on the pointers' alignment, so every kernel
// that uses it gives the same bits for the same row, whatever the layout or thread split.
// This is the order's definition; dot below computes the same sums, in registers.
template <class T>
SUS_ALWAYS_INLINE T dot_portable(const T* a, const T* b, index_t n) {
  constexpr int L = 64 / sizeof(T);
  T acc[L] = {};
  const index_t full = n - n % L;
  for (index_t k = 0; k < full; k += L)
    for (int l = 0; l < L; ++l) acc[l] += a[k + l] * b[k + l];
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  T tail = 0;
  for (index_t k = full; k < n; ++k) tail += a[k] * b[k];
  return acc[0] + tail;
}

#if defined(SUS_VECTOR_EXTENSIONS)
// The lanes as compiler vectors (GCC/Clang vector extensions: no intrinsics, any target) of the
// target's register width (SUS_VECTOR_BYTES). A lane group of dot_portable (64 bytes) is then
// P = 64 / width vectors, lane q·NL + r of the group being lane r of vector q. Each halving
// step of the tree is one vector add: of two vectors while the group spans several, then of
// the two halves of the last one (__builtin_shufflevector), so the accumulator never goes
// through memory. Lane l of every step is the portable loop's acc[l], so the bits are equal
// (tested), whatever the width.
constexpr int kVectorBytes = SUS_VECTOR_BYTES;
static_assert(64 % kVectorBytes == 0, "SUS_VECTOR_BYTES must divide the 64-byte lane group");

// The tree of one vector's lanes: lane l += lane l + half, halving to one lane. (By reference:
// a 64-byte vector passed by value draws GCC's -Wpsabi ABI note on targets without AVX-512.)
SUS_ALWAYS_INLINE float lane_tree(const f32x2& x) { return x[0] + x[1]; }
SUS_ALWAYS_INLINE float lane_tree(const f32x4& x) {
  const f32x2 h = __builtin_shufflevector(x, x, 0, 1) + __builtin_shufflevector(x, x, 2, 3);
  return lane_tree(h);
}
SUS_ALWAYS_INLINE float lane_tree(const f32x8& x) {
  const f32x4 h = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
  return lane_tree(h);
}
SUS_ALWAYS_INLINE float lane_tree(const f32x16& x) {
  const f32x8 h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  return lane_tree(h);
}
SUS_ALWAYS_INLINE double lane_tree(const f64x2& x) { return x[0] + x[1]; }
SUS_ALWAYS_INLINE double lane_tree(const f64x4& x) {
  const f64x2 h = __builtin_shufflevector(x, x, 0, 1) + __builtin_shufflevector(x, x, 2, 3);
  return lane_tree(h);
}
SUS_ALWAYS_INLINE double lane_tree(const f64x8& x) {
  const f64x4 h = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
  return lane_tree(h);
}

template <class T>
struct Lanes {
  typedef T native __attribute__((vector_size(kVectorBytes)));
  static constexpr int NL = kVectorBytes / int(sizeof(T));  // lanes per native vector
  static constexpr int P = 64 / kVectorBytes;               // native vectors per lane group
  // The lane tree of a group held as acc[0 .. P) (acc is overwritten).
  static SUS_ALWAYS_INLINE T sum(native* acc) {
    for (int w = P / 2; w > 0; w /= 2)
      for (int q = 0; q < w; ++q) acc[q] += acc[q + w];
    return lane_tree(acc[0]);
  }
};

template <class T>
SUS_ALWAYS_INLINE T dot(const T* a, const T* b, index_t n) {
  using Ln = Lanes<T>;
  using V = typename Ln::native;
  constexpr int L = 64 / sizeof(T);
  V acc[Ln::P] = {};
  const index_t full = n - n % L;
  for (index_t k = 0; k < full; k += L)
    for (int q = 0; q < Ln::P; ++q) {
      V x, y;
      std::memcpy(&x, a + k + q * Ln::NL, sizeof(V));  // unaligned loads
      std::memcpy(&y, b + k + q * Ln::NL, sizeof(V));
      acc[q] += x * y;
    }
  T tail = 0;
  for (index_t k = full; k < n; ++k) tail += a[k] * b[k];
  return Ln::sum(acc) + tail;
}
#else
template <class T>
SUS_ALWAYS_INLINE T dot(const T* a, const T* b, index_t n) {
  return dot_portable(a, b, n);
}
#endif

// y += alpha·x (each element is one multiply-add: order-free).
template <class T>
SUS_ALWAYS_INLINE void axpy(T alpha, const T* x, T* y, index_t n) {
  for (index_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}
}  // namespace detail

namespace sparse {

/// SDDMM: out[p] = A.row(i) · B.row(col_indices[p]) for each stored entry p of row i.
///   pattern: rows x cols (values unused); A: rows x k; B: cols x k; out: pattern.nnz() entries.
template <class T>
void sddmm(const Csr<T>& pattern, const detail::nodeduce_t<ConstMatrixRef<T>>& A,
           const detail::nodeduce_t<ConstMatrixRef<T>>& B, T* out) {
  SUS_ASSERT(A.rows() == pattern.rows && B.rows() == pattern.cols && A.cols() == B.cols());
  for (index_t i = 0; i < pattern.rows; ++i)
    for (index_t p = pattern.row_offsets[i]; p < pattern.row_offsets[i + 1]; ++p)
      out[p] = detail::dot(A.row(i).data(), B.row(pattern.col_indices[p]).data(), A.cols());
}

/// SpMM: C = alpha·M·B (accumulate: C += alpha·M·B), M = pattern with `values` (nnz entries).
///   B: cols x k; C: rows x k.
template <class T>
void spmm(const Csr<T>& pattern, const T* values, const detail::nodeduce_t<ConstMatrixRef<T>>& B,
          detail::nodeduce_t<MatrixRef<T>> C, T alpha, bool accumulate) {
  SUS_ASSERT(B.rows() == pattern.cols && C.rows() == pattern.rows && C.cols() == B.cols());
  Eigen::Matrix<T, 1, Eigen::Dynamic> acc(B.cols());
  for (index_t i = 0; i < pattern.rows; ++i) {
    acc.setZero();
    for (index_t p = pattern.row_offsets[i]; p < pattern.row_offsets[i + 1]; ++p)
      detail::axpy(values[p], B.row(pattern.col_indices[p]).data(), acc.data(), B.cols());
    if (accumulate) C.row(i).noalias() += alpha * acc;
    else C.row(i).noalias() = alpha * acc;
  }
}

/// The transposed pattern of a rows x cols CSR, with the map back to the original entries.
///   offsets: cols + 1 entries; rows: nnz entries (original row indices, ascending within each
///   transposed row); perm: nnz entries, perm[q] = original position of transposed entry q.
struct TransposedPattern {
  index_t rows = 0;  // = original cols
  index_t cols = 0;  // = original rows
  detail::Transposed t;

  template <class T>
  explicit TransposedPattern(const Csr<T>& pattern) : rows(pattern.cols), cols(pattern.rows) {
    detail::transpose_pattern(pattern.rows, pattern.cols, pattern.row_offsets.data(), pattern.col_indices.data(), t);
  }
};

/// Transposed SpMM: C = alpha·Mᵀ·B (accumulate: C += ...), M = the original pattern with
/// `values` (indexed by original position). B: original rows x k; C: original cols x k.
/// Each row of C sums its entries in ascending original-row order: deterministic.
template <class T>
void spmm_transposed(const TransposedPattern& tp, const T* values, const detail::nodeduce_t<ConstMatrixRef<T>>& B,
                     detail::nodeduce_t<MatrixRef<T>> C, T alpha, bool accumulate) {
  SUS_ASSERT(B.rows() == tp.cols && C.rows() == tp.rows && C.cols() == B.cols());
  const auto& off = tp.t.t_offsets;
  Eigen::Matrix<T, 1, Eigen::Dynamic> acc(B.cols());
  for (index_t j = 0; j < tp.rows; ++j) {
    acc.setZero();
    for (index_t q = off[j]; q < off[j + 1]; ++q)
      detail::axpy(values[tp.t.perm[q]], B.row(tp.t.t_rows[q]).data(), acc.data(), B.cols());
    if (accumulate) C.row(j).noalias() += alpha * acc;
    else C.row(j).noalias() = alpha * acc;
  }
}

}  // namespace sparse
}  // namespace sus
