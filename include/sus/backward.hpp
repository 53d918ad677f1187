// sus — attention backward: exact (dense, GEMM) and SUS (sparse, O(nnz·d)).
//
// The forward was  S = s·Q·Kᵀ,  W = softmax_row(S),  O = W·V.  Given dO, in reverse order:
//   3. O = W·V        ->  dV = Wᵀ·dO,   dP = dO·Vᵀ
//   2. W = softmax(S) ->  dS_ij = W_ij (dP_ij − D_i),  D_i = Σ_j W_ij dP_ij = dO_i·O_i
//   1. S = s·Q·Kᵀ     ->  dQ = s·dS·K,  dK = s·dSᵀ·Q
// SUS replaces W by the sampled W̃ (the CSR mask) wherever W appears explicitly (in dV and
// dS); D_i stays exact, from O. Every gradient is linear in W̃ and E[W̃] = W: unbiased.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "csr.hpp"
#include "error.hpp"
#include "sampler.hpp"
#include "sparse.hpp"
#include "types.hpp"

namespace sus {
namespace detail {

struct SparseBackwardConfig {
  // Kept entries ahead of the current one whose K, V, dK, dV rows are prefetched: the rows
  // are gathered at random, and their cache misses, not the arithmetic, bound the kernel.
  static constexpr index_t prefetch_distance = 4;
  static_assert(prefetch_distance >= 0, "SparseBackwardConfig::prefetch_distance must be >= 0");
  // Query rows per rows-pass task of the two-pass threaded backward.
  static constexpr index_t task_rows = 256;
  static_assert(task_rows > 0, "SparseBackwardConfig::task_rows must be positive");
  // Key blocks of the fused kernel. Every kept entry reads 16 cache lines at d = 64 (K_j, V_j,
  // gK_j, gV_j), gathered at random, so where those rows come from sets the kernel's speed.
  // A head whose rows (n_k·(d + d_v)·2 values) fit in one block runs in place, in one pass
  // over the query rows; a larger one, or a strided one, runs by key blocks
  // (sparse_backward_blocked) of at most key_block_bytes() of packed rows each, so that a
  // block stays in a core's L2 cache while every query row adds its entries of the block.
  // key_block_bytes() is l2_fraction of the L2 cache the OS reports (sysconf), else
  // default_block_bytes. Measured: docs/method.md (SUS backprop: block sizes by key blocks).
  static constexpr double l2_fraction = 0.75;
  static constexpr index_t default_block_bytes = index_t(768) << 10;
  static constexpr index_t min_block_bytes = index_t(256) << 10;
  static constexpr index_t max_block_bytes = index_t(8) << 20;
  static_assert(default_block_bytes >= min_block_bytes && default_block_bytes <= max_block_bytes,
                "SparseBackwardConfig::default_block_bytes must lie in [min_block_bytes, max_block_bytes]");
  // Kept entries of a row whose dS are computed before their axpys (fused kernel).
  static constexpr index_t chunk = 64;
  static_assert(chunk > 0, "SparseBackwardConfig::chunk must be positive");
  // A single head that does not fit one key block runs the split passes (sparse_backward_split:
  // the rows pass, then the keys pass over key ranges whose gK, gV take at most key_range_bytes
  // of workspace) instead of the key-blocked fused kernel when its K and V rows are back to
  // back and the key blocks are smaller than split_below_block_bytes (a small L2): which of
  // the two wins depends on the L2. Every key block visits every query row (Q_i, dO_i and the
  // dQ accumulator, an O(n²/block) term), which the split does not pay; the split instead
  // gathers K_j, V_j and gK_j, gV_j from beyond L2. The split won with 1 MiB of L2 per core
  // and lost with 2 MiB. Measured: docs/method.md (SUS backprop: the split passes against the
  // key-blocked kernel; key_range_bytes too).
  static constexpr index_t split_below_block_bytes = index_t(1) << 20;
  // The key-blocked kernel copies strided Q and dO rows back to back first when the keys take
  // more than copy_rows_min_blocks blocks. Measured: docs/method.md (SUS backprop: strided Q
  // and dO).
  static constexpr index_t copy_rows_min_blocks = 2;
  static constexpr index_t key_range_bytes = index_t(4) << 20;
  static_assert(key_range_bytes > 0, "SparseBackwardConfig::key_range_bytes must be positive");
};

// Hint the cache to load [p, p + bytes). A no-op where the compiler has no prefetch builtin.
inline void prefetch(const void* p, index_t bytes, bool write) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (index_t off = 0; off < bytes; off += 64) {
    if (write) __builtin_prefetch(c + off, 1, 3);
    else __builtin_prefetch(c + off, 0, 3);
  }
#else
  (void)p, (void)bytes, (void)write;
#endif
}

// Bytes of packed key rows per block of the fused sparse backward (SparseBackwardConfig):
// l2_fraction of the L2 cache where the OS reports its size, else default_block_bytes;
// clamped to [min_block_bytes, max_block_bytes]. Read once. The block size changes the
// speed only, never the bits.
inline index_t key_block_bytes() {
  using C = SparseBackwardConfig;
  static const index_t bytes = [] {
    long l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    const index_t b = l2 > 0 ? static_cast<index_t>(C::l2_fraction * static_cast<double>(l2)) : C::default_block_bytes;
    return std::min(C::max_block_bytes, std::max(C::min_block_bytes, b));
  }();
  return bytes;
}

// Whether a contiguous single head larger than one key block runs the split passes (key blocks
// under SparseBackwardConfig::split_below_block_bytes: a small L2) rather than the key-blocked
// kernel. Speed only: both give the same bits.
inline bool split_passes_for_large_heads() {
  return key_block_bytes() < SparseBackwardConfig::split_below_block_bytes;
}

struct DenseBackwardConfig {
  // Query rows per block. Measured: docs/method.md (One attention head).
  static constexpr index_t row_block = 128;
  static_assert(row_block > 0, "DenseBackwardConfig::row_block must be positive");
  // Keys per tile of a row block: W_t, dS_t are row_block x key_tile (128 KiB each in float),
  // so a tile's operands stay in L2 from one GEMM to the next; without tiling they are
  // row_block x n_k (4 MiB at n_k = 8192) and go round the last-level cache. Measured:
  // docs/method.md (One attention head).
  static constexpr index_t key_tile = 256;
  static_assert(key_tile > 0, "DenseBackwardConfig::key_tile must be positive");
  // Row blocks per group: a group's blocks take each key tile in turn, so K_t, V_t, dK_t, dV_t
  // (4 x 64 KiB at d = 64) are read from L2 by row_group blocks instead of one, and K, V, dK,
  // dV go round the last-level cache n_q / (row_group·row_block) times instead of
  // n_q / row_block. Each dQ_b still takes its tiles in ascending j and each dK_t, dV_t its
  // blocks in ascending i: the same sums in the same order, so the same bits for any group.
  // Measured: docs/method.md (One attention head).
  static constexpr index_t row_group = 4;
  static_assert(row_group > 0, "DenseBackwardConfig::row_group must be positive");
};

template <class T>
struct BackwardArgs {
  const ConstMatrixRef<T>& Q;
  const ConstMatrixRef<T>& K;
  const ConstMatrixRef<T>& V;
  const ConstMatrixRef<T>& O;
  const ConstMatrixRef<T>& dO;
  MatrixRef<T>& dQ;
  MatrixRef<T>& dK;
  MatrixRef<T>& dV;
};

// dQ, dK, dV computed into temporaries: written to the outputs, or added when accumulating.
template <class T>
void store_grads(const BackwardArgs<T>& a, const Matrix<T>& dQ, const Matrix<T>& dK, const Matrix<T>& dV,
                 bool accumulate) {
  if (accumulate) {
    a.dQ += dQ;
    a.dK += dK;
    a.dV += dV;
  } else {
    a.dQ = dQ;
    a.dK = dK;
    a.dV = dV;
  }
}

// Upper bounds on every |entry| of each input of a backward (magnitude_bound), from its
// finiteness checks.
struct InputMagnitudes {
  double Q = 0, K = 0, V = 0, O = 0, dO = 0;
};

// Shapes, finite inputs, outputs disjoint from inputs and from each other. Returns bounds on
// the inputs' entries (gradient_bound).
template <class T>
InputMagnitudes check_backward_args(const char* fn, const BackwardArgs<T>& a, const AttentionOptions& o) {
  const index_t n_q = a.Q.rows(), d = a.Q.cols(), n_k = a.K.rows(), d_v = a.V.cols();
  check_head_dim(fn, "Q", shape(n_q, d), d, "head dim d");
  check_head_dim(fn, "V", shape(a.V.rows(), d_v), d_v, "value dim d_v");
  check_shape(fn, "K", a.K, n_k, d, "n_k x d, d = Q.cols()");
  check_shape(fn, "V", a.V, n_k, d_v, "n_k x d_v, n_k = K.rows()");
  check_shape(fn, "O", a.O, n_q, d_v, "n_q x d_v");
  check_shape(fn, "dO", a.dO, n_q, d_v, "n_q x d_v");
  check_shape(fn, "dQ", a.dQ, n_q, d, "n_q x d, like Q");
  check_shape(fn, "dK", a.dK, n_k, d, "n_k x d, like K");
  check_shape(fn, "dV", a.dV, n_k, d_v, "n_k x d_v, like V");
  resolve_scale<T>(fn, o, d);
  InputMagnitudes m;
  m.Q = check_finite_bound(fn, "Q", a.Q);
  m.K = check_finite_bound(fn, "K", a.K);
  m.V = check_finite_bound(fn, "V", a.V);
  m.O = check_finite_bound(fn, "O", a.O);
  m.dO = check_finite_bound(fn, "dO", a.dO);
  const char* in_names[] = {"Q", "K", "V", "O", "dO"};
  const ConstMatrixRef<T>* ins[] = {&a.Q, &a.K, &a.V, &a.O, &a.dO};
  const char* out_names[] = {"dQ", "dK", "dV"};
  MatrixRef<T>* outs[] = {&a.dQ, &a.dK, &a.dV};
  for (int x = 0; x < 3; ++x) {
    for (int y = 0; y < 5; ++y) check_no_overlap(fn, out_names[x], *outs[x], in_names[y], *ins[y]);
    for (int y = x + 1; y < 3; ++y) check_no_overlap(fn, out_names[x], *outs[x], out_names[y], *outs[y]);
  }
  return m;
}

// An upper bound on every |value| a backward computes (dP, D, dS, the sums, dQ, dK, dV), in
// exact arithmetic, from bounds m on the inputs' entries: |dS_ij| ≤ |W̃_ij|·g with
// g = d_v·|dO|·(|V| + |O|), so |dQ_i| ≤ |s|·w_row·g·|K|, |dK_j| ≤ |s|·w_col·g·|Q| and
// |dV_j| ≤ w_col·|dO|. w_max: a bound on |W̃|; w_row, w_col: bounds on the row and column
// sums of |W̃| (times the heads that add into one dK, dV).
inline double gradient_bound(const InputMagnitudes& m, double s, index_t d_v, double w_max, double w_row,
                             double w_col) {
  const double g = static_cast<double>(d_v) * m.dO * (m.V + m.O);
  const double acc = w_row * g * m.K, gk = w_col * g * m.Q, gv = w_col * m.dO;
  return std::max({g, w_max * g, acc, std::abs(s) * acc, gk, std::abs(s) * gk, gv});
}

// gradient_bound for recorded softmax weights (checked: entries ≥ 0, rows summing to 1 within
// row_sum_tolerance), `heads` of them adding into one dK, dV.
template <class T>
double dense_gradient_bound(const InputMagnitudes& m, double s, index_t n_q, index_t d_v, index_t heads) {
  const double w = 1 + row_sum_tolerance<T>();
  return gradient_bound(m, s, d_v, w, w, static_cast<double>(n_q) * static_cast<double>(heads) * w);
}

// gradient_bound for a SUS mask whose |W̃| are at most w_max, with n_q rows and n_k keys: row
// sums ≤ n_k·w_max, column sums ≤ n_q·w_max (times the `heads` adding into one dK, dV).
inline double sparse_gradient_bound(const InputMagnitudes& m, double s, index_t n_q, index_t n_k, index_t d_v,
                                    double w_max, index_t heads) {
  return gradient_bound(m, s, d_v, w_max, static_cast<double>(n_k) * w_max,
                        static_cast<double>(n_q) * static_cast<double>(heads) * w_max);
}

// Whether the bound leaves room for rounding (n·ε relative) below T's largest value: then
// every output is finite and needs no look. Otherwise, and when adding into the caller's
// outputs, the caller checks them after the kernel (the bound fails only for extreme inputs,
// such as a scale near T's largest value).
template <class T>
bool gradients_surely_finite(double bound, bool accumulate) {
  return !accumulate && bound < static_cast<double>(std::numeric_limits<T>::max()) / 4;
}

[[noreturn]] inline void throw_gradient_overflow(const char* fn, const char* out, const std::string& out_shape,
                                                double s, const InputMagnitudes& m) {
  fail(fn, "output '", out, "' (", out_shape, ") is not finite (floating-point overflow; its values are ",
       "undefined): scale ", s, ", norms of Q ", m.Q, ", K ", m.K, ", V ", m.V, ", O ", m.O, ", dO ", m.dO);
}

// The outputs of a single-head backward are finite, or sus::Error (after the kernel).
template <class T>
void check_gradients(const char* fn, const BackwardArgs<T>& a, double bound, bool accumulate, double s,
                     const InputMagnitudes& m) {
  if (gradients_surely_finite<T>(bound, accumulate)) return;
  const char* names[] = {"dQ", "dK", "dV"};
  const MatrixRef<T>* outs[] = {&a.dQ, &a.dK, &a.dV};
  for (int x = 0; x < 3; ++x)
    if (!all_finite(*outs[x])) throw_gradient_overflow(fn, names[x], shape(outs[x]->rows(), outs[x]->cols()), s, m);
}

// The mask of a sparse backward: shape n_q x n_k, a valid Csr, no entry a causal query
// cannot see.
// Returns a bound on every |W̃| (Csr::validate; for gradient_bound).
template <class T>
double check_mask(const char* fn, const Csr<T>& mask, index_t n_q, index_t n_k, const AttentionOptions& o,
                  const std::string& arg = "mask") {
  if (mask.rows != n_q || mask.cols != n_k)
    fail(fn, "argument '", arg, "' has shape ", shape(mask.rows, mask.cols), ", expected ", shape(n_q, n_k),
         " (n_q x n_k)");
  double largest = 0;
  try {
    largest = mask.validate();
  } catch (const Error& e) {
    fail(fn, "argument '", arg, "' is not a valid Csr: ", e.what());
  }
  if (o.causal)
    for (index_t i = 0; i < n_q; ++i)
      if (mask.row_nnz(i) > 0 && mask.col_indices[mask.row_offsets[i + 1] - 1] >= visible_keys(i, n_q, n_k, o))
        fail(fn, "argument '", arg, "' (", shape(n_q, n_k), ") has entry (", i, ", ",
             mask.col_indices[mask.row_offsets[i + 1] - 1], ") above the diagonal but options.causal is set (",
             to_string(o.alignment), ")");
  return largest;
}

// Recorded weights of a dense backward: shape n_q x n_k, softmax rows, zero where a causal
// query sees no key.
template <class T>
void check_weights_for(const char* fn, const std::string& arg, const ConstMatrixRef<T>& W, index_t n_q, index_t n_k,
                       const AttentionOptions& o) {
  check_shape(fn, arg.c_str(), W, n_q, n_k, "n_q x n_k");
  check_weights(fn, arg.c_str(), W);
  if (o.causal)
    for (index_t i = 0; i < n_q; ++i) {
      const index_t len = visible_keys(i, n_q, n_k, o);
      if ((W.row(i).tail(n_k - len).array() != T(0)).any())
        fail(fn, "argument '", arg, "' (", shape(n_q, n_k), ") has a non-zero entry above the diagonal in row ", i,
             " but options.causal is set (", to_string(o.alignment), ")");
    }
}

// ... and, as an argument of the single-head dense backward, not overlapping any output.
template <class T>
void check_dense_weights(const char* fn, const BackwardArgs<T>& a, const ConstMatrixRef<T>& W, const AttentionOptions& o) {
  check_weights_for(fn, "W", W, a.Q.rows(), a.K.rows(), o);
  check_no_overlap(fn, "dQ", a.dQ, "W", W);
  check_no_overlap(fn, "dK", a.dK, "W", W);
  check_no_overlap(fn, "dV", a.dV, "W", W);
}

// D_i = dO_i · O_i (exact; O(n_q·d_v)).
template <class T>
Vector<T> row_dot(const ConstMatrixRef<T>& dO, const ConstMatrixRef<T>& O) {
  Vector<T> D(dO.rows());
  with_head_dims(dO.cols(), dO.cols(), [&](auto len, auto) {
    for (index_t i = 0; i < dO.rows(); ++i) D[i] = dot(dO.row(i).data(), O.row(i).data(), len);
  });
  return D;
}

// Rows of a view are `outerStride` apart; a view whose rows are not back to back (a head of a
// fused [n, 3·H·d] QKV buffer, say) is gathered at random by the sparse kernels, and each
// gathered row then costs its own TLB entry and cache lines of a wide span.
template <class M>
bool rows_contiguous(const M& m) {
  return m.rows() <= 1 || m.outerStride() == m.cols();
}

// A per-thread scratch buffer of at least `count` values, reused by every call on the thread
// (it grows to the largest request and is freed when the thread exits). Only leaf kernels,
// which call nothing else that uses it, may hold it. On Linux it is 2 MiB-aligned and advised
// as transparent huge pages (madvise; a no-op where THP is off): the sparse kernels gather
// rows of it at random, and with 4 KiB pages every gathered row of a large head is a TLB miss.
class ThreadWorkspace {
 public:
  ThreadWorkspace() = default;
  ThreadWorkspace(const ThreadWorkspace&) = delete;
  ThreadWorkspace& operator=(const ThreadWorkspace&) = delete;
  ~ThreadWorkspace() { release(); }
  // Never null, even for 0 bytes: callers offset into it.
  void* get(std::size_t bytes) {
    if (bytes <= capacity_ && data_ != nullptr) return data_;
    bytes = std::max<std::size_t>(bytes, 64);
    release();
#if defined(__linux__)
    constexpr std::size_t huge_page = std::size_t(2) << 20;
    const std::size_t size = (bytes + huge_page - 1) / huge_page * huge_page;
    data_ = std::aligned_alloc(huge_page, size);
    if (data_ == nullptr) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
    madvise(data_, size, MADV_HUGEPAGE);  // advice only: where it fails, the pages stay 4 KiB
#endif
#else
    const std::size_t size = bytes;
    data_ = ::operator new(size);
#endif
    capacity_ = size;
    return data_;
  }

