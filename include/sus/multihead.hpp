// sus — batched multi-head attention over strided views of caller-owned memory.
//
//   Q: [B, S_q, H_q, D]   K: [B, S_k, H_kv, D]   V: [B, S_k, H_kv, D_v]   O, dO: [B, S_q, H_q, D_v]
//
// Every operand is a HeadsView: a pointer plus sizes and element strides for (batch, seq,
// head), with unit stride along the head dimension. bshd() and bhsd() build the views of the
// two usual layouts; any other strides (a packed QKV projection, say) work too, without
// copies. Grouped-query attention: H_q is a multiple of H_kv and query head h reads key/value
// head h / (H_q / H_kv) (contiguous groups, as in FlashAttention); H_kv = 1 is multi-query.
// Variable-length batches: with cu_seqlens the views hold one packed batch (B = 1) and
// sequence b is rows [cu_seqlens[b], cu_seqlens[b + 1]).
//
// Each (sequence b, query head h) is one single-head problem, solved by the same kernels as
// attention_forward / attention_backward_*. What the backward needs is kept in an
// AttentionState: the log-sum-exp of every row, and per (b, h) either the SUS mask (CSR,
// 64-bit offsets) or the dense weights W.
//
// Threads (OpenMP, optional): the forward runs (b, h, row block) tasks — each holds at most
// one row block x n_k score buffer — and the backward runs (b, key/value head) tasks, which
// visit the heads of their group in ascending order (the SUS backward, with few such tasks
// per thread, runs row-block then key-range tasks instead: SparseSchedule). Every sum is
// computed in the same order whatever the thread count, and no two tasks write the same
// memory, so masks and gradients are bitwise identical for any number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "backward.hpp"
#include "csr.hpp"
#include "detail/parallel.hpp"
#include "error.hpp"
#include "forward.hpp"
#include "sampler.hpp"
#include "types.hpp"

namespace sus {

/// A [batch, seq, heads, dim] view of caller memory: element (b, s, h, k) is
/// data[b·stride_batch + s·stride_seq + h·stride_head + k]. Strides are in elements and ≥ 0;
/// the view must not address one element twice. extent, if ≥ 0, is the number of elements the
/// caller owns from `data` on, and every view is checked to stay inside it.
template <class T>
struct HeadsView {
  T* data = nullptr;
  index_t batch = 0, seq = 0, heads = 0, dim = 0;
  index_t stride_batch = 0, stride_seq = 0, stride_head = 0;
  index_t extent = -1;

  HeadsView() = default;
  HeadsView(T* data_, index_t batch_, index_t seq_, index_t heads_, index_t dim_, index_t stride_batch_,
            index_t stride_seq_, index_t stride_head_, index_t extent_ = -1)
      : data(data_), batch(batch_), seq(seq_), heads(heads_), dim(dim_), stride_batch(stride_batch_),
        stride_seq(stride_seq_), stride_head(stride_head_), extent(extent_) {}
  /// A view of mutable memory converts to a read-only view.
  template <class U, class = std::enable_if_t<std::is_same<const U, T>::value && !std::is_same<U, T>::value>>
  HeadsView(const HeadsView<U>& o)  // NOLINT(google-explicit-constructor)
      : HeadsView(o.data, o.batch, o.seq, o.heads, o.dim, o.stride_batch, o.stride_seq, o.stride_head, o.extent) {}

  using Scalar = std::remove_const_t<T>;
  using HeadMatrix =
      Eigen::Map<std::conditional_t<std::is_const<T>::value, const Matrix<Scalar>, Matrix<Scalar>>, 0, Eigen::OuterStride<>>;
  /// Rows [row0, row0 + rows) of head h of batch entry b, as a rows x dim row-major matrix.
  /// No rows: an empty matrix at `data` (an empty view's strides may address nothing real).
  HeadMatrix head(index_t b, index_t h, index_t row0, index_t rows) const {
    return HeadMatrix(rows > 0 ? data + b * stride_batch + h * stride_head + row0 * stride_seq : data, rows, dim,
                      Eigen::OuterStride<>(rows > 1 ? stride_seq : dim));
  }
};

/// The most (sequence, query head) pairs one multi-head call takes: the saved state and the
/// task lists hold every pair, even where the sequences are empty, so a larger count (a view
/// with S = 0 and a huge batch, say) is rejected before anything is sized by it.
constexpr index_t max_heads_per_call = index_t(1) << 24;

namespace detail {
// a·b for the sizes of a layout; sus::Error if it overflows index_t (negative sizes pass
// through to check_view, which names them).
inline index_t size_product(const char* fn, index_t a, index_t b) {
  index_t out = 0;
#if defined(__GNUC__) || defined(__clang__)
  if (__builtin_mul_overflow(a, b, &out)) fail(fn, "sizes ", a, " x ", b, " overflow index_t");
#else
  const long double p = static_cast<long double>(a) * static_cast<long double>(b);
  if (p > static_cast<long double>(std::numeric_limits<index_t>::max()) ||
      p < static_cast<long double>(std::numeric_limits<index_t>::min()))
    fail(fn, "sizes ", a, " x ", b, " overflow index_t");
  out = a * b;
#endif
  return out;
}
}  // namespace detail

/// The [B, S, H, D] layout, contiguous (PyTorch's default for a projection's output).
template <class T>
HeadsView<T> bshd(T* data, index_t B, index_t S, index_t H, index_t D) {
  const index_t hd = detail::size_product("bshd", H, D), shd = detail::size_product("bshd", S, hd);
  return {data, B, S, H, D, shd, hd, D, detail::size_product("bshd", B, shd)};
}
/// The [B, H, S, D] layout, contiguous (heads-major; what many kernels transpose to).
template <class T>
HeadsView<T> bhsd(T* data, index_t B, index_t H, index_t S, index_t D) {
  const index_t sd = detail::size_product("bhsd", S, D), hsd = detail::size_product("bhsd", H, sd);
  return {data, B, S, H, D, hsd, D, sd, detail::size_product("bhsd", B, hsd)};
}
namespace detail {
// Checks that an Eigen Matrix or Array holds exactly B·S·H·D elements.
template <class Derived>
void check_elements(const char* fn, const Eigen::PlainObjectBase<Derived>& m, index_t elements, const char* product) {
  if (m.size() != elements)
    fail(fn, "the matrix has ", m.size(), " elements (", shape(m.rows(), m.cols()), "), expected ", product, " = ",
         elements);
}
}  // namespace detail

/// Eigen conveniences: the storage of a dense Eigen Matrix or Array holding B·S·H·D elements,
/// read in the given layout (for a Map or other memory, pass its data() pointer). A const
/// object gives a read-only view; a temporary is refused (the view would dangle).
template <class Derived>
auto bshd(Eigen::PlainObjectBase<Derived>& m, index_t B, index_t S, index_t H, index_t D) {
  const auto view = bshd(m.data(), B, S, H, D);
  detail::check_elements("bshd", m, view.extent, "B·S·H·D");
  return view;
}
template <class Derived>
auto bshd(const Eigen::PlainObjectBase<Derived>& m, index_t B, index_t S, index_t H, index_t D) {
  const auto view = bshd(m.data(), B, S, H, D);
  detail::check_elements("bshd", m, view.extent, "B·S·H·D");
  return view;
}
template <class Derived>
auto bshd(const Eigen::PlainObjectBase<Derived>&& m, index_t B, index_t S, index_t H, index_t D) = delete;
template <class Derived>
auto bhsd(Eigen::PlainObjectBase<Derived>& m, index_t B, index_t H, index_t S, index_t D) {
  const auto view = bhsd(m.data(), B, H, S, D);
  detail::check_elements("bhsd", m, view.extent, "B·H·S·D");
  return view;
}
template <class Derived>
auto bhsd(const Eigen::PlainObjectBase<Derived>& m, index_t B, index_t H, index_t S, index_t D) {
  const auto view = bhsd(m.data(), B, H, S, D);
  detail::check_elements("bhsd", m, view.extent, "B·H·S·D");
  return view;
}
template <class Derived>
auto bhsd(const Eigen::PlainObjectBase<Derived>&& m, index_t B, index_t H, index_t S, index_t D) = delete;

/// A boolean or additive score mask for every (batch entry, query head):
/// [batch, heads, rows, cols] with batch ∈ {1, B}, heads ∈ {1, H_q}, rows ∈ {1, S_q},
/// cols = S_k; a size-1 dimension is shared (broadcast). Element (b, h, i, j) is at
/// b·stride_batch + h·stride_head + i·stride_row + j. Semantics as ScoreMask (types.hpp).
/// Not available with cu_seqlens (varlen batches).
template <class T>
struct HeadsMask {
  const bool* keep = nullptr;
  const T* add = nullptr;
  index_t batch = 0, heads = 0, rows = 0, cols = 0;
  index_t stride_batch = 0, stride_head = 0, stride_row = 0;

