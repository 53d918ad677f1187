// Fuzz target (a): a Csr mask from arbitrary bytes -> Csr::validate -> the sparse backward.
//
// The mask is built mostly valid (rows of increasing columns) and then mutated (any rows,
// cols, offsets, columns, values, vector lengths, edge values such as 2^63 − 1 included).
// Invariants:
//   - Csr::validate accepts exactly the masks a plain reference check accepts, and rejects
//     the others with a sus::Error;
//   - attention_backward_sparse accepts only valid arguments (shapes, a valid mask that
//     respects the causal limit, finite inputs and scale), rejecting the rest with a
//     sus::Error; when it accepts, dQ, dK, dV are finite and nothing outside them is written
//     (exact-size inputs; outputs with sentinel pad columns, exact-size allocations);
//   - the key-blocked and split kernels give the same values for any block size (the same
//     bits up to the sign of zero).
//
// With flag 64, the masks of B x H heads go into an AttentionState for the multi-head backward
// instead (run_multihead).
//
// Input: [flags] [n_q] [n_k] [d] [d_v] [scale: 1 or 9] [pad] [rows...] [mutations...]
//        [max_per_row] [block sizes: 2] then matrix elements; with flag 64, after the scale:
//        [B] [H_kv] [group] then B·H masks [rows...] [mutations...], then elements.
#include "fuzz_common.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