 private:
  void release() {
#if defined(__linux__)
    std::free(data_);
#else
    ::operator delete(data_);
#endif
    data_ = nullptr;
    capacity_ = 0;
  }
  void* data_ = nullptr;
  std::size_t capacity_ = 0;
};

// `count` values of T rounded up to whole 64-byte cache lines: the offset of the next part of
// a workspace that holds several, so that each part starts on a cache line.
template <class T>
index_t line_padded(index_t count) {
  constexpr index_t per_line = 64 / index_t(sizeof(T));
  return (count + per_line - 1) / per_line * per_line;
}

// Slot 0 is the leaf kernels'; slot 1 is held by sparse_backward_split across its two passes
// (the dS of every kept entry, and packed K, V for the rows pass), which use slot 0 inside.
template <class T, int Slot = 0>
T* thread_workspace(index_t count) {
  thread_local ThreadWorkspace buffer;
  return static_cast<T*>(buffer.get(static_cast<std::size_t>(count) * sizeof(T)));
}

// One query row i of the SUS backward, for the row lengths dk = d, dv = d_v:
//   dot_dO(V_j) = dO_i · V_j
//   add_k(ds, K_j):                   acc_i += ds K_j
//   scatter(ds, w, gK_j, gV_j):       gK_j += ds Q_i,  gV_j += w dO_i
//   update(ds, w, K_j, gK_j, gV_j):   add_k, then scatter (the fused kernel)
//   finish(out): the accumulated acc_i into out (d values)
// MemoryRow works through memory with dot and axpy, for any lengths.
template <class T, class DK, class DV>
struct MemoryRow {
  const T* q;
  const T* dO;
  T* acc;
  DK dk;
  DV dv;
  // resume: go on accumulating into acc_i (a row's later key block), instead of zeroing it.
  SUS_ALWAYS_INLINE MemoryRow(const T* q_i, const T* dO_i, T* acc_i, DK dk_, DV dv_, bool resume = false)
      : q(q_i), dO(dO_i), acc(acc_i), dk(dk_), dv(dv_) {
    if (!resume) std::fill(acc, acc + dk, T(0));
  }
  SUS_ALWAYS_INLINE T dot_dO(const T* v) const { return dot(dO, v, dv); }
  SUS_ALWAYS_INLINE void add_k(T ds, const T* k) { axpy(ds, k, acc, dk); }
  SUS_ALWAYS_INLINE void scatter(T ds, T w, T* gk, T* gv) const {
    axpy(ds, q, gk, dk);
    axpy(w, dO, gv, dv);
  }
  SUS_ALWAYS_INLINE void update(T ds, T w, const T* k, T* gk, T* gv) {
    add_k(ds, k);
    scatter(ds, w, gk, gv);
  }
  SUS_ALWAYS_INLINE void finish(T*) const {}  // acc is already the output
};

// RegisterRow (Q_i, dO_i, acc_i in registers) with AVX-512 only: its three rows of d = 64
// floats take 12 of the 32 zmm registers, but would take 24 of AVX2's 16 ymm (and 48 of
// SSE2's 16 xmm), whose spills cost more than MemoryRow's reloads. Measured: docs/method.md
// (SUS backprop: RegisterRow against MemoryRow with AVX2).
#if defined(SUS_VECTOR_EXTENSIONS) && SUS_VECTOR_BYTES == 64
// A row of Dim values held in registers, as Dim / L compiler vectors of L = 64 / sizeof(T)
// lanes (one 64-byte lane group each). Its dot has dot's order (per-lane products summed over
// the vectors, then the lane tree, then + 0 for the empty tail) and its axpys are axpy's
// element operations, so every result has the bits of dot and axpy on the same values (tested).
template <class T, index_t Dim>
struct Registers {
  using V = typename Lanes<T>::native;
  static_assert(Lanes<T>::P == 1, "Registers: one vector per 64-byte lane group");
  static constexpr index_t L = Lanes<T>::NL;
  static constexpr index_t B = Dim / L;
  static_assert(Dim % L == 0, "Registers: Dim must be a multiple of the lanes");
  V x[B];
  SUS_ALWAYS_INLINE void load(const T* p) {
    for (index_t b = 0; b < B; ++b) std::memcpy(&x[b], p + b * L, sizeof(V));
  }
  SUS_ALWAYS_INLINE void store(T* p) const {
    for (index_t b = 0; b < B; ++b) std::memcpy(p + b * L, &x[b], sizeof(V));
  }
  SUS_ALWAYS_INLINE T dot(const T* p) const {
    V s = {};
    for (index_t b = 0; b < B; ++b) {
      V y;
      std::memcpy(&y, p + b * L, sizeof(V));
      s += x[b] * y;
    }
    return Lanes<T>::sum(&s) + T(0);
  }
  // p += alpha·x
  SUS_ALWAYS_INLINE void add_to(T alpha, T* p) const {
    for (index_t b = 0; b < B; ++b) {
      V y;
      std::memcpy(&y, p + b * L, sizeof(V));
      y += alpha * x[b];
      std::memcpy(p + b * L, &y, sizeof(V));
    }
  }
  // x += alpha·p
  SUS_ALWAYS_INLINE void add(T alpha, const T* p) {
    for (index_t b = 0; b < B; ++b) {
      V y;
      std::memcpy(&y, p + b * L, sizeof(V));
      x[b] += alpha * y;
    }
  }
};

// RegisterRow keeps Q_i, dO_i and acc_i in registers for a compile-time d = d_v (64 or 128):
// each kept entry then loads only V_j and K_j and updates gK_j, gV_j, where MemoryRow also
// reloads Q_i and dO_i and loads and stores acc_i.
template <class T, index_t Dim>
struct RegisterRow {
  Registers<T, Dim> q, dO, acc;
  template <class DK, class DV>
  SUS_ALWAYS_INLINE RegisterRow(const T* q_i, const T* dO_i, T* acc_i, DK, DV, bool resume = false) : acc{} {
    q.load(q_i);
    dO.load(dO_i);
    if (resume) acc.load(acc_i);
  }
  SUS_ALWAYS_INLINE T dot_dO(const T* v) const { return dO.dot(v); }
  SUS_ALWAYS_INLINE void add_k(T ds, const T* k) { acc.add(ds, k); }
  SUS_ALWAYS_INLINE void scatter(T ds, T w, T* gk, T* gv) const {
    q.add_to(ds, gk);
    dO.add_to(w, gv);
  }
  SUS_ALWAYS_INLINE void update(T ds, T w, const T* k, T* gk, T* gv) {
    add_k(ds, k);
    scatter(ds, w, gk, gv);
  }
  SUS_ALWAYS_INLINE void finish(T* out) const { acc.store(out); }
};

template <class T, class DK, class DV>
struct SparseRowFor {
  using type = MemoryRow<T, DK, DV>;
};
template <class T, index_t Dim>
struct SparseRowFor<T, std::integral_constant<index_t, Dim>, std::integral_constant<index_t, Dim>> {
  using type = RegisterRow<T, Dim>;
};
template <class T, class DK, class DV>
using SparseRow = typename SparseRowFor<T, DK, DV>::type;
#else
template <class T, class DK, class DV>
using SparseRow = MemoryRow<T, DK, DV>;
#endif

// store_rows (after store_fence): rows [r0, r0 + rows) of dst = s·src (src rows `stride`
// values apart), the kernels' final write of an output they do not read. On x86 (SSE2) rows
// that start 16-byte aligned, with a length and a row stride of whole 16-byte units, go
// through non-temporal stores: a normal store first reads each line in, and at a head's
// stride in a [B, S, H, D] buffer (rows H·D apart, a page every few rows) the hardware
// prefetch does not read them ahead. Each value is the same product s·src_k either way (the
// same bits). Unless `fence`, the caller calls store_fence() before it returns.
//
// store_fence: orders those non-temporal stores before anything that follows (SSE2 sfence).
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}
template <class T>
void store_rows(MatrixRef<T>& dst, index_t r0, index_t rows, const T* src, index_t stride, T s, bool fence = true) {
  using Strided = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
  const index_t cols = dst.cols();
#if defined(__SSE2__)
  constexpr index_t L = 16 / index_t(sizeof(T));  // values per 16-byte store
  if (rows > 0 && (std::is_same<T, float>::value || std::is_same<T, double>::value) && cols % L == 0 &&
      dst.outerStride() % L == 0 && reinterpret_cast<std::uintptr_t>(dst.row(r0).data()) % 16 == 0) {
    for (index_t r = 0; r < rows; ++r) {
      T* out = dst.row(r0 + r).data();
      const T* in = src + r * stride;
      for (index_t k = 0; k < cols; k += L) {
        if constexpr (std::is_same<T, float>::value)
          _mm_stream_ps(out + k, _mm_mul_ps(_mm_set1_ps(s), _mm_loadu_ps(in + k)));
        else if constexpr (std::is_same<T, double>::value)
          _mm_stream_pd(out + k, _mm_mul_pd(_mm_set1_pd(s), _mm_loadu_pd(in + k)));
      }
    }
    if (fence) store_fence();  // the streamed stores are ordered before anything that follows
    return;
  }
#endif
  dst.middleRows(r0, rows).noalias() = s * Strided(src, rows, cols, Eigen::OuterStride<>(stride));
}