  bool empty() const { return keep == nullptr && add == nullptr; }
  /// The single-head mask of (b, h).
  ScoreMask<T> head(index_t b, index_t h) const {
    if (empty()) return {};
    const index_t off = (batch == 1 ? 0 : b) * stride_batch + (heads == 1 ? 0 : h) * stride_head;
    return {keep ? keep + off : nullptr, add ? add + off : nullptr, rows, cols, rows == 1 ? 0 : stride_row};
  }
};

/// A contiguous [batch, heads, rows, cols] boolean mask (true: attend); size-1 dimensions
/// broadcast: (B, 1, 1, S_k) is a key-padding mask.
template <class T = float>
HeadsMask<T> heads_bool_mask(const bool* keep, index_t batch, index_t heads, index_t rows, index_t cols) {
  const index_t plane = detail::size_product("heads_bool_mask", rows, cols);
  return {keep, nullptr, batch, heads, rows, cols, detail::size_product("heads_bool_mask", heads, plane), plane, cols};
}
/// A contiguous [batch, heads, rows, cols] additive mask (−inf: masked).
template <class T>
HeadsMask<T> heads_additive_mask(const T* add, index_t batch, index_t heads, index_t rows, index_t cols) {
  const index_t plane = detail::size_product("heads_additive_mask", rows, cols);
  return {nullptr, add, batch, heads, rows, cols, detail::size_product("heads_additive_mask", heads, plane), plane,
          cols};
}

/// Options of the multi-head calls: the single-head options (scale, causal and its alignment,
/// accumulate) plus the batch geometry and the thread count.
struct MultiHeadOptions : AttentionOptions {
  /// Variable-length batch: both set (or both empty), each B + 1 non-decreasing offsets from 0
  /// to the views' seq; sequence b has n_q = cu_seqlens_q[b+1] − cu_seqlens_q[b] queries and
  /// n_k = cu_seqlens_k[b+1] − cu_seqlens_k[b] keys. The views must then have batch = 1.
  std::vector<index_t> cu_seqlens_q, cu_seqlens_k;
  /// OpenMP threads, ≥ 0; 0: omp_get_max_threads(). Ignored (1) without OpenMP. The results
  /// do not depend on it.
  int num_threads = 0;
};

/// What the forward keeps for the backward.
enum class SaveForBackward {
  lse_only,       ///< log-sum-exp per row (inference, or a caller-side backward)
  dense_weights,  ///< W per (b, h), n_q x n_k: the exact dense backward (small n)
  sus_mask        ///< the SUS mask per (b, h), O(n_q·c): the SUS backward
};

/// The saved state of a multi-head forward, for the backward. Set `save` (and `sampler`)
/// before the forward; the forward fills the rest. Index (b, h) as at(b, h) = b·heads + h.
/// The SUS mask of (b, h) is sampled with seed head_seed(sampler.seed, b, h): the masks are a
/// pure function of sampler.seed, so change it every training step (e.g. to the step number);
/// a fixed seed repeats the same masks, and the step-to-step gradient noise is no longer
/// independent.
template <class T>
struct AttentionState {
  SaveForBackward save = SaveForBackward::sus_mask;
  SamplerOptions sampler;

  index_t sequences = 0;          ///< B, or the number of varlen sequences (0 until a forward succeeds)
  index_t heads = 0;              ///< H_q
  std::vector<Vector<T>> lse;     ///< per (b, h): n_q(b) log-sum-exp values (−inf: fully masked row)
  std::vector<Csr<T>> masks;      ///< per (b, h), n_q(b) x n_k(b), when save = sus_mask
  std::vector<Matrix<T>> weights; ///< per (b, h), n_q(b) x n_k(b), when save = dense_weights

  index_t at(index_t b, index_t h) const { return b * heads + h; }