namespace {

using namespace sus_fuzz;

// Head dims: small ones, and the 64 and 128 of the register kernels.
index_t head_dim(Reader& r) {
  const index_t dims[] = {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64, 128, 0, 6, 33, 1};
  return dims[r.byte() % 16];
}

// The reference for Csr::validate: every invariant, overflow-safe, in the plainest form.
template <class T>
bool csr_valid(const sus::Csr<T>& m, index_t max_per_row) {
  if (m.rows < 0 || m.cols < 0) return false;
  if (static_cast<std::uint64_t>(m.row_offsets.size()) != static_cast<std::uint64_t>(m.rows) + 1) return false;
  if (m.col_indices.size() != m.values.size()) return false;
  const index_t nnz = static_cast<index_t>(m.col_indices.size());
  if (m.row_offsets[0] != 0 || m.row_offsets.back() != nnz) return false;
  for (index_t i = 0; i < m.rows; ++i) {
    const index_t b = m.row_offsets[i], e = m.row_offsets[i + 1];
    if (e < b || e > nnz) return false;
    if (max_per_row >= 0 && e - b > max_per_row) return false;
    for (index_t p = b; p < e; ++p) {
      const index_t j = m.col_indices[p];
      if (j < 0 || j >= m.cols || (p > b && j <= m.col_indices[p - 1])) return false;
      if (!std::isfinite(static_cast<double>(m.values[p]))) return false;
    }
  }
  return true;
}

// A mask of n_q rows, mostly valid: each row a run of increasing columns below its limit
// (n_k, or the causal one), any column from a raw byte; then up to three mutations.
template <class T>
sus::Csr<T> decode_mask(Reader& r, index_t n_q, index_t n_k, const sus::AttentionOptions& o) {
  sus::Csr<T> m;
  m.rows = n_q;
  m.cols = n_k;
  m.row_offsets.assign(static_cast<std::size_t>(n_q + 1), 0);
  for (index_t i = 0; i < n_q; ++i) {
    const index_t count = r.small(12), limit = sus::detail::visible_keys(i, n_q, n_k, o);
    index_t j = -1;
    for (index_t t = 0; t < count; ++t) {
      const std::uint8_t s = r.byte();
      if (s >= 0xF0) {
        j = r.wide(n_k);  // anything: out of range, repeated, decreasing
      } else {
        j = std::min(std::max<index_t>(j, -1), limit) + 1 + s % 4;  // after a raw column too
        if (j >= limit) break;
      }
      m.col_indices.push_back(j);
      m.values.push_back(r.value<T>());
    }
    m.row_offsets[i + 1] = static_cast<index_t>(m.col_indices.size());
  }
  const index_t mutations = r.small(3);
  for (index_t t = 0; t < mutations; ++t) {
    const index_t nnz = static_cast<index_t>(m.col_indices.size());
    const std::uint8_t kind = r.byte();
    switch (kind % 10) {
      case 0: m.rows = r.wide(n_q); break;
      case 1: m.cols = r.wide(n_k); break;
      case 2:
        if (!m.row_offsets.empty()) {
          const index_t at = r.small(static_cast<index_t>(m.row_offsets.size()) - 1);
          m.row_offsets[at] = r.wide(nnz);
        }
        break;
      case 3:
        if (!m.row_offsets.empty()) m.row_offsets.pop_back();
        break;
      case 4: m.row_offsets.push_back(r.wide(nnz)); break;
      case 5: m.col_indices.push_back(r.wide(n_k)); break;
      case 6: m.values.push_back(r.value<T>()); break;
      case 7:
        if (kind & 16) {
          if (!m.values.empty()) m.values.pop_back();
        } else if (!m.col_indices.empty()) {
          m.col_indices.pop_back();
        }
        break;
      case 8:
        if (nnz > 0) {
          const index_t at = r.small(nnz - 1);
          m.col_indices[at] = r.wide(n_k);
        }
        break;
      default:
        if (!m.values.empty()) {
          const index_t at = r.small(static_cast<index_t>(m.values.size()) - 1);
          m.values[at] = r.value<T>();
        }
        break;
    }
  }
  return m;
}

// An exact-size matrix (ASan catches any read past it) of decoded elements.
template <class T>
sus::Matrix<T> decode_matrix(Reader& r, index_t rows, index_t cols) {
  sus::Matrix<T> m(rows, cols);
  for (index_t k = 0; k < m.size(); ++k) m.data()[k] = r.element<T>();
  return m;
}

template <class T>
bool all_finite(const sus::Matrix<T>& m) {
  return sus_fuzz::all_finite(m.data(), static_cast<std::size_t>(m.size()));
}

// Whether every entry of a valid n_q x n_k mask lies where a causal query may look.
template <class T>
bool respects_causal(const sus::Csr<T>& m, const sus::AttentionOptions& o) {
  if (!o.causal) return true;
  for (index_t i = 0; i < m.rows; ++i)
    if (m.row_nnz(i) > 0 && m.col_indices[m.row_offsets[i + 1] - 1] >= sus::detail::visible_keys(i, m.rows, m.cols, o))
      return false;
  return true;
}

// Multi-head: B x H masks decoded like the single-head one, put in an AttentionState by hand,
// Q, K, V, O, dO and the outputs in exact-size [B, S, H, D] buffers -> multihead_attention_backward.
// Accepted: gradients finite and equal to single-head backwards over the same head views (a
// group's first head overwriting dK, dV unless accumulating, the others adding).
template <class T>
void run_multihead(Reader& r, index_t n_q, index_t n_k, index_t d, index_t d_v, const sus::AttentionOptions& o) {
  const index_t B = 1 + r.small(1), H_kv = 1 + r.small(1), H = H_kv * (1 + r.small(1)), group = H / H_kv;
  sus::AttentionState<T> state;
  state.save = sus::SaveForBackward::sus_mask;
  state.sequences = B;
  state.heads = H;
  const double scale = o.scale ? *o.scale : 1 / std::sqrt(static_cast<double>(d));
  state.recorded.scale = static_cast<double>(static_cast<T>(scale));
  state.recorded.causal = o.causal;
  state.recorded.alignment = o.alignment;
  for (index_t k = 0; k < B * H; ++k) state.masks.push_back(decode_mask<T>(r, n_q, n_k, o));
  sus::MultiHeadOptions mo;
  static_cast<sus::AttentionOptions&>(mo) = o;
  mo.num_threads = 1;
  const auto buffer = [&](index_t S, index_t heads, index_t D) {
    std::vector<T> v(static_cast<std::size_t>(B * S * heads * D));
    for (T& x : v) x = r.element<T>();
    return v;
  };
  const std::vector<T> Q = buffer(n_q, H, d), K = buffer(n_k, H_kv, d), V = buffer(n_k, H_kv, d_v),
                       O = buffer(n_q, H, d_v), dO = buffer(n_q, H, d_v);
  std::vector<T> dQ = buffer(n_q, H, d), dK = buffer(n_k, H_kv, d), dV = buffer(n_k, H_kv, d_v);
  for (std::vector<T>* g : {&dQ, &dK, &dV})
    for (T& x : *g) x = o.accumulate && std::isfinite(static_cast<double>(x)) ? x : std::numeric_limits<T>::quiet_NaN();
  const std::vector<T> dQ0 = dQ, dK0 = dK, dV0 = dV;
  const auto view = [&](const std::vector<T>& v, index_t S, index_t heads, index_t D) {
    return sus::bshd(v.empty() ? nullptr : v.data(), B, S, heads, D);
  };
  const auto out_view = [&](std::vector<T>& v, index_t S, index_t heads, index_t D) {
    return sus::bshd(v.empty() ? nullptr : v.data(), B, S, heads, D);
  };
  try {
    sus::multihead_attention_backward(view(Q, n_q, H, d), view(K, n_k, H_kv, d), view(V, n_k, H_kv, d_v),
                                      view(O, n_q, H, d_v), view(dO, n_q, H, d_v), state, out_view(dQ, n_q, H, d),
                                      out_view(dK, n_k, H_kv, d), out_view(dV, n_k, H_kv, d_v), mo);
  } catch (const sus::Error&) {
    return;
  }
  const char* fn = "multihead_attention_backward";
  FUZZ_CHECK(d >= 1 && d_v >= 1 && std::isfinite(scale), fn, " accepted d = ", d, ", d_v = ", d_v, ", scale ", scale);
  for (const sus::Csr<T>& m : state.masks)
    FUZZ_CHECK(csr_valid(m, -1) && m.rows == n_q && m.cols == n_k && respects_causal(m, o), fn,
               " accepted an invalid or misshapen saved mask");
  FUZZ_CHECK(sus_fuzz::all_finite(Q.data(), Q.size()) && sus_fuzz::all_finite(K.data(), K.size()) &&
                 sus_fuzz::all_finite(V.data(), V.size()) && sus_fuzz::all_finite(O.data(), O.size()) &&
                 sus_fuzz::all_finite(dO.data(), dO.size()),
             fn, " accepted a non-finite input");
  const bool finite = sus_fuzz::all_finite(dQ.data(), dQ.size()) && sus_fuzz::all_finite(dK.data(), dK.size()) &&
                      sus_fuzz::all_finite(dV.data(), dV.size());
  FUZZ_CHECK(finite, fn, " returned a non-finite gradient");

  // The same heads one at a time through the single-head backward.
  using CMap = Eigen::Map<const sus::Matrix<T>, 0, Eigen::OuterStride<>>;
  using MMap = Eigen::Map<sus::Matrix<T>, 0, Eigen::OuterStride<>>;
  std::vector<T> sQ = dQ0, sK = dK0, sV = dV0;
  const auto cmap = [&](const std::vector<T>& v, index_t b, index_t h, index_t S, index_t heads, index_t D) {
    return CMap(v.empty() ? nullptr : v.data() + (b * S * heads + h) * D, S, D, Eigen::OuterStride<>(heads * D));
  };
  const auto mmap = [&](std::vector<T>& v, index_t b, index_t h, index_t S, index_t heads, index_t D) {
    return MMap(v.empty() ? nullptr : v.data() + (b * S * heads + h) * D, S, D, Eigen::OuterStride<>(heads * D));
  };
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      const index_t g = h / group;
      sus::AttentionOptions ho = o;
      ho.accumulate = o.accumulate || h > g * group;
      auto dQh = mmap(sQ, b, h, n_q, H, d);
      auto dKh = mmap(sK, b, g, n_k, H_kv, d);
      auto dVh = mmap(sV, b, g, n_k, H_kv, d_v);
      if (ho.accumulate && !o.accumulate) dQh.setZero();  // adds dK, dV of the group; dQ_h from zero
      sus::attention_backward_sparse(cmap(Q, b, h, n_q, H, d), cmap(K, b, g, n_k, H_kv, d),
                                     cmap(V, b, g, n_k, H_kv, d_v), cmap(O, b, h, n_q, H, d_v),
                                     cmap(dO, b, h, n_q, H, d_v), state.masks[state.at(b, h)], dQh, dKh, dVh, ho);
    }
  FUZZ_CHECK(same_values(sQ, dQ) && same_values(sK, dK) && same_values(sV, dV), fn,
             " and single-head backwards over the same heads differ (B = ", B, ", H = ", H, ", H_kv = ", H_kv,
             "): ", difference("dQ", dQ, sQ), difference("dK", dK, sK), difference("dV", dV, sV));
}