// Whether K and V are the two halves of one buffer packed key by key (pack_key_rows): row j of
// V directly follows row j of K, and each row of the buffer is [K_j | V_j].
template <class T>
bool kv_interleaved(const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V) {
  const index_t w = K.cols() + V.cols();
  return K.rows() > 1 && K.rows() == V.rows() && K.outerStride() == w && V.outerStride() == w &&
         V.data() == K.data() + K.cols();
}

// Copies K and V into `dst` key by key, row j = [K_j | V_j] (n_k·(d + d_v) values), and returns
// views of the two halves. The rows pass gathers both rows of each kept key: packed, they are
// one span of d + d_v values, in the huge pages of a workspace (thread_workspace), where the
// user's buffers have 4 KiB pages whose TLB misses dominate once the rows outgrow the TLB's
// reach. Measured: docs/method.md (SUS backprop: the split passes pack every head).
// pack_key_rows copies keys [j0, j1) (all of them by default); packed_key_views gives the views.
template <class T>
struct PackedKeys {
  ConstMatrixRef<T> K, V;
};
template <class T>
PackedKeys<T> packed_key_views(const T* packed, index_t n_k, index_t d, index_t d_v) {
  using Strided = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
  return {ConstMatrixRef<T>(Strided(packed, n_k, d, Eigen::OuterStride<>(d + d_v))),
          ConstMatrixRef<T>(Strided(packed + d, n_k, d_v, Eigen::OuterStride<>(d + d_v)))};
}
template <class T>
PackedKeys<T> pack_key_rows(const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V, T* dst, index_t j0 = 0,
                            index_t j1 = -1) {
  const index_t n_k = K.rows(), d = K.cols(), d_v = V.cols(), w = d + d_v;
  if (j1 < 0) j1 = n_k;
  for (index_t j = j0; j < j1; ++j) {
    std::memcpy(dst + j * w, K.row(j).data(), std::size_t(d) * sizeof(T));
    std::memcpy(dst + j * w + d, V.row(j).data(), std::size_t(d_v) * sizeof(T));
  }
  return packed_key_views<T>(dst, n_k, d, d_v);
}