  /// The forward's softmax scale, causal flag, alignment and cu_seqlens: the backward checks
  /// that its options agree (a different scale or mask would silently give wrong gradients).
  struct Recorded {
    double scale = 0;
    bool causal = false;
    CausalAlignment alignment = CausalAlignment::top_left;
    std::vector<index_t> cu_seqlens_q, cu_seqlens_k;
  } recorded;
};

/// The sampler seed of (sequence b, query head h): masks of different heads are independent.
inline std::uint64_t head_seed(std::uint64_t seed, index_t b, index_t h) {
  // splitmix64 finaliser over the seed and the (b, h) pair.
  auto mix = [](std::uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  return mix(seed ^ mix((static_cast<std::uint64_t>(b) << 32) ^ static_cast<std::uint64_t>(h)));
}

namespace detail {

// Element span of a view: 1 + the largest offset it addresses (0 if empty); -1 if that does
// not fit in index_t.
template <class T>
index_t view_span(const HeadsView<T>& v) {
  if (v.batch <= 0 || v.seq <= 0 || v.heads <= 0 || v.dim <= 0) return 0;
  constexpr index_t kMax = std::numeric_limits<index_t>::max();
  index_t span = v.dim;
  const index_t sizes[] = {v.batch, v.seq, v.heads}, strides[] = {v.stride_batch, v.stride_seq, v.stride_head};
  for (int k = 0; k < 3; ++k) {  // span += (size − 1)·stride, without overflow (strides are ≥ 0 here)
    if (strides[k] > 0 && sizes[k] - 1 > (kMax - span) / strides[k]) return -1;
    span += (sizes[k] - 1) * strides[k];
  }
  return span;
}

// Sizes, strides, bounds, and no element addressed twice: sorted by stride, each dimension
// must step past everything the smaller-stride dimensions span (a sufficient condition that
// is exact for every layout made of nested blocks, such as bshd, bhsd and packed QKV).
template <class T>
void check_view(const char* fn, const char* arg, const HeadsView<T>& v) {
  auto dims = [&] {
    return concat("[", v.batch, ", ", v.seq, ", ", v.heads, ", ", v.dim, "] with strides [", v.stride_batch, ", ",
                  v.stride_seq, ", ", v.stride_head, ", 1]");
  };
  if (v.batch < 0 || v.seq < 0 || v.heads < 0 || v.dim < 0)
    fail(fn, "argument '", arg, "' has a negative size: ", dims());
  if (v.stride_batch < 0 || v.stride_seq < 0 || v.stride_head < 0)
    fail(fn, "argument '", arg, "' has a negative stride: ", dims());
  const index_t span = view_span(v);
  if (span < 0) fail(fn, "argument '", arg, "' spans more elements than index_t can count: ", dims());
  if (span == 0) return;  // addresses nothing
  if (v.data == nullptr) fail(fn, "argument '", arg, "' is null: ", dims());
  if (v.extent >= 0 && span > v.extent)
    fail(fn, "argument '", arg, "' reaches element ", span - 1, " but its extent is ", v.extent,
         " elements: ", dims());
  struct Dim {
    index_t size, stride;
  };
  std::vector<Dim> ds = {{v.batch, v.stride_batch}, {v.seq, v.stride_seq}, {v.heads, v.stride_head}};
  std::sort(ds.begin(), ds.end(), [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  index_t reach = v.dim;  // elements spanned by the dimensions below
  for (const Dim& d : ds) {
    if (d.size <= 1) continue;
    if (d.stride < reach)
      fail(fn, "argument '", arg, "' addresses some elements twice (its strides overlap): ", dims());
    reach = d.stride * (d.size - 1) + reach;
  }
}

// The heads of a view as row spans, sorted by start address.
template <class T>
std::vector<RowSpan> head_spans(const HeadsView<T>& v) {
  std::vector<RowSpan> out;
  if (view_span(v) == 0) return out;
  const index_t sz = sizeof(T), width = v.dim * sz, stride = v.seq > 1 ? v.stride_seq * sz : width;
  for (index_t b = 0; b < v.batch; ++b)
    for (index_t h = 0; h < v.heads; ++h) {
      const auto start = reinterpret_cast<std::uintptr_t>(v.data + b * v.stride_batch + h * v.stride_head);
      out.push_back({start, start + static_cast<std::uintptr_t>((v.seq - 1) * stride + width), v.seq, width, stride});
    }
  std::sort(out.begin(), out.end(), [](const RowSpan& a, const RowSpan& b) { return a.start < b.start; });
  return out;
}

template <class A, class B>
void check_views_disjoint(const char* fn, const char* out, const HeadsView<A>& a, const char* in, const HeadsView<B>& b) {
  const auto sa = head_spans(a), sb = head_spans(b);
  if (sa.empty() || sb.empty()) return;
  std::uintptr_t longest_b = 0;
  for (const RowSpan& h : sb) longest_b = std::max(longest_b, h.end - h.start);
  for (const auto& ha : sa) {
    // Heads of b that can reach ha start at or after ha.start − longest_b and before ha.end.
    const std::uintptr_t from = ha.start > longest_b ? ha.start - longest_b : 0;
    auto it = std::lower_bound(sb.begin(), sb.end(), from, [](const RowSpan& h, std::uintptr_t x) { return h.start < x; });
    for (; it != sb.end() && it->start < ha.end; ++it)
      if (rows_overlap(ha, *it))
        fail(fn, "output '", out, "' overlaps argument '", in, "' in memory");
  }
}

// One sequence of the batch: where its queries and keys are in the views.
struct SequenceSpan {
  index_t batch, q0, n_q, k0, n_k;
};

inline std::vector<index_t> check_cu_seqlens(const char* fn, const char* arg, const std::vector<index_t>& cu,
                                             index_t total) {
  if (cu.empty() || cu.front() != 0)
    fail(fn, "argument '", arg, "' must start with 0 (", cu.size(), " entries)");
  for (std::size_t b = 1; b < cu.size(); ++b)
    if (cu[b] < cu[b - 1])
      fail(fn, "argument '", arg, "' decreases at entry ", b, ": ", cu[b - 1], " then ", cu[b]);
  if (cu.back() != total)
    fail(fn, "argument '", arg, "' ends at ", cu.back(), " but the packed batch has ", total, " rows");
  return cu;
}

// Checked before anything loops over the pairs or is sized by them: even empty views count.
inline void check_pair_count(const char* fn, index_t sequences, index_t heads) {
  if (heads > 0 && sequences > max_heads_per_call / heads)
    fail(fn, "argument 'Q' has ", sequences, " sequences x ", heads, " heads; a call takes at most ",
         max_heads_per_call, " (sequence, head) pairs");
}

// The sequences of a call (checked against max_heads_per_call with `heads` query heads).
inline std::vector<SequenceSpan> sequences(const char* fn, const MultiHeadOptions& o, index_t batch, index_t s_q,
                                           index_t s_k, index_t heads) {
  std::vector<SequenceSpan> seqs;
  if (o.cu_seqlens_q.empty() != o.cu_seqlens_k.empty())
    fail(fn, "options.cu_seqlens_q has ", o.cu_seqlens_q.size(), " entries and options.cu_seqlens_k ",
         o.cu_seqlens_k.size(), ": set both or neither");
  // Checked before anything is sized by it: the state holds every pair, even of empty sequences.
  const index_t n_seq = o.cu_seqlens_q.empty() ? batch : static_cast<index_t>(o.cu_seqlens_q.size()) - 1;
  check_pair_count(fn, n_seq, heads);
  if (o.cu_seqlens_q.empty()) {
    seqs.reserve(static_cast<std::size_t>(batch));
    for (index_t b = 0; b < batch; ++b) seqs.push_back({b, 0, s_q, 0, s_k});
    return seqs;
  }
  if (batch != 1)
    fail(fn, "argument 'Q' has batch ", batch, ": with cu_seqlens the views hold one packed batch (batch = 1)");
  if (o.cu_seqlens_q.size() != o.cu_seqlens_k.size())
    fail(fn, "options.cu_seqlens_q has ", o.cu_seqlens_q.size(), " entries but options.cu_seqlens_k has ",
         o.cu_seqlens_k.size(), "; both are B + 1");
  check_cu_seqlens(fn, "options.cu_seqlens_q", o.cu_seqlens_q, s_q);
  check_cu_seqlens(fn, "options.cu_seqlens_k", o.cu_seqlens_k, s_k);
  for (std::size_t b = 0; b + 1 < o.cu_seqlens_q.size(); ++b)
    seqs.push_back({0, o.cu_seqlens_q[b], o.cu_seqlens_q[b + 1] - o.cu_seqlens_q[b], o.cu_seqlens_k[b],
                    o.cu_seqlens_k[b + 1] - o.cu_seqlens_k[b]});
  return seqs;
}

inline std::string view_shape(index_t a, index_t b, index_t c, index_t d) {
  return concat("[", a, ", ", b, ", ", c, ", ", d, "]");
}

// The shapes of Q, K, V and O (or dO) agree: [B, S_q, H_q, D], [B, S_k, H_kv, D],
// [B, S_k, H_kv, D_v], [B, S_q, H_q, D_v], with H_q a multiple of H_kv.
template <class T>
void check_head_shapes(const char* fn, const HeadsView<const T>& Q, const HeadsView<const T>& K,
                       const HeadsView<const T>& V, const char* out_name, index_t out_b, index_t out_s, index_t out_h,
                       index_t out_d) {
  const auto want = [&](const char* arg, index_t b, index_t s, index_t h, index_t d, index_t eb, index_t es,
                        index_t eh, index_t ed, const char* meaning) {
    if (b != eb || s != es || h != eh || d != ed)
      fail(fn, "argument '", arg, "' has shape ", view_shape(b, s, h, d), ", expected ", view_shape(eb, es, eh, ed),
           " (", meaning, "); Q is ", view_shape(Q.batch, Q.seq, Q.heads, Q.dim));
  };
  check_head_dim(fn, "Q", view_shape(Q.batch, Q.seq, Q.heads, Q.dim), Q.dim, "head dim");
  check_head_dim(fn, "V", view_shape(V.batch, V.seq, V.heads, V.dim), V.dim, "value dim");
  if (Q.heads < 1) fail(fn, "argument 'Q' has shape ", view_shape(Q.batch, Q.seq, Q.heads, Q.dim), ": H_q must be >= 1");
  if (K.heads < 1 || Q.heads % K.heads != 0)
    fail(fn, "argument 'K' has ", K.heads, " heads and 'Q' has ", Q.heads,
         ": H_q must be a multiple of H_kv (grouped-query attention); Q is ", view_shape(Q.batch, Q.seq, Q.heads, Q.dim),
         ", K is ", view_shape(K.batch, K.seq, K.heads, K.dim));
  want("K", K.batch, K.seq, K.heads, K.dim, Q.batch, K.seq, K.heads, Q.dim, "[B, S_k, H_kv, D]");
  want("V", V.batch, V.seq, V.heads, V.dim, Q.batch, K.seq, K.heads, V.dim, "[B, S_k, H_kv, D_v]");
  want(out_name, out_b, out_s, out_h, out_d, Q.batch, Q.seq, Q.heads, V.dim, "[B, S_q, H_q, D_v]");
}

template <class T>
void check_heads_mask(const char* fn, const HeadsMask<T>& m, const MultiHeadOptions& o, index_t B, index_t H,
                      index_t s_q, index_t s_k) {
  if (m.empty()) return;
  if (!o.cu_seqlens_q.empty())
    fail(fn, "argument 'mask' cannot be combined with cu_seqlens (varlen batches); mask each sequence's padding "
             "by packing it out instead");
  if ((m.batch != 1 && m.batch != B) || (m.heads != 1 && m.heads != H) || (m.rows != 1 && m.rows != s_q) ||
      m.cols != s_k)
    fail(fn, "argument 'mask' has shape ", view_shape(m.batch, m.heads, m.rows, m.cols), ", expected [",
         B, " or 1, ", H, " or 1, ", s_q, " or 1, ", s_k, "] ([B, H_q, S_q, S_k], size-1 dimensions broadcast)");
  for (index_t b = 0; b < m.batch; ++b)
    for (index_t h = 0; h < m.heads; ++h) check_score_mask(fn, m.head(b, h), s_q, s_k);
}

// The forward writes O while it reads the mask: they must not share memory (address ranges).
template <class T>
void check_mask_disjoint(const char* fn, const HeadsView<const T>& O, const HeadsMask<T>& m) {
  if (m.empty() || view_span(O) <= 0 || m.cols == 0) return;
  const index_t last = (m.batch - 1) * m.stride_batch + (m.heads - 1) * m.stride_head +
                       (m.rows > 1 ? (m.rows - 1) * m.stride_row : 0) + m.cols;
  const auto m0 = m.keep ? reinterpret_cast<std::uintptr_t>(m.keep) : reinterpret_cast<std::uintptr_t>(m.add);
  const auto m1 = m.keep ? reinterpret_cast<std::uintptr_t>(m.keep + last) : reinterpret_cast<std::uintptr_t>(m.add + last);
  const auto o0 = reinterpret_cast<std::uintptr_t>(O.data), o1 = reinterpret_cast<std::uintptr_t>(O.data + view_span(O));
  if (m0 < o1 && o0 < m1) fail(fn, "output 'O' overlaps argument 'mask' in memory");
}

// An operand and its name, for the finiteness checks below.
template <class T>
struct NamedView {
  const char* name;
  const HeadsView<const T>* view;
};

// The finiteness checks of `views`, one per (view, batch entry, head) in that order: their
// count, and check number t. They read every byte of the inputs, so the callers run them in
// parallel (parallel_for reports the failure of the lowest task: the first in this order).
template <class T, std::size_t N>
index_t finite_checks(const NamedView<T> (&views)[N]) {
  index_t count = 0;
  for (const NamedView<T>& nv : views) count += nv.view->batch * nv.view->heads;
  return count;
}
// Returns a bound on the head's entries (magnitude_bound), and the index of its view in
// `views` through `which`.
template <class T, std::size_t N>
double check_finite_task(const char* fn, const NamedView<T> (&views)[N], index_t t, int* which = nullptr) {
  for (std::size_t x = 0; x < N; ++x) {
    const HeadsView<const T>& v = *views[x].view;
    if (t >= v.batch * v.heads) {
      t -= v.batch * v.heads;
      continue;
    }
    const index_t b = t / v.heads, h = t % v.heads;
    if (which) *which = static_cast<int>(x);
    const double largest = magnitude_bound(v.head(b, h, 0, v.seq));
    if (!std::isfinite(largest))
      fail(fn, "argument '", views[x].name, "' has a non-finite entry in batch entry ", b, ", head ", h, " (shape ",
           view_shape(v.batch, v.seq, v.heads, v.dim), ")");
    return largest;
  }
  return 0;
}

template <class T>
void multihead_forward(const HeadsView<const T>& Q, const HeadsView<const T>& K, const HeadsView<const T>& V,
                       const HeadsView<T>& O, AttentionState<T>& state, const MultiHeadOptions& options,
                       const HeadsMask<T>& mask) {
  constexpr const char* fn = "multihead_attention_forward";
  check_view(fn, "Q", Q);
  check_view(fn, "K", K);
  check_view(fn, "V", V);
  check_view(fn, "O", O);
  check_head_shapes<T>(fn, Q, K, V, "O", O.batch, O.seq, O.heads, O.dim);
  check_pair_count(fn, Q.batch, Q.heads);
  const HeadsView<const T> Oc = O;
  check_views_disjoint(fn, "O", Oc, "Q", Q);
  check_views_disjoint(fn, "O", Oc, "K", K);
  check_views_disjoint(fn, "O", Oc, "V", V);
  const T scale = static_cast<T>(resolve_scale<T>(fn, options, Q.dim));
  const std::vector<SequenceSpan> seqs = sequences(fn, options, Q.batch, Q.seq, K.seq, Q.heads);
  check_heads_mask(fn, mask, options, Q.batch, Q.heads, Q.seq, K.seq);
  if (state.save == SaveForBackward::sus_mask) {
    check_sampler_options(fn, state.sampler, "state.sampler");
  }
  if (options.num_threads < 0) fail(fn, "options.num_threads = ", options.num_threads, " must be >= 0 (0: default)");
  check_mask_disjoint(fn, Oc, mask);
  const int threads = resolve_threads(options.num_threads);
  const NamedView<T> inputs[] = {{"Q", &Q}, {"K", &K}, {"V", &V}};
  parallel_for(finite_checks(inputs), threads, [&](index_t t, int) { check_finite_task(fn, inputs, t); });

  const index_t n_seq = static_cast<index_t>(seqs.size()), H = Q.heads, group = Q.heads / std::max<index_t>(K.heads, 1);
  constexpr index_t Br = ForwardConfig::row_block;
  state.sequences = 0;  // set when the forward succeeds: a state left by a failed call is rejected
  state.heads = H;
  state.recorded = {static_cast<double>(scale), options.causal, options.alignment, options.cu_seqlens_q,
                    options.cu_seqlens_k};
  state.lse.assign(static_cast<std::size_t>(n_seq * H), Vector<T>());
  state.masks.assign(state.save == SaveForBackward::sus_mask ? static_cast<std::size_t>(n_seq * H) : 0, Csr<T>());
  state.weights.assign(state.save == SaveForBackward::dense_weights ? static_cast<std::size_t>(n_seq * H) : 0,
                       Matrix<T>());
  // Tasks: (sequence, head, row block), in that order.
  struct Task {
    index_t seq, head, i0, rows;
  };
  std::vector<Task> tasks;
  index_t max_q = 0, max_k = 0;
  for (index_t b = 0; b < n_seq; ++b) {
    const SequenceSpan& sp = seqs[b];
    max_q = std::max(max_q, sp.n_q);
    max_k = std::max(max_k, sp.n_k);
    for (index_t h = 0; h < H; ++h) {
      state.lse[state.at(b, h)].resize(sp.n_q);
      if (state.save == SaveForBackward::dense_weights) state.weights[state.at(b, h)].resize(sp.n_q, sp.n_k);
      for (index_t i0 = 0; i0 < sp.n_q; i0 += Br) tasks.push_back({b, h, i0, std::min(Br, sp.n_q - i0)});
    }
  }
  // The SUS rows of each task, staged until every block of a head is done.
  struct Staged {
    std::vector<index_t> cols, counts;
    std::vector<T> vals;
  };
  std::vector<Staged> staged(state.save == SaveForBackward::sus_mask ? tasks.size() : 0);

  std::vector<std::unique_ptr<ForwardWorkspace<T>>> workspaces(static_cast<std::size_t>(threads));
  parallel_for(static_cast<index_t>(tasks.size()), threads, [&](index_t t, int worker) {
    const Task& task = tasks[t];
    const SequenceSpan& sp = seqs[task.seq];
    auto& ws = workspaces[static_cast<std::size_t>(worker)];
    if (!ws) ws = std::make_unique<ForwardWorkspace<T>>(max_q, max_k, Q.dim);
    const index_t g = task.head / group;
    const ConstMatrixRef<T> Qh = Q.head(sp.batch, task.head, sp.q0, sp.n_q);
    const ConstMatrixRef<T> Kg = K.head(sp.batch, g, sp.k0, sp.n_k);
    const ConstMatrixRef<T> Vg = V.head(sp.batch, g, sp.k0, sp.n_k);
    MatrixRef<T> Oh = O.head(sp.batch, task.head, sp.q0, sp.n_q);
    const index_t bh = state.at(task.seq, task.head);
    Vector<T>& lse = state.lse[bh];
    if (state.save == SaveForBackward::sus_mask) {
      SamplerOptions so = state.sampler;
      so.seed = head_seed(state.sampler.seed, task.seq, task.head);
      RowSampler<T> sampler(so);
      Staged& st = staged[t];
      forward_block<T>(fn, Qh, Kg, Vg, Oh, mask.head(sp.batch, task.head), options, scale, task.i0, task.rows, *ws,
                       [&](index_t i, const T* w, index_t len, T l) {
                         lse[i] = l;
                         st.counts.push_back(sampler.sample(i, w, len, st.cols, st.vals));
                       });
    } else if (state.save == SaveForBackward::dense_weights) {
      Matrix<T>& W = state.weights[bh];
      forward_block<T>(fn, Qh, Kg, Vg, Oh, mask.head(sp.batch, task.head), options, scale, task.i0, task.rows, *ws,
                       [&](index_t i, const T* w, index_t len, T l) {
                         lse[i] = l;
                         std::copy(w, w + len, W.row(i).data());
                         std::fill(W.row(i).data() + len, W.row(i).data() + W.cols(), T(0));
                       });
    } else {
      forward_block<T>(fn, Qh, Kg, Vg, Oh, mask.head(sp.batch, task.head), options, scale, task.i0, task.rows, *ws,
                       [&](index_t i, const T*, index_t, T l) { lse[i] = l; });
    }
  });
  workspaces.clear();
  if (state.save != SaveForBackward::sus_mask) {
    state.sequences = n_seq;
    return;
  }
  // Concatenate each head's blocks in row order (tasks are grouped by head, blocks ascending).
  for (std::size_t t0 = 0; t0 < tasks.size();) {
    std::size_t t1 = t0;
    index_t nnz = 0;
    while (t1 < tasks.size() && tasks[t1].seq == tasks[t0].seq && tasks[t1].head == tasks[t0].head)
      nnz += static_cast<index_t>(staged[t1++].cols.size());
    const SequenceSpan& sp = seqs[tasks[t0].seq];
    Csr<T>& m = state.masks[state.at(tasks[t0].seq, tasks[t0].head)];
    m = Csr<T>(sp.n_q, sp.n_k);
    m.col_indices.reserve(static_cast<std::size_t>(nnz));
    m.values.reserve(static_cast<std::size_t>(nnz));
    for (std::size_t t = t0; t < t1; ++t) {
      Staged& st = staged[t];
      for (index_t r = 0; r < tasks[t].rows; ++r)
        m.row_offsets[tasks[t].i0 + r + 1] = m.row_offsets[tasks[t].i0 + r] + st.counts[r];
      m.col_indices.insert(m.col_indices.end(), st.cols.begin(), st.cols.end());
      m.values.insert(m.values.end(), st.vals.begin(), st.vals.end());
      st = Staged();
    }
    t0 = t1;
  }
  // Sequences with n_q = 0 have no task; their (empty) masks still get their shape.
  for (index_t b = 0; b < n_seq; ++b)
    if (seqs[b].n_q == 0)
      for (index_t h = 0; h < H; ++h) state.masks[state.at(b, h)] = Csr<T>(0, seqs[b].n_k);
  state.sequences = n_seq;
}

// How the SUS multi-head backward splits its work among the threads. Both ways compute every
// sum with the same operations in the same order, so the gradients are bitwise the same
// (tested), and which one runs is a matter of speed only.
//   per_group: tasks (sequence, key/value head), each running the fused single-head kernel
//              (sparse_backward_kernel) on the heads of its group in ascending order. The
//              fastest way per entry (one pass over the mask, packed operands on huge pages),
//              but the threads have only as many tasks as groups.
//   two_pass:  rows pass in tasks of task_rows rows, then keys pass in key ranges
//              (sparse_multihead_two_pass): as many tasks as needed, at the price of a second
//              pass over the mask.
//   automatic: per_group on one thread, or when there are at least 4 groups per thread (the
//              largest go first, so the threads finish close together); two_pass otherwise.
enum class SparseSchedule { automatic, per_group, two_pass };

inline SparseSchedule resolve_schedule(SparseSchedule s, index_t groups, int threads) {
  if (s != SparseSchedule::automatic) return s;
  return threads <= 1 || groups >= 4 * index_t(threads) ? SparseSchedule::per_group : SparseSchedule::two_pass;
}

// Calls f(h, a) for the query heads h of key/value head g in sequence span sp, in ascending
// order: a holds head h's single-head views and the group's shared K, V, dK, dV. The backward
// tasks (sequence, key/value head) of both the SUS (per group) and the dense path.
template <class T, class F>
void for_group_heads(const HeadsView<const T>& Q, const HeadsView<const T>& K, const HeadsView<const T>& V,
                     const HeadsView<const T>& O, const HeadsView<const T>& dO, const HeadsView<T>& dQ,
                     const HeadsView<T>& dK, const HeadsView<T>& dV, const SequenceSpan& sp, index_t g, F&& f) {
  const index_t group = Q.heads / K.heads;
  const ConstMatrixRef<T> Kg = K.head(sp.batch, g, sp.k0, sp.n_k);
  const ConstMatrixRef<T> Vg = V.head(sp.batch, g, sp.k0, sp.n_k);
  MatrixRef<T> dKg = dK.head(sp.batch, g, sp.k0, sp.n_k);
  MatrixRef<T> dVg = dV.head(sp.batch, g, sp.k0, sp.n_k);
  for (index_t h = g * group; h < (g + 1) * group; ++h) {
    const ConstMatrixRef<T> Qh = Q.head(sp.batch, h, sp.q0, sp.n_q);
    const ConstMatrixRef<T> Oh = O.head(sp.batch, h, sp.q0, sp.n_q);
    const ConstMatrixRef<T> dOh = dO.head(sp.batch, h, sp.q0, sp.n_q);
    MatrixRef<T> dQh = dQ.head(sp.batch, h, sp.q0, sp.n_q);
    f(h, BackwardArgs<T>{Qh, Kg, Vg, Oh, dOh, dQh, dKg, dVg});
  }
}

template <class T>
void sparse_multihead_per_group(const HeadsView<const T>& Q, const HeadsView<const T>& K, const HeadsView<const T>& V,
                                const HeadsView<const T>& O, const HeadsView<const T>& dO,
                                const AttentionState<T>& state, const HeadsView<T>& dQ, const HeadsView<T>& dK,
                                const HeadsView<T>& dV, const std::vector<SequenceSpan>& seqs, T scale,
                                bool accumulate, int threads) {
  const index_t n_seq = static_cast<index_t>(seqs.size()), H = Q.heads, H_kv = K.heads, group = H / H_kv;
  // Largest group first (cost: its masks' nnz, plus the O(n·d) of each head).
  std::vector<index_t> order(static_cast<std::size_t>(n_seq * H_kv)), cost(order.size(), 0);
  for (index_t u = 0; u < n_seq * H_kv; ++u) {
    order[u] = u;
    const index_t b = u / H_kv, g = u % H_kv;
    for (index_t h = g * group; h < (g + 1) * group; ++h)
      cost[u] += state.masks[state.at(b, h)].nnz() + seqs[b].n_q + seqs[b].n_k;
  }
  std::stable_sort(order.begin(), order.end(), [&](index_t x, index_t y) { return cost[x] > cost[y]; });
  parallel_for(n_seq * H_kv, threads, [&](index_t t, int) {
    const index_t u = order[static_cast<std::size_t>(t)], b = u / H_kv, g = u % H_kv;
    for_group_heads<T>(Q, K, V, O, dO, dQ, dK, dV, seqs[b], g, [&](index_t h, const BackwardArgs<T>& a) {
      sparse_backward_kernel<T>(a, state.masks[state.at(b, h)], scale, accumulate, accumulate || h > g * group);
    });
  });
}

// The two-pass SUS backward of every (sequence, head), in three parallel phases
// (sparse_backward_rows / _keys in backward.hpp):
//   1. tasks (b, g, key chunk): K_g, V_g packed key by key (pack_key_rows). The rows pass
//      gathers their rows at random; packed, each kept key is one span in huge pages, where
//      the user's rows may be H·D apart ([B, S, H, D]) in 4 KiB pages. O(n·d) in all.
//   2. tasks (b, h, row block): dQ and dS, and the kept entries per bin of keys.
//   3. tasks (b, g, key range): dK, dV of the range, summing the heads of the group in
//      ascending order. Each group's keys are cut, at bin edges, into ranges of about equal
//      nnz: the fewest ranges for a task count that is a multiple of the thread count.
// The packed keys and every head's dS live in the calling thread's second workspace slot
// (thread_workspace<T, 1>; nothing the tasks call uses that slot), so repeated calls reuse
// their pages: fresh vectors would be zero-filled by this thread alone, a serial part of the
// call (1 MiB of dS per head at n = 8192, c = 32). Measured: docs/method.md (Multi-head
// batches and threads).
// The work of every task is fixed by the problem and the thread count only decides how the
// keys are cut, which no sum depends on: the result is bitwise the same for any count.
template <class T>
void sparse_multihead_two_pass(const HeadsView<const T>& Q, const HeadsView<const T>& K, const HeadsView<const T>& V,
                               const HeadsView<const T>& O, const HeadsView<const T>& dO, const AttentionState<T>& state,
                               const HeadsView<T>& dQ, const HeadsView<T>& dK, const HeadsView<T>& dV,
                               const std::vector<SequenceSpan>& seqs, T scale, bool accumulate, int threads) {
  constexpr index_t block = SparseBackwardConfig::task_rows, n_bins = 64, pack_keys = 1024;
  const index_t n_seq = static_cast<index_t>(seqs.size()), H = Q.heads, H_kv = K.heads, group = H / H_kv;
  const index_t d = K.dim, d_v = V.dim;
  // Workspace: each head's dS, then each group's packed keys, every part starting on a cache line.
  std::vector<index_t> dS_at(static_cast<std::size_t>(n_seq * H)), kv_at(static_cast<std::size_t>(n_seq * H_kv));
  index_t ws_size = 0;
  for (index_t b = 0; b < n_seq; ++b)
    for (index_t h = 0; h < H; ++h) {
      dS_at[b * H + h] = ws_size;
      ws_size += line_padded<T>(state.masks[state.at(b, h)].nnz());
    }
  for (index_t u = 0; u < n_seq * H_kv; ++u) {
    kv_at[u] = ws_size;
    ws_size += line_padded<T>(seqs[u / H_kv].n_k * (d + d_v));
  }
  T* ws = thread_workspace<T, 1>(ws_size);
  // Phase 1: packed K_g, V_g.
  struct Block {
    index_t seq, head, r0, r1;
  };
  std::vector<Block> pack_tasks, row_tasks, key_tasks;
  for (index_t u = 0; u < n_seq * H_kv; ++u)
    for (index_t j0 = 0; j0 < seqs[u / H_kv].n_k; j0 += pack_keys)
      pack_tasks.push_back({u / H_kv, u % H_kv, j0, std::min(j0 + pack_keys, seqs[u / H_kv].n_k)});
  parallel_for(static_cast<index_t>(pack_tasks.size()), threads, [&](index_t t, int) {
    const Block& k = pack_tasks[static_cast<std::size_t>(t)];
    const SequenceSpan& sp = seqs[k.seq];
    pack_key_rows<T>(K.head(sp.batch, k.head, sp.k0, sp.n_k), V.head(sp.batch, k.head, sp.k0, sp.n_k),
                     ws + kv_at[k.seq * H_kv + k.head], k.r0, k.r1);
  });
  std::vector<PackedKeys<T>> kv;
  for (index_t u = 0; u < n_seq * H_kv; ++u) kv.push_back(packed_key_views<T>(ws + kv_at[u], seqs[u / H_kv].n_k, d, d_v));
  // Bins of 2^shift keys, at most n_bins of them per sequence.
  std::vector<int> shift(static_cast<std::size_t>(n_seq), 0);
  for (index_t b = 0; b < n_seq; ++b)
    while (((seqs[b].n_k - 1) >> shift[b]) >= n_bins) ++shift[b];
  // Phase 2: tasks (b, h, row block).
  for (index_t b = 0; b < n_seq; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i0 = 0; i0 < seqs[b].n_q; i0 += block) row_tasks.push_back({b, h, i0, std::min(i0 + block, seqs[b].n_q)});
  std::vector<index_t> bins(row_tasks.size() * n_bins, 0);
  parallel_for(static_cast<index_t>(row_tasks.size()), threads, [&](index_t t, int) {
    const Block& k = row_tasks[static_cast<std::size_t>(t)];
    const SequenceSpan& sp = seqs[k.seq];
    const index_t bg = k.seq * H_kv + k.head / group;
    const ConstMatrixRef<T> Qh = Q.head(sp.batch, k.head, sp.q0, sp.n_q);
    const ConstMatrixRef<T> Oh = O.head(sp.batch, k.head, sp.q0, sp.n_q);
    const ConstMatrixRef<T> dOh = dO.head(sp.batch, k.head, sp.q0, sp.n_q);
    MatrixRef<T> dQh = dQ.head(sp.batch, k.head, sp.q0, sp.n_q);
    MatrixRef<T> unused = dQh;
    const BackwardArgs<T> a{Qh, kv[bg].K, kv[bg].V, Oh, dOh, dQh, unused, unused};
    sparse_backward_rows<T>(a, state.masks[state.at(k.seq, k.head)], ws + dS_at[k.seq * H + k.head], &bins[t * n_bins],
                            shift[k.seq], scale, accumulate, k.r0, k.r1);
  });
  // Phase 3: each group's keys cut into `ranges` of about equal nnz.
  std::vector<index_t> group_bins(static_cast<std::size_t>(n_seq * H_kv * n_bins), 0);
  for (std::size_t t = 0; t < row_tasks.size(); ++t)
    for (index_t x = 0; x < n_bins; ++x)
      group_bins[(row_tasks[t].seq * H_kv + row_tasks[t].head / group) * n_bins + x] += bins[t * n_bins + x];
  // Ranges per group: the fewest for a task count that is a multiple of the thread count
  // (threads / gcd(groups, threads)). Every range's task goes over all the group's query rows,
  // so more ranges cost more: one head on two threads runs 2 ranges, not 4. Measured:
  // docs/method.md (Multi-head batches and threads).
  const index_t ranges = std::max<index_t>(1, index_t(threads) / std::gcd(n_seq * H_kv, index_t(threads)));
  for (index_t u = 0; u < n_seq * H_kv; ++u) {
    const index_t b = u / H_kv, n_k = seqs[b].n_k;
    const index_t* gb = &group_bins[u * n_bins];
    const index_t used = n_k == 0 ? 0 : ((n_k - 1) >> shift[b]) + 1;
    index_t total = 0;
    for (index_t x = 0; x < used; ++x) total += gb[x];
    index_t lo = 0, hi = 0, sum = 0;
    for (index_t r = 0; r < ranges; ++r) {
      const index_t target = r + 1 == ranges ? total : total * (r + 1) / ranges;
      while (hi < used && (sum < target || r + 1 == ranges)) sum += gb[hi++];
      const index_t j0 = lo << shift[b], j1 = std::min(n_k, hi << shift[b]);
      if (j1 > j0) key_tasks.push_back({b, u % H_kv, j0, j1});
      lo = hi;
    }
  }
  parallel_for(static_cast<index_t>(key_tasks.size()), threads, [&](index_t t, int) {
    const Block& k = key_tasks[static_cast<std::size_t>(t)];
    const SequenceSpan& sp = seqs[k.seq];
    const index_t g = k.head, bg = k.seq * H_kv + g;
    MatrixRef<T> dKg = dK.head(sp.batch, g, sp.k0, sp.n_k);
    MatrixRef<T> dVg = dV.head(sp.batch, g, sp.k0, sp.n_k);
    for (index_t h = g * group; h < (g + 1) * group; ++h) {
      const ConstMatrixRef<T> Qh = Q.head(sp.batch, h, sp.q0, sp.n_q);
      const ConstMatrixRef<T> dOh = dO.head(sp.batch, h, sp.q0, sp.n_q);
      MatrixRef<T> unused = dKg;
      const BackwardArgs<T> a{Qh, kv[bg].K, kv[bg].V, Qh, dOh, unused, dKg, dVg};
      sparse_backward_keys<T>(a, state.masks[state.at(k.seq, h)], ws + dS_at[k.seq * H + h], scale,
                              accumulate || h > g * group, k.r0, k.r1);
    }
  });
}

// The outputs of a multi-head backward are finite, or sus::Error (check_gradients).
template <class T>
void check_head_gradients(const char* fn, const HeadsView<T>& dQ, const HeadsView<T>& dK, const HeadsView<T>& dV,
                          double bound, bool accumulate, double s, const InputMagnitudes& m, int threads) {
  if (gradients_surely_finite<T>(bound, accumulate)) return;
  const HeadsView<const T> cq = dQ, ck = dK, cv = dV;
  const NamedView<T> outs[] = {{"dQ", &cq}, {"dK", &ck}, {"dV", &cv}};
  parallel_for(finite_checks(outs), threads, [&](index_t t, int) {
    int x = 0;
    try {
      check_finite_task(fn, outs, t, &x);
    } catch (const Error&) {
      const HeadsView<const T>& v = *outs[x].view;
      throw_gradient_overflow(fn, outs[x].name, view_shape(v.batch, v.seq, v.heads, v.dim), s, m);
    }
  });
}

template <class T>
void multihead_backward(const HeadsView<const T>& Q, const HeadsView<const T>& K, const HeadsView<const T>& V,
                        const HeadsView<const T>& O, const HeadsView<const T>& dO, const AttentionState<T>& state,
                        const HeadsView<T>& dQ, const HeadsView<T>& dK, const HeadsView<T>& dV,
                        const MultiHeadOptions& options, SparseSchedule schedule = SparseSchedule::automatic) {
  constexpr const char* fn = "multihead_attention_backward";
  const char* in_names[] = {"Q", "K", "V", "O", "dO"};
  const HeadsView<const T>* ins[] = {&Q, &K, &V, &O, &dO};
  const char* out_names[] = {"dQ", "dK", "dV"};
  const HeadsView<T>* outs[] = {&dQ, &dK, &dV};
  for (int x = 0; x < 5; ++x) check_view(fn, in_names[x], *ins[x]);
  for (int x = 0; x < 3; ++x) check_view(fn, out_names[x], *outs[x]);
  check_head_shapes<T>(fn, Q, K, V, "O", O.batch, O.seq, O.heads, O.dim);
  check_head_shapes<T>(fn, Q, K, V, "dO", dO.batch, dO.seq, dO.heads, dO.dim);
  const auto want = [&](const char* arg, const HeadsView<T>& v, const HeadsView<const T>& like, const char* meaning) {
    if (v.batch != like.batch || v.seq != like.seq || v.heads != like.heads || v.dim != like.dim)
      fail(fn, "argument '", arg, "' has shape ", view_shape(v.batch, v.seq, v.heads, v.dim), ", expected ",
           view_shape(like.batch, like.seq, like.heads, like.dim), " (", meaning, ")");
  };
  want("dQ", dQ, Q, "like Q");
  want("dK", dK, K, "like K");
  want("dV", dV, V, "like V");
  check_pair_count(fn, Q.batch, Q.heads);
  for (int x = 0; x < 3; ++x) {
    const HeadsView<const T> out = *outs[x];
    for (int y = 0; y < 5; ++y) check_views_disjoint(fn, out_names[x], out, in_names[y], *ins[y]);
    for (int y = x + 1; y < 3; ++y) check_views_disjoint(fn, out_names[x], out, out_names[y], HeadsView<const T>(*outs[y]));
  }
  const T scale = static_cast<T>(resolve_scale<T>(fn, options, Q.dim));
  const std::vector<SequenceSpan> seqs = sequences(fn, options, Q.batch, Q.seq, K.seq, Q.heads);
  const index_t n_seq = static_cast<index_t>(seqs.size()), H = Q.heads, H_kv = K.heads, group = H / H_kv;
  if (state.save == SaveForBackward::lse_only)
    fail(fn, "argument 'state' was saved with SaveForBackward::lse_only: the backward needs sus_mask or dense_weights");
  if (state.sequences != n_seq || state.heads != H)
    fail(fn, "argument 'state' holds ", state.sequences, " sequences x ", state.heads, " heads, expected ", n_seq,
         " x ", H, " (from Q ", view_shape(Q.batch, Q.seq, Q.heads, Q.dim), ")");
  if (options.num_threads < 0) fail(fn, "options.num_threads = ", options.num_threads, " must be >= 0 (0: default)");
  const auto& rec = state.recorded;
  if (rec.scale != static_cast<double>(scale) || rec.causal != options.causal ||
      (options.causal && rec.alignment != options.alignment) || rec.cu_seqlens_q != options.cu_seqlens_q ||
      rec.cu_seqlens_k != options.cu_seqlens_k)
    fail(fn, "argument 'options' differs from the forward that filled 'state' (scale ", static_cast<double>(scale),
         " vs ", rec.scale, ", causal ", options.causal, " vs ", rec.causal, ", alignment ", to_string(options.alignment),
         " vs ", to_string(rec.alignment), ", or cu_seqlens): pass the forward's options");
  const bool sparse = state.save == SaveForBackward::sus_mask;
  if (static_cast<index_t>(sparse ? state.masks.size() : state.weights.size()) != n_seq * H)
    fail(fn, "argument 'state' has ", sparse ? state.masks.size() : state.weights.size(), " saved heads, expected ",
         n_seq * H);
  // The saved state of each (sequence, head), then the inputs' values, checked in parallel
  // (they read every byte); the failure reported is the first in this order.
  const int threads = resolve_threads(options.num_threads);
  const NamedView<T> inputs[] = {{"Q", &Q}, {"K", &K}, {"V", &V}, {"O", &O}, {"dO", &dO}};
  // Each task's bound on its entries (W̃ of its mask, or of its input head), for gradient_bound.
  std::vector<double> largest(static_cast<std::size_t>(n_seq * H + finite_checks(inputs)), 0.0);
  parallel_for(n_seq * H + finite_checks(inputs), threads, [&](index_t t, int) {
    const auto x = static_cast<std::size_t>(t);
    if (t >= n_seq * H) {
      largest[x] = check_finite_task(fn, inputs, t - n_seq * H);
      return;
    }
    const index_t b = t / H, h = t % H;
    const SequenceSpan& sp = seqs[b];
    const auto bh = state.at(b, h);
    if (sparse) {
      largest[x] = check_mask(fn, state.masks[bh], sp.n_q, sp.n_k, options,
                              concat("state.masks[", bh, "] (sequence ", b, ", head ", h, ")"));
    } else {
      check_weights_for(fn, concat("state.weights[", bh, "] (sequence ", b, ", head ", h, ")"),
                        ConstMatrixRef<T>(state.weights[bh]), sp.n_q, sp.n_k, options);
    }
  });

  // gradient_bound over every head: the inputs' bounds, and |W̃| sums bounded by the longest
  // sequence times the bound on |W̃| (the group's heads all add into one dK, dV).
  InputMagnitudes m;
  double w_max = sparse ? 0 : 1 + row_sum_tolerance<T>();
  for (index_t t = 0; sparse && t < n_seq * H; ++t) w_max = std::max(w_max, largest[static_cast<std::size_t>(t)]);
  double* by_view[] = {&m.Q, &m.K, &m.V, &m.O, &m.dO};
  for (index_t x = 0, t = n_seq * H; x < 5; ++x)  // the finiteness tasks: view by view, batch·heads each
    for (index_t end = t + inputs[x].view->batch * inputs[x].view->heads; t < end; ++t)
      *by_view[x] = std::max(*by_view[x], largest[static_cast<std::size_t>(t)]);
  index_t longest_q = 0, longest_k = 0;
  for (const SequenceSpan& sp : seqs) {
    longest_q = std::max(longest_q, sp.n_q);
    longest_k = std::max(longest_k, sp.n_k);
  }
  const double bound = sparse ? sparse_gradient_bound(m, scale, longest_q, longest_k, V.dim, w_max, group)
                              : dense_gradient_bound<T>(m, scale, longest_q, V.dim, group);
  if (sparse) {
    if (resolve_schedule(schedule, n_seq * H_kv, threads) == SparseSchedule::per_group)
      sparse_multihead_per_group<T>(Q, K, V, O, dO, state, dQ, dK, dV, seqs, scale, options.accumulate, threads);
    else
      sparse_multihead_two_pass<T>(Q, K, V, O, dO, state, dQ, dK, dV, seqs, scale, options.accumulate, threads);
    check_head_gradients<T>(fn, dQ, dK, dV, bound, options.accumulate, scale, m, threads);
    return;
  }
  // Dense: tasks (sequence, key/value head), each running the heads of its group in ascending
  // order; the first overwrites dK, dV (unless accumulating) and the others add to them.
  parallel_for(n_seq * H_kv, threads, [&](index_t t, int) {
    const index_t b = t / H_kv, g = t % H_kv;
    for_group_heads<T>(Q, K, V, O, dO, dQ, dK, dV, seqs[b], g, [&](index_t h, const BackwardArgs<T>& a) {
      dense_backward_kernel<T>(a, ConstMatrixRef<T>(state.weights[state.at(b, h)]), scale, options,
                               options.accumulate, options.accumulate || h > g * group);
    });
  });
  check_head_gradients<T>(fn, dQ, dK, dV, bound, options.accumulate, scale, m, threads);
}

}  // namespace detail

/// Multi-head forward: for every sequence b and query head h,
///   O[b, :, h] = softmax(s·Q[b, :, h]·K[b, :, g]ᵀ [+ causal] [+ mask])·V[b, :, g],  g = h / (H_q / H_kv),
/// saving in `state` what state.save asks for (set it, and state.sampler, first).
///   Q: [B, S_q, H_q, D], K: [B, S_k, H_kv, D], V: [B, S_k, H_kv, D_v], O: [B, S_q, H_q, D_v]
///   (caller-owned, overwritten; must not overlap Q, K or V). With options.cu_seqlens_*: B = 1
///   and the sequences are packed along S. mask (optional): see HeadsMask.
/// Peak memory: the outputs and state, plus one row block x max n_k score buffer per thread.
/// Throws sus::Error naming the argument on bad shapes, strides, offsets or values.
inline void multihead_attention_forward(const HeadsView<const float>& Q, const HeadsView<const float>& K,
                                        const HeadsView<const float>& V, const HeadsView<float>& O,
                                        AttentionState<float>& state, const MultiHeadOptions& options = {},
                                        const HeadsMask<float>& mask = {}) {
  detail::multihead_forward<float>(Q, K, V, O, state, options, mask);
}
inline void multihead_attention_forward(const HeadsView<const double>& Q, const HeadsView<const double>& K,
                                        const HeadsView<const double>& V, const HeadsView<double>& O,
                                        AttentionState<double>& state, const MultiHeadOptions& options = {},
                                        const HeadsMask<double>& mask = {}) {
  detail::multihead_forward<double>(Q, K, V, O, state, options, mask);
}

/// Multi-head backward from the saved state: the SUS backward (state.save = sus_mask,
/// O(nnz·d)) or the exact dense backward (dense_weights). Same shapes and options as the
/// forward (pass the same options; the mask is not needed: the saved state has it).
///   dO: like O. dQ: like Q, dK: like K, dV: like V — caller-owned; overwritten, or added to
///   when options.accumulate. Grouped heads add into their shared dK, dV in ascending head
///   order. Outputs must not overlap inputs or each other.
/// Scratch: the SUS backward keeps its buffers (dS, one value per kept entry, and K, V packed
/// key by key) in per-thread workspaces that grow to the largest call and are reused by the
/// next, freed when the thread exits.
inline void multihead_attention_backward(const HeadsView<const float>& Q, const HeadsView<const float>& K,
                                         const HeadsView<const float>& V, const HeadsView<const float>& O,
                                         const HeadsView<const float>& dO, const AttentionState<float>& state,
                                         const HeadsView<float>& dQ, const HeadsView<float>& dK,
                                         const HeadsView<float>& dV, const MultiHeadOptions& options = {}) {
  detail::multihead_backward<float>(Q, K, V, O, dO, state, dQ, dK, dV, options);
}
inline void multihead_attention_backward(const HeadsView<const double>& Q, const HeadsView<const double>& K,
                                         const HeadsView<const double>& V, const HeadsView<const double>& O,
                                         const HeadsView<const double>& dO, const AttentionState<double>& state,
                                         const HeadsView<double>& dQ, const HeadsView<double>& dK,
                                         const HeadsView<double>& dV, const MultiHeadOptions& options = {}) {
  detail::multihead_backward<double>(Q, K, V, O, dO, state, dQ, dK, dV, options);
}

}  // namespace sus