template <class T>
void run(Reader& r, std::uint8_t flags) {
  const index_t n_q = r.small(40), n_k = r.small(40), d = head_dim(r), d_v = head_dim(r);
  sus::AttentionOptions o;
  o.causal = flags & 2;
  o.alignment = flags & 4 ? sus::CausalAlignment::bottom_right : sus::CausalAlignment::top_left;
  o.accumulate = flags & 8;
  if (flags & 16) {
    const std::uint8_t b = r.byte();
    o.scale = b < 0xC0 ? (b - 96) / 16.0 : r.value<double>();  // moderate, or anything
  }
  if (flags & 64) return run_multihead<T>(r, n_q, n_k, d, d_v, o);
  const index_t pad = flags & 32 ? 1 + r.small(3) : 0;
  const sus::Csr<T> mask = decode_mask<T>(r, n_q, n_k, o);

  // Csr::validate against the reference, with and without a row limit.
  const std::uint8_t limit_byte = r.byte();
  const index_t max_per_row = limit_byte < 0x80 ? -1 : limit_byte % 16;
  for (const index_t limit : {index_t{-1}, max_per_row}) {
    const bool expected = csr_valid(mask, limit);
    try {
      mask.validate(limit);
      FUZZ_CHECK(expected, "Csr::validate(", limit, ") accepted an invalid ", mask.rows, "x", mask.cols, " mask (",
                 mask.row_offsets.size(), " offsets, ", mask.col_indices.size(), " columns, ", mask.values.size(),
                 " values)");
    } catch (const sus::Error& e) {
      FUZZ_CHECK(!expected, "Csr::validate(", limit, ") rejected a valid mask: ", e.what());
    }
  }

  const index_t block_keys = 1 + r.small(40), range_keys = 1 + r.small(40);
  const sus::Matrix<T> Q = decode_matrix<T>(r, n_q, d), K = decode_matrix<T>(r, n_k, d),
                       V = decode_matrix<T>(r, n_k, d_v), O = decode_matrix<T>(r, n_q, d_v),
                       dO = decode_matrix<T>(r, n_q, d_v);
  GuardedMatrix<T> dQ(n_q, d, pad), dK(n_k, d, pad), dV(n_k, d_v, pad);
  for (GuardedMatrix<T>* g : {&dQ, &dK, &dV}) {
    // Accumulating: a finite start; overwriting: NaN, so that an element left unwritten shows.
    if (o.accumulate) {
      for (std::size_t k = 0; k < g->buf.size(); ++k)
        if (g->inside(k)) g->buf[k] = r.element<T>();
    } else {
      g->fill(std::numeric_limits<T>::quiet_NaN());
    }
  }
  const GuardedMatrix<T> dQ0 = dQ, dK0 = dK, dV0 = dV;
  auto dQm = dQ.map();
  auto dKm = dK.map();
  auto dVm = dV.map();
  try {
    sus::attention_backward_sparse(Q, K, V, O, dO, mask, dQm, dKm, dVm, o);
  } catch (const sus::Error&) {
    return;
  }
  const bool scale_ok = !o.scale || std::isfinite(static_cast<T>(*o.scale));
  FUZZ_CHECK(d >= 1 && d_v >= 1 && scale_ok, "attention_backward_sparse accepted d = ", d, ", d_v = ", d_v,
             ", scale = ", o.scale ? *o.scale : 0.0);
  FUZZ_CHECK(mask.rows == n_q && mask.cols == n_k && csr_valid(mask, -1) && respects_causal(mask, o),
             "attention_backward_sparse accepted an invalid or misshapen mask (", mask.rows, "x", mask.cols, " for ", n_q,
             "x", n_k, ")");
  FUZZ_CHECK(all_finite(Q) && all_finite(K) && all_finite(V) && all_finite(O) && all_finite(dO),
             "attention_backward_sparse accepted a non-finite input");
  dQ.check("dQ");
  dK.check("dK");
  dV.check("dV");

  // The key-blocked and split kernels, any block size: the same values (bits, up to the sign
  // of zero).
  const T s = static_cast<T>(sus::detail::resolve_scale<T>("fuzz_csr", o, d));
  const sus::ConstMatrixRef<T> Qr(Q), Kr(K), Vr(V), Or(O), dOr(dO);
  for (int variant = 0; variant < 2; ++variant) {
    GuardedMatrix<T> dQ2 = dQ0, dK2 = dK0, dV2 = dV0;
    auto dQ2m = dQ2.map();
    auto dK2m = dK2.map();
    auto dV2m = dV2.map();
    sus::MatrixRef<T> dQ2r(dQ2m), dK2r(dK2m), dV2r(dV2m);
    const sus::detail::BackwardArgs<T> a{Qr, Kr, Vr, Or, dOr, dQ2r, dK2r, dV2r};
    if (variant == 0) sus::detail::sparse_backward_blocked<T>(a, mask, s, o.accumulate, o.accumulate, block_keys);
    else sus::detail::sparse_backward_split<T>(a, mask, s, o.accumulate, o.accumulate, range_keys);
    const char* name = variant == 0 ? "sparse_backward_blocked" : "sparse_backward_split";
    const index_t keys = variant == 0 ? block_keys : range_keys;
    FUZZ_CHECK(same_values(dQ2.buf, dQ.buf) && same_values(dK2.buf, dK.buf) && same_values(dV2.buf, dV.buf), name,
               " (", keys, " keys) and attention_backward_sparse differ: ", difference("dQ", dQ2.buf, dQ.buf),
               difference("dK", dK2.buf, dK.buf), difference("dV", dV2.buf, dV.buf));
  }
}

}  // namespace

SUS_FUZZ_ENTRY_POINT(run)