// The same SUS backward split in two passes that can each run in parallel. The multi-head
// path uses it when it has too few heads to keep every thread busy with one head each:
//   rows pass, any split of the rows:  dQ_i as in the fused kernel, and each dS_ij stored at
//                                      its position p in the mask (dS[p]);
//   keys pass, any split of the keys:  gK_j += dS_ij Q_i, gV_j += W̃_ij dO_i for the keys of
//                                      the range, row by row in ascending i, as the fused
//                                      kernel scatters them.
// Every sum has the fused kernel's operations in the fused kernel's order, so the gradients
// are bitwise equal to sparse_backward_kernel's (tested), whatever the split. K and V are
// gathered by the rows pass: pass them packed (rows back to back) when they are strided.
//
// Rows pass over rows [i0, i1). Unless bins is null, also counts the kept entries per bin of
// 2^bin_shift keys into bins[] (added to), so that the caller can split the keys pass by nnz.
template <class T>
void sparse_backward_rows(const BackwardArgs<T>& a, const Csr<T>& mask, T* dS, index_t* bins, int bin_shift, T s,
                          bool acc_q, index_t i0, index_t i1) {
  const index_t d = a.Q.cols(), d_v = a.V.cols();
  Eigen::Matrix<T, 1, Eigen::Dynamic> acc(d);
  constexpr index_t ahead = SparseBackwardConfig::prefetch_distance, chunk = SparseBackwardConfig::chunk;
  const index_t end = mask.row_offsets[i1];
  const index_t* col = mask.col_indices.data();
  // K and V packed key by key ([K_j | V_j], pack_key_rows): the first loop prefetches both,
  // one span of d + d_v values, so the second finds K_j in cache.
  const bool kv_packed = kv_interleaved(a.K, a.V);
  const index_t v_bytes = (kv_packed ? d + d_v : d_v) * index_t(sizeof(T));
  with_head_dims(d, d_v, [&](auto dk, auto dv) {
    using Row = SparseRow<T, decltype(dk), decltype(dv)>;
    for (index_t i = i0; i < i1; ++i) {
      Row row(a.Q.row(i).data(), a.dO.row(i).data(), acc.data(), dk, dv);
      const T D = dot(a.dO.row(i).data(), a.O.row(i).data(), dv);
      const index_t row_end = mask.row_offsets[i + 1];
      for (index_t p0 = mask.row_offsets[i]; p0 < row_end; p0 += chunk) {
        const index_t p1 = std::min(p0 + chunk, row_end);
        for (index_t p = p0; p < p1; ++p) {
          if (ahead > 0 && p + ahead < end)
            prefetch(kv_packed ? a.K.row(col[p + ahead]).data() : a.V.row(col[p + ahead]).data(), v_bytes, false);
          dS[p] = mask.values[p] * (row.dot_dO(a.V.row(col[p]).data()) - D);
          if (bins) ++bins[col[p] >> bin_shift];
        }
        for (index_t p = p0; p < p1; ++p) {
          if (!kv_packed && ahead > 0 && p + ahead < p1)
            prefetch(a.K.row(col[p + ahead]).data(), dk * index_t(sizeof(T)), false);
          row.add_k(dS[p], a.K.row(col[p]).data());
        }
      }
      row.finish(acc.data());
      if (acc_q) a.dQ.row(i).noalias() += s * acc;
      else store_rows<T>(a.dQ, i, 1, acc.data(), d, s, /*fence=*/false);
    }
  });
  store_fence();
}

// Keys [j0, j0 + nk) of dK = s·gK and dV = gV (added to them when acc_kv), from unscaled sums
// gK, gV whose rows are `stride` values apart.
template <class T>
void store_key_grads(const BackwardArgs<T>& a, index_t j0, index_t nk, const T* gK, const T* gV, index_t stride, T s,
                     bool acc_kv) {
  using Strided = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
  if (acc_kv) {
    a.dK.middleRows(j0, nk).noalias() += s * Strided(gK, nk, a.dK.cols(), Eigen::OuterStride<>(stride));
    a.dV.middleRows(j0, nk) += Strided(gV, nk, a.dV.cols(), Eigen::OuterStride<>(stride));
  } else {
    store_rows<T>(a.dK, j0, nk, gK, stride, s);
    store_rows<T>(a.dV, j0, nk, gV, stride, T(1));
  }
}

// Keys pass over keys [j0, j1): dK, dV of those rows, from the rows pass's dS. gK, gV are
// accumulated in the per-thread workspace ((j1 − j0)·(d + d_v) values) and written (or added,
// acc_kv) at the end. Each row finds its first key ≥ j0 by binary search.
template <class T>
void sparse_backward_keys(const BackwardArgs<T>& a, const Csr<T>& mask, const T* dS, T s, bool acc_kv, index_t j0,
                          index_t j1) {
  const index_t d = a.Q.cols(), d_v = a.V.cols(), n_q = a.Q.rows(), nk = j1 - j0, w = d + d_v;
  // gK_j, gV_j side by side (row j: d + d_v values), so each kept entry updates one span.
  T* gK = thread_workspace<T>(nk * w);
  T* gV = gK + d;
  std::fill(gK, gK + nk * w, T(0));
  Eigen::Matrix<T, 1, Eigen::Dynamic> unused(d);  // MemoryRow's accumulator (no dQ here)
  constexpr index_t ahead = SparseBackwardConfig::prefetch_distance;
  const index_t* col = mask.col_indices.data();
  with_head_dims(d, d_v, [&](auto dk, auto dv) {
    using Row = SparseRow<T, decltype(dk), decltype(dv)>;
    for (index_t i = 0; i < n_q; ++i) {
      const index_t* c1 = col + mask.row_offsets[i + 1];
      const index_t* c0 = std::lower_bound(col + mask.row_offsets[i], c1, j0);
      if (c0 == c1 || *c0 >= j1) continue;
      index_t p1 = c0 - col;
      while (p1 < c1 - col && col[p1] < j1) ++p1;
      const Row row(a.Q.row(i).data(), a.dO.row(i).data(), unused.data(), dk, dv);
      for (index_t p = c0 - col; p < p1; ++p) {
        if (ahead > 0 && p + ahead < p1) {
          prefetch(gK + (col[p + ahead] - j0) * w, (dk + dv) * index_t(sizeof(T)), true);
        }
        const index_t j = col[p] - j0;
        row.scatter(dS[p], mask.values[p], gK + j * w, gV + j * w);
      }
    }
  });
  store_key_grads<T>(a, j0, nk, gK, gV, w, s, acc_kv);
}

// The rows of key j that a kept entry (i, j) of the fused kernels reads and updates.
template <class T>
struct KeyRows {
  const T* k;
  const T* v;
  T* gk;
  T* gv;
};
// Kept entries [p0, p1) of query row i for the fused kernels, whose row state `row` (Q_i,
// dO_i, the dQ_i accumulator) the caller holds. at(j) gives the rows of key j: at(j).k = K_j,
// .v = V_j, .gk = gK_j, .gv = gV_j. The entries go in chunks of up to `chunk`, each in two
// phases: first every dS_ij of the chunk (independent dot products, so their latencies
// overlap), then the three axpys of each entry. Every sum still receives its terms in the
// same order, so the bits are those of the one-entry-at-a-time loop. V_j is prefetched for
// entries up to v_ahead_end (the caller's next rows too), K_j, gK_j, gV_j within the chunk.
template <class T, class Row, class At>
SUS_ALWAYS_INLINE void fused_entries(Row& row, T D_i, const index_t* col, const T* val, index_t p0, index_t p1,
                                     index_t v_ahead_end, index_t k_bytes, index_t v_bytes, const At& at) {
  constexpr index_t ahead = SparseBackwardConfig::prefetch_distance, chunk = SparseBackwardConfig::chunk;
  T dS[chunk];
  for (index_t c0 = p0; c0 < p1; c0 += chunk) {
    const index_t c1 = std::min(c0 + chunk, p1);
    // dS_ij = W̃_ij (dO_i · V_j − D_i)
    for (index_t p = c0; p < c1; ++p) {
      if (ahead > 0 && p + ahead < v_ahead_end) prefetch(at(col[p + ahead]).v, v_bytes, false);
      dS[p - c0] = val[p] * (row.dot_dO(at(col[p]).v) - D_i);
    }
    // acc_i += dS_ij K_j,  gK_j += dS_ij Q_i,  gV_j += W̃_ij dO_i
    for (index_t p = c0; p < c1; ++p) {
      if (ahead > 0 && p + ahead < c1) {
        const KeyRows<T> next = at(col[p + ahead]);
        prefetch(next.k, k_bytes, false);
        prefetch(next.gk, k_bytes, true);
        prefetch(next.gv, v_bytes, true);
      }
      const KeyRows<T> r = at(col[p]);
      row.update(dS[p - c0], val[p], r.k, r.gk, r.gv);
    }
  }
}

// The fused kernel by key blocks (defined below, after sparse_backward_kernel).
template <class T>
void sparse_backward_blocked(const BackwardArgs<T>& a, const Csr<T>& mask, T s, bool acc_q, bool acc_kv,
                             index_t block_keys);

// The SUS backward as the threaded schedule's two passes, one after the other on this thread:
// the rows pass (dQ, and every dS_ij stored at its position in the mask), then the keys pass
// over key ranges of at most range_keys keys (gK, gV of a range in the thread's workspace).
// The same operations in the same order as the fused kernel: the same bits, for any range.
// dS lives in the thread's second workspace slot (a fresh vector per call would pay its page
// faults every call), and so do K and V, packed key by key for the rows pass's gathers
// (pack_key_rows), whatever their strides. Measured: docs/method.md (SUS backprop).
template <class T>
void sparse_backward_split(const BackwardArgs<T>& a, const Csr<T>& mask, T s, bool acc_q, bool acc_kv,
                           index_t range_keys) {
  const index_t n_q = a.Q.rows(), n_k = a.K.rows(), d = a.K.cols(), d_v = a.V.cols();
  const index_t k_at = line_padded<T>(mask.nnz());  // the packed rows start on a cache line
  T* dS = thread_workspace<T, 1>(k_at + n_k * (d + d_v));
  const PackedKeys<T> kv = pack_key_rows<T>(a.K, a.V, dS + k_at);
  sparse_backward_rows<T>(BackwardArgs<T>{a.Q, kv.K, kv.V, a.O, a.dO, a.dQ, a.dK, a.dV}, mask, dS, nullptr, 0, s, acc_q,
                          0, n_q);
  for (index_t j0 = 0; j0 < n_k; j0 += range_keys)
    sparse_backward_keys<T>(a, mask, dS, s, acc_kv, j0, std::min(n_k, j0 + range_keys));
}

// The fused SUS backward. For row i and each kept (i, j):
//   dP_ij = dO_i · V_j                      (SDDMM)
//   dS_ij = W̃_ij (dP_ij − D_i)
//   acc_i += dS_ij K_j                      (SpMM, dQ_i = s·acc_i)
//   gK_j  += dS_ij Q_i,  gV_j += W̃_ij dO_i  (transposed SpMMs, dK = s·gK, dV = gV)
// Each gK_j / gV_j receives its terms in ascending i and each acc_i in ascending j: the same
// order, and the same operations, as the composition of the sparse primitives (SDDMM, SpMM,
// and the transposed SpMMs' gather through the transposed mask, sparse::spmm_transposed).
// The result is deterministic and bitwise equal to that composition (tested).
// acc_q / acc_kv: add into dQ / into dK and dV, instead of overwriting (grouped-query heads
// add their dK, dV into one shared key/value head).
//
// Which kernel runs (SparseBackwardConfig): in place, one pass over the rows, when K, V, dK,
// dV fit one key block (key_block_bytes()), are contiguous and dK, dV are not accumulated
// into; else the split passes where the key blocks are small (split_below_block_bytes; K, V
// packed for the rows pass); else by key blocks (sparse_backward_blocked), which pack them too.
template <class T>
void sparse_backward_kernel(const BackwardArgs<T>& a, const Csr<T>& mask, T s, bool acc_q, bool acc_kv) {
  using C = SparseBackwardConfig;
  const index_t n_q = a.Q.rows(), d = a.Q.cols(), n_k = a.K.rows(), d_v = a.V.cols();
  const index_t row_bytes = 2 * (d + d_v) * index_t(sizeof(T));  // K_j, V_j, gK_j, gV_j of one key
  const index_t block_keys = std::max<index_t>(1, key_block_bytes() / row_bytes);
  const bool kv_contiguous = rows_contiguous(a.K) && rows_contiguous(a.V);
  if (n_k > block_keys || acc_kv || !kv_contiguous || !rows_contiguous(a.dK) || !rows_contiguous(a.dV)) {
    if (split_passes_for_large_heads()) {
      const index_t range_keys = std::max<index_t>(1, C::key_range_bytes / ((d + d_v) * index_t(sizeof(T))));
      sparse_backward_split<T>(a, mask, s, acc_q, acc_kv, range_keys);
    } else {
      sparse_backward_blocked<T>(a, mask, s, acc_q, acc_kv, block_keys);
    }
    return;
  }
  // In place: gK, gV (the unscaled transposed sums) are accumulated straight in dK, dV.
  // D_i = dO_i · O_i
  const Vector<T> D = row_dot<T>(a.dO, a.O);
  a.dK.setZero();
  a.dV.setZero();
  const auto at = [&](index_t j) {
    return KeyRows<T>{a.K.row(j).data(), a.V.row(j).data(), a.dK.row(j).data(), a.dV.row(j).data()};
  };
  Eigen::Matrix<T, 1, Eigen::Dynamic> acc(d);
  // d = d_v = 64 or 128: compile-time lengths (with_head_dims), and with vector extensions
  // Q_i, dO_i and the dQ_i accumulator held in registers (RegisterRow); otherwise run-time
  // lengths through memory (MemoryRow). Either way the same operations in the same order.
  with_head_dims(d, d_v, [&](auto dk, auto dv) {
    using Row = SparseRow<T, decltype(dk), decltype(dv)>;
    for (index_t i = 0; i < n_q; ++i) {
      Row row(a.Q.row(i).data(), a.dO.row(i).data(), acc.data(), dk, dv);
      fused_entries<T>(row, D[i], mask.col_indices.data(), mask.values.data(), mask.row_offsets[i],
                       mask.row_offsets[i + 1], mask.nnz(), dk * index_t(sizeof(T)), dv * index_t(sizeof(T)), at);
      row.finish(acc.data());
      if (acc_q) a.dQ.row(i).noalias() += s * acc;
      else a.dQ.row(i).noalias() = s * acc;
    }
  });
  // dK = s·gK (dV = gV already)
  a.dK *= s;
}

// The fused backward by key blocks, for heads whose rows do not fit a core's cache. The keys
// go in blocks of block_keys; for each block [j0, j1):
//   1. its K_j, V_j are packed, with zeroed gK_j, gV_j, into a per-thread buffer, key by key
//      (row j − j0 holds [K_j | V_j | gK_j | gV_j]): one contiguous span that stays in L2;
//   2. every query row adds its kept entries of the block (a cursor per row walks its sorted
//      columns), its dQ_i accumulator kept in the workspace between blocks (loaded from
//      there unless this is the row's first block, written to dQ_i = s·acc_i after its last);
//   3. the block's keys have all their terms: dK_j = s·gK_j, dV_j = gV_j are written from L2.
// The entries of a row are thus still added in ascending j and each gK_j, gV_j still receives
// its terms in ascending i: the fused kernel's order and bits. K, V are read, and dK, dV
// written, once each, whatever their strides. block_keys (>= 1) changes the speed only, never
// the bits (tested).
template <class T>
void sparse_backward_blocked(const BackwardArgs<T>& a, const Csr<T>& mask, T s, bool acc_q, bool acc_kv,
                             index_t block_keys) {
  SUS_ASSERT(block_keys >= 1);
  const index_t n_q = a.Q.rows(), d = a.Q.cols(), n_k = a.K.rows(), d_v = a.V.cols();
  const index_t w = 2 * (d + d_v);  // packed values per key
  block_keys = std::max<index_t>(1, std::min(block_keys, n_k));
  // D_i = dO_i · O_i
  const Vector<T> D = row_dot<T>(a.dO, a.O);
  // Strided Q and dO (the heads of a [B, S, H, D] buffer, rows H·D apart) are first copied
  // row by row into the workspace when there are several blocks: every block visits every
  // row, and a strided row costs a page (and a TLB entry) of its own at each visit.
  const bool several = n_k > SparseBackwardConfig::copy_rows_min_blocks * block_keys;
  const index_t q_copy = several && !rows_contiguous(a.Q) ? n_q * d : 0;
  const index_t dO_copy = several && !rows_contiguous(a.dO) ? n_q * d_v : 0;
  // Workspace: one block of packed key rows, then n_q dQ_i accumulators (d values each), then
  // the copies of Q and dO, if any.
  T* packed = thread_workspace<T>(block_keys * w + n_q * d + q_copy + dO_copy);
  T* accs = packed + block_keys * w;
  T* q_rows = accs + n_q * d;
  T* dO_rows = q_rows + q_copy;
  for (index_t i = 0; q_copy > 0 && i < n_q; ++i) std::memcpy(q_rows + i * d, a.Q.row(i).data(), std::size_t(d) * sizeof(T));
  for (index_t i = 0; dO_copy > 0 && i < n_q; ++i)
    std::memcpy(dO_rows + i * d_v, a.dO.row(i).data(), std::size_t(d_v) * sizeof(T));
  const auto q_at = [&](index_t i) { return q_copy > 0 ? q_rows + i * d : a.Q.row(i).data(); };
  const auto dO_at = [&](index_t i) { return dO_copy > 0 ? dO_rows + i * d_v : a.dO.row(i).data(); };
  const index_t* col = mask.col_indices.data();
  const T* val = mask.values.data();
  index_t j0 = 0;  // the current block's first key
  const auto at = [&](index_t j) {
    T* r = packed + (j - j0) * w;
    return KeyRows<T>{r, r + d, r + d + d_v, r + 2 * d + d_v};
  };
  // Rows without kept entries: dQ_i = 0 (unchanged when accumulating).
  if (!acc_q)
    for (index_t i = 0; i < n_q; ++i)
      if (mask.row_nnz(i) == 0) a.dQ.row(i).setZero();
  // cursor[i]: row i's first entry not yet added (its entries of the blocks done so far).
  std::vector<index_t> cursor(mask.row_offsets.begin(), mask.row_offsets.end() - 1);
  with_head_dims(d, d_v, [&](auto dk, auto dv) {
    using Row = SparseRow<T, decltype(dk), decltype(dv)>;
    for (; j0 < n_k; j0 += block_keys) {
      const index_t j1 = std::min(n_k, j0 + block_keys), nb = j1 - j0;
      // 1. pack
      for (index_t j = j0; j < j1; ++j) {
        T* r = packed + (j - j0) * w;
        std::memcpy(r, a.K.row(j).data(), std::size_t(d) * sizeof(T));
        std::memcpy(r + d, a.V.row(j).data(), std::size_t(d_v) * sizeof(T));
        std::fill(r + d + d_v, r + w, T(0));
      }
      // 2. the rows' entries of the block
      for (index_t i = 0; i < n_q; ++i) {
        const index_t p0 = cursor[i], row_end = mask.row_offsets[i + 1];
        if (p0 == row_end || col[p0] >= j1) continue;
        index_t p1 = p0 + 1;
        while (p1 < row_end && col[p1] < j1) ++p1;
        cursor[i] = p1;
        T* acc_i = accs + i * d;
        Row row(q_at(i), dO_at(i), acc_i, dk, dv, /*resume=*/p0 != mask.row_offsets[i]);
        fused_entries<T>(row, D[i], col, val, p0, p1, p1, dk * index_t(sizeof(T)), dv * index_t(sizeof(T)), at);
        row.finish(acc_i);
        if (p1 == row_end) {  // dQ_i = s·acc_i
          const Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> acc(acc_i, d);
          if (acc_q) a.dQ.row(i).noalias() += s * acc;
          else store_rows<T>(a.dQ, i, 1, acc_i, d, s, /*fence=*/false);
        }
      }
      // 3. dK = s·gK, dV = gV for the block (or added, acc_kv)
      store_key_grads<T>(a, j0, nb, packed + d + d_v, packed + 2 * d + d_v, w, s, acc_kv);
    }
  });
  store_fence();  // the dQ rows' streamed stores
}

template <class T>
void attention_backward_sparse(const BackwardArgs<T>& a, const Csr<T>& mask, const AttentionOptions& o) {
  constexpr const char* fn = "attention_backward_sparse";
  const InputMagnitudes m = check_backward_args(fn, a, o);
  const double w_max = check_mask(fn, mask, a.Q.rows(), a.K.rows(), o);
  const T s = static_cast<T>(resolve_scale<T>(fn, o, a.Q.cols()));
  sparse_backward_kernel<T>(a, mask, s, o.accumulate, o.accumulate);
  check_gradients<T>(fn, a, sparse_gradient_bound(m, s, a.Q.rows(), a.K.rows(), a.V.cols(), w_max, 1), o.accumulate,
                     s, m);
}

// The tiled GEMM backward (arguments checked by the caller): per group of row_group blocks
// of row_block query rows, per tile of key_tile keys, per block of the group, four GEMMs.
// acc_q, acc_kv as in sparse_backward_kernel.
template <class T>
void dense_backward_kernel(const BackwardArgs<T>& a, const ConstMatrixRef<T>& W, T s, const AttentionOptions& o,
                           bool acc_q, bool acc_kv) {
  const index_t n_q = a.Q.rows(), n_k = a.K.rows();
  constexpr index_t Br = DenseBackwardConfig::row_block, Bc = DenseBackwardConfig::key_tile;
  if (!acc_kv) {
    a.dK.setZero();
    a.dV.setZero();
  }
  // D_i = dO_i · O_i
  const Vector<T> D = row_dot<T>(a.dO, a.O);
  Matrix<T> dS(std::min(Br, n_q), std::min(Bc, n_k));
  constexpr index_t G = DenseBackwardConfig::row_group * Br;
  for (index_t g0 = 0; g0 < n_q; g0 += G) {  // row groups [g0, g0 + G): their blocks share each key tile
    const index_t g1 = std::min(n_q, g0 + G);
    for (index_t i0 = g0; i0 < g1; i0 += Br) {  // blocks that see no key
      const index_t rows = std::min(Br, n_q - i0);
      if (!acc_q && visible_keys(i0 + rows - 1, n_q, n_k, o) == 0) a.dQ.middleRows(i0, rows).setZero();
    }
    const index_t kv_g = visible_keys(g1 - 1, n_q, n_k, o);
    for (index_t j0 = 0; j0 < kv_g; j0 += Bc) {  // key tiles [j0, j0 + cols)
      for (index_t i0 = g0; i0 < g1; i0 += Br) {
        const index_t rows = std::min(Br, n_q - i0);
        const index_t kv = visible_keys(i0 + rows - 1, n_q, n_k, o);  // W_b is zero beyond column kv
        if (j0 >= kv) continue;
        const index_t cols = std::min(Bc, kv - j0);
        const auto dO_b = a.dO.middleRows(i0, rows);
        const auto Q_b = a.Q.middleRows(i0, rows);
        auto dQ_b = a.dQ.middleRows(i0, rows);
        const auto W_t = W.block(i0, j0, rows, cols);
        auto dS_t = dS.topLeftCorner(rows, cols);
        // dV_t += W_tᵀ·dO_b
        a.dV.middleRows(j0, cols).noalias() += W_t.transpose() * dO_b;
        // dP_t = dO_b·V_tᵀ
        dS_t.noalias() = dO_b * a.V.middleRows(j0, cols).transpose();
        // dS_t = W_t ∘ (dP_t − D_b)
        dS_t.array() = W_t.array() * (dS_t.array().colwise() - D.segment(i0, rows).array());
        // dQ_b (+)= s·dS_t·K_t
        if (acc_q || j0 > 0) dQ_b.noalias() += s * (dS_t * a.K.middleRows(j0, cols));
        else dQ_b.noalias() = s * (dS_t * a.K.middleRows(j0, cols));
        // dK_t += s·dS_tᵀ·Q_b
        a.dK.middleRows(j0, cols).noalias() += s * (dS_t.transpose() * Q_b);
      }
    }
  }
}

template <class T>
void attention_backward_dense(const BackwardArgs<T>& a, const ConstMatrixRef<T>& W, const AttentionOptions& o) {
  constexpr const char* fn = "attention_backward_dense";
  const InputMagnitudes m = check_backward_args(fn, a, o);
  check_dense_weights(fn, a, W, o);
  const T s = static_cast<T>(resolve_scale<T>(fn, o, a.Q.cols()));
  dense_backward_kernel<T>(a, W, s, o, o.accumulate, o.accumulate);
  check_gradients<T>(fn, a, dense_gradient_bound<T>(m, s, a.Q.rows(), a.V.cols(), 1), o.accumulate, s, m);
}

}  // namespace detail

/// SUS backward, O(nnz·d): gradients of O = softmax(s·Q·Kᵀ)·V with the sampled weights W̃
/// (`mask`, from SusMask or sample_mask) in place of W. Unbiased; deterministic (no atomics:
/// every dK_j, dV_j receives its terms in ascending query order).
///   Q: n_q x d, K: n_k x d, V: n_k x d_v, O (forward output) and dO: n_q x d_v.
///   mask: n_q x n_k Csr (validated; causal: no entry a query cannot see).
///   dQ: n_q x d, dK: n_k x d, dV: n_k x d_v, caller-owned; overwritten, or added to when
///   options.accumulate. Outputs must not overlap inputs or each other.
/// Throws sus::Error on bad shapes, non-finite input, or an invalid mask.
inline void attention_backward_sparse(const ConstMatrixRef<float>& Q, const ConstMatrixRef<float>& K,
                                      const ConstMatrixRef<float>& V, const ConstMatrixRef<float>& O,
                                      const ConstMatrixRef<float>& dO, const Csr<float>& mask, MatrixRef<float> dQ,
                                      MatrixRef<float> dK, MatrixRef<float> dV, const AttentionOptions& options = {}) {
  detail::attention_backward_sparse<float>({Q, K, V, O, dO, dQ, dK, dV}, mask, options);
}
inline void attention_backward_sparse(const ConstMatrixRef<double>& Q, const ConstMatrixRef<double>& K,
                                      const ConstMatrixRef<double>& V, const ConstMatrixRef<double>& O,
                                      const ConstMatrixRef<double>& dO, const Csr<double>& mask, MatrixRef<double> dQ,
                                      MatrixRef<double> dK, MatrixRef<double> dV, const AttentionOptions& options = {}) {
  detail::attention_backward_sparse<double>({Q, K, V, O, dO, dQ, dK, dV}, mask, options);
}

/// Exact backward from the recorded dense weights W (DenseWeights), O(n_q·n_k·d) in four
/// blocked GEMMs (half of that when causal). The baseline SUS is measured against.
/// Arguments as attention_backward_sparse, with W: n_q x n_k rows of softmax weights
/// (checked: finite, ≥ 0, each row sums to 1 or is all zero; causal: zero where the query
/// sees no key).
inline void attention_backward_dense(const ConstMatrixRef<float>& Q, const ConstMatrixRef<float>& K,
                                     const ConstMatrixRef<float>& V, const ConstMatrixRef<float>& O,
                                     const ConstMatrixRef<float>& dO, const ConstMatrixRef<float>& W,
                                     MatrixRef<float> dQ, MatrixRef<float> dK, MatrixRef<float> dV,
                                     const AttentionOptions& options = {}) {
  detail::attention_backward_dense<float>({Q, K, V, O, dO, dQ, dK, dV}, W, options);
}
inline void attention_backward_dense(const ConstMatrixRef<double>& Q, const ConstMatrixRef<double>& K,
                                     const ConstMatrixRef<double>& V, const ConstMatrixRef<double>& O,
                                     const ConstMatrixRef<double>& dO, const ConstMatrixRef<double>& W,
                                     MatrixRef<double> dQ, MatrixRef<double> dK, MatrixRef<double> dV,
                                     const AttentionOptions& options = {}) {
  detail::attention_backward_dense<double>({Q, K, V, O, dO, dQ, dK, dV}, W, options);
}

}  // namespace sus
