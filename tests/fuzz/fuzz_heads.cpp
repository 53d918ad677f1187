// Fuzz target (b): HeadsView sizes, strides and extents (plus cu_seqlens, grouped-query head
// counts, causal alignment, score masks, thread counts) decoded from bytes ->
// multihead_attention_forward (every SaveForBackward) -> multihead_attention_backward.
//
// Every view gets its own allocation of exactly the elements the harness computes it spans
// (or of its declared extent), so ASan catches any access outside. Sizes and strides may be
// huge (2^62, 2^63 − 1, ...): such views are never allocated nor walked by the harness; the
// library must reject them (they exceed their extent) or, when they address nothing (S = 0),
// do nothing, quickly (libFuzzer's -timeout catches a loop over a huge batch).
// Invariants:
//   - every rejection is a sus::Error;
//   - an accepted view addresses no element twice and stays inside its allocation;
//   - the forward writes O only inside its view and leaves it finite there; the inputs are
//     unchanged; the state has one lse vector per (sequence, head) of n_q values (finite, or
//     −inf for a query that sees no key), one valid n_q x n_k mask per (sequence, head) with
//     finite values, <= c entries per row for the systematic draw, none above the causal limit;
//   - the backward writes dQ, dK, dV only inside their views, finite there (every element of a
//     view is written: views start as NaN unless accumulating); the two-pass schedule gives the
//     same values as the per-group one; options that differ from the forward's are rejected.
//
// Input: [flags] [save, sampler...] [geometry...] [layout + extent per view...] [mask...]
//        then elements.
#include "fuzz_common.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>

namespace {

using namespace sus_fuzz;

__extension__ typedef __int128 wide_t;  // exact products of index_t sizes

constexpr index_t kMaxAlloc = index_t{1} << 15;  // elements per buffer

index_t head_dim(Reader& r) {
  const index_t dims[] = {1, 2, 3, 4, 5, 8, 16, 0, 1, 2, 7, 64, 3, 4, 9, 1};
  return dims[r.byte() % 16];
}

// A view over a buffer of its own. `inside` marks the buffer elements the view addresses
// (filled when the view addresses at most kMaxAlloc elements; `countable` says whether it
// does); `twice` records an element addressed twice.
template <class T>
struct Buffer {
  std::vector<T> buf;
  sus::HeadsView<T> view;
  std::vector<char> inside;
  bool countable = false, twice = false;
  wide_t span = 0;  // 1 + the largest offset addressed, 0 if none (exact)
};

// Sums and products of sizes, saturated at ±2^100 (far above any index_t, far below overflow).
constexpr wide_t kCap = wide_t(1) << 100;
wide_t sat(wide_t x) { return x > kCap ? kCap : x < -kCap ? -kCap : x; }
wide_t mul(wide_t a, wide_t b) {
  const wide_t ma = a < 0 ? -a : a, mb = b < 0 ? -b : b;
  if (ma != 0 && mb > kCap / ma) return (a < 0) != (b < 0) ? -kCap : kCap;
  return a * b;
}
wide_t add(wide_t a, wide_t b) { return sat(sat(a) + sat(b)); }

wide_t exact_span(index_t B, index_t S, index_t H, index_t D, index_t sb, index_t ss, index_t sh) {
  if (B <= 0 || S <= 0 || H <= 0 || D <= 0) return 0;
  return add(add(mul(B - 1, sb), mul(S - 1, ss)), add(mul(H - 1, sh), D));
}

// Decodes a layout and an extent for a [B, S, H, D] view, allocates its buffer and fills it
// with `fill` (or decoded elements when fill is null).
template <class T>
void decode_view(Reader& r, Buffer<T>& out, index_t B, index_t S, index_t H, index_t D,
                 const std::common_type_t<T>* fill) {
  // Strides of the usual layouts are computed exactly and saturated at 2^63 − 1 (huge sizes).
  wide_t wb, ws, wh;
  const std::uint8_t layout = r.byte();
  switch (layout % 5) {
    case 0:  // bshd
      wh = D, ws = mul(H, D), wb = mul(S, ws);
      break;
    case 1:  // bhsd
      ws = D, wh = mul(S, D), wb = mul(H, wh);
      break;
    case 2:  // bshd with padding after each head, row and batch entry
      wh = add(D, r.small(3));
      ws = add(mul(H, wh), r.small(3));
      wb = add(mul(S, ws), r.small(3));
      break;
    case 3:  // heads-major with padding
      ws = add(D, r.small(3));
      wh = add(mul(S, ws), r.small(3));
      wb = add(mul(H, wh), r.small(3));
      break;
    default:  // anything, edge values included
      wb = r.wide(64), ws = r.wide(64), wh = r.wide(64);
      break;
  }
  const auto saturate = [](wide_t x) {
    constexpr index_t kMax = std::numeric_limits<index_t>::max();
    return x > kMax ? kMax : x < -kMax ? -kMax : static_cast<index_t>(x);
  };
  const index_t sb = saturate(wb), ss = saturate(ws), sh = saturate(wh);
  const bool sizes_ok = B >= 0 && S >= 0 && H >= 0 && D >= 0 && sb >= 0 && ss >= 0 && sh >= 0;
  out.span = sizes_ok ? exact_span(B, S, H, D, sb, ss, sh) : 0;
  // Extent: exact, one short (must be rejected), unknown (-1), or a few more.
  const std::uint8_t e = r.byte();
  index_t extent = -1;
  std::size_t alloc = 0;
  if (out.span <= kMaxAlloc) {
    const index_t span = static_cast<index_t>(out.span);
    switch (e % 4) {
      case 0: extent = span; break;
      case 1: extent = span > 0 ? span - 1 : 0; break;
      case 2: extent = -1; break;
      default: extent = span + r.small(4); break;
    }
    alloc = static_cast<std::size_t>(extent < 0 ? span : extent);
  } else {  // never allocated: the declared extent is all the caller owns
    extent = r.small(16);
    alloc = static_cast<std::size_t>(extent);
  }
  out.buf.resize(alloc);
  for (std::size_t k = 0; k < alloc; ++k) out.buf[k] = fill ? *fill : r.element<T>();
  T* data = alloc > 0 ? out.buf.data() : nullptr;
  if (alloc == 0 && e >= 0x80) data = reinterpret_cast<T*>(alignof(T) * 16);  // dangling, never to be read
  out.view = sus::HeadsView<T>(data, B, S, H, D, sb, ss, sh, extent);

  // What the view addresses, when that is at most kMaxAlloc elements inside the buffer.
  out.inside.assign(alloc, 0);
  const wide_t count = sizes_ok ? mul(mul(B, S), mul(H, D)) : -1;
  out.countable = count >= 0 && count <= kMaxAlloc && out.span <= static_cast<wide_t>(alloc);
  if (!out.countable || count == 0) return;
  for (index_t b = 0; b < B; ++b)
    for (index_t s = 0; s < S; ++s)
      for (index_t h = 0; h < H; ++h)
        for (index_t k = 0; k < D; ++k) {
          char& c = out.inside[static_cast<std::size_t>(b * sb + s * ss + h * sh + k)];
          out.twice |= c != 0;
          c = 1;
        }
}

// An accepted view: it addresses each element once, inside its buffer.
template <class T>
void check_accepted(const char* fn, const char* name, const Buffer<T>& v) {
  const auto& x = v.view;
  FUZZ_CHECK(v.countable && !v.twice, fn, " accepted view ", name, " [", x.batch, ", ", x.seq, ", ", x.heads, ", ",
             x.dim, "] strides [", x.stride_batch, ", ", x.stride_seq, ", ", x.stride_head, "] extent ", x.extent,
             " in a buffer of ", v.buf.size(), " elements",
             v.twice ? ": it addresses an element twice" : ": it is not inside its buffer");
}

// An output after an accepted call: finite inside its view, the sentinel outside.
template <class T>
void check_output(const char* fn, const char* name, const Buffer<T>& v) {
  for (std::size_t k = 0; k < v.buf.size(); ++k) {
    if (v.inside[k])
      FUZZ_CHECK(std::isfinite(static_cast<double>(v.buf[k])), fn, ": output ", name,
                 " has a non-finite element at offset ", k, ": ", v.buf[k]);
    else
      FUZZ_CHECK(is_sentinel(v.buf[k]), fn, " wrote output ", name, " at offset ", k, ", outside its view [",
                 v.view.batch, ", ", v.view.seq, ", ", v.view.heads, ", ", v.view.dim, "] strides [",
                 v.view.stride_batch, ", ", v.view.stride_seq, ", ", v.view.stride_head, "]");
  }
}

// An output starts as the sentinel outside its view and, inside, NaN (overwritten: an element
// left unwritten shows) or a decoded finite value (accumulated into).
template <class T>
void prepare_output(Reader& r, Buffer<T>& v, bool accumulate) {
  for (std::size_t k = 0; k < v.buf.size(); ++k) {
    if (!v.inside[k]) continue;
    if (accumulate) {
      T x = r.element<T>();
      v.buf[k] = std::isfinite(static_cast<double>(x)) ? x : T(1);
    } else {
      v.buf[k] = std::numeric_limits<T>::quiet_NaN();
    }
  }
}

template <class T>
sus::HeadsView<const T> cview(const Buffer<T>& v) {
  return sus::HeadsView<const T>(v.view);
}

template <class T>
void run(Reader& r, std::uint8_t flags) {
  sus::MultiHeadOptions o;
  o.causal = flags & 2;
  o.alignment = flags & 4 ? sus::CausalAlignment::bottom_right : sus::CausalAlignment::top_left;
  o.accumulate = flags & 8;
  const bool varlen = flags & 32, huge = flags & 64, masked = flags & 128;
  if (flags & 16) {
    const std::uint8_t b = r.byte();
    o.scale = b < 0xC0 ? (b - 96) / 16.0 : r.value<double>();
  }
  const std::uint8_t threads = r.byte();
  o.num_threads = threads < 0xF0 ? threads % 3 : -1;

  sus::AttentionState<T> state;
  const std::uint8_t sv = r.byte();
  state.save = static_cast<sus::SaveForBackward>(sv % 3);
  state.sampler.budget = sv & 4 ? sus::Budget::waterfill : sus::Budget::paper;
  state.sampler.draw = sv & 8 ? sus::Draw::independent : sus::Draw::systematic;
  const std::uint8_t cb = r.byte();
  state.sampler.c = cb < 0xF0 ? 1 + cb % 16 : static_cast<int>(r.wide(0));
  state.sampler.seed = r.byte();

  // Geometry: small sizes, or anything (huge).
  index_t B, S_q, S_k, H_kv, group, D, D_v;
  if (huge) {
    B = r.wide(3), S_q = r.wide(6), S_k = r.wide(6), H_kv = r.wide(3), group = r.wide(2), D = r.wide(8),
    D_v = r.wide(8);
  } else {
    B = r.small(3), S_q = r.small(12), S_k = r.small(12), H_kv = r.small(3), group = 1 + r.small(2), D = head_dim(r),
    D_v = head_dim(r);
  }
  const wide_t H_wide = mul(H_kv, group);
  const bool H_fits = H_wide <= std::numeric_limits<index_t>::max() && H_wide >= std::numeric_limits<index_t>::min();
  const index_t H_q = H_fits ? static_cast<index_t>(H_wide) : H_kv;
  if (varlen) {  // one packed batch of up to 4 sequences, then maybe one disturbance
    const index_t n = r.small(4);
    o.cu_seqlens_q.assign(1, 0);
    o.cu_seqlens_k.assign(1, 0);
    for (index_t b = 0; b < n; ++b) {
      o.cu_seqlens_q.push_back(o.cu_seqlens_q.back() + r.small(6));
      o.cu_seqlens_k.push_back(o.cu_seqlens_k.back() + r.small(6));
    }
    B = 1;
    if (!huge) S_q = o.cu_seqlens_q.back(), S_k = o.cu_seqlens_k.back();
    const std::uint8_t m = r.byte();
    auto& cu = m & 1 ? o.cu_seqlens_k : o.cu_seqlens_q;
    switch (m >> 1) {
      case 1: cu.pop_back(); break;
      case 2: {
        const index_t at = r.small(static_cast<index_t>(cu.size()) - 1);
        cu[at] = r.wide(12);
        break;
      }
      case 3: B = r.wide(3); break;
      default: break;
    }
  }


  const T nan_fill = sentinel<T>();
  Buffer<T> Q, K, V, O;
  decode_view(r, Q, B, S_q, H_q, D, nullptr);
  decode_view(r, K, B, S_k, H_kv, D, nullptr);
  decode_view(r, V, B, S_k, H_kv, D_v, nullptr);
  decode_view(r, O, B, S_q, H_q, D_v, &nan_fill);
  prepare_output(r, O, false);

  // An optional boolean or additive score mask, [mb, mh, mr, S_k] with size-1 dimensions
  // shared; exact-size allocation.
  sus::HeadsMask<T> mask;
  std::unique_ptr<bool[]> keep;
  std::vector<T> add;
  const std::uint8_t m = masked && !huge ? r.byte() : 0;
  const index_t mb = m & 1 ? B : 1, mh = m & 2 ? H_q : 1, mr = m & 4 ? S_q : 1, mc = m & 8 ? S_k + 1 : S_k;
  if (masked && !huge && mul(mul(mb, mh), mul(mr, mc)) <= kMaxAlloc && std::min({mb, mh, mr, mc}) >= 0) {
    const index_t n = mb * mh * mr * mc;
    if (m & 16) {
      add.resize(static_cast<std::size_t>(n));
      for (T& a : add) {
        const std::uint8_t b = r.byte();
        a = b < 0x40 ? -std::numeric_limits<T>::infinity() : b < 0xF8 ? static_cast<T>((b - 0x9C) / 32.0) : r.value<T>();
      }
      mask = sus::heads_additive_mask<T>(add.empty() ? nullptr : add.data(), mb, mh, mr, mc);
    } else {
      keep.reset(new bool[static_cast<std::size_t>(std::max<index_t>(n, 1))]);
      for (index_t k = 0; k < n; ++k) keep[k] = r.byte() >= 0x40;
      mask = sus::heads_bool_mask<T>(keep.get(), mb, mh, mr, mc);
    }
  }

  const std::vector<T> Q0 = Q.buf, K0 = K.buf, V0 = V.buf;
  const char* fwd = "multihead_attention_forward";
  try {
    sus::multihead_attention_forward(cview(Q), cview(K), cview(V), O.view, state, o, mask);
  } catch (const sus::Error&) {
    return;
  }
  check_accepted(fwd, "Q", Q);
  check_accepted(fwd, "K", K);
  check_accepted(fwd, "V", V);
  check_accepted(fwd, "O", O);
  FUZZ_CHECK(same_bits(Q.buf, Q0) && same_bits(K.buf, K0) && same_bits(V.buf, V0), fwd, " changed an input");
  check_output(fwd, "O", O);

  // The saved state.
  const index_t n_seq = varlen ? static_cast<index_t>(o.cu_seqlens_q.size()) - 1 : B;
  FUZZ_CHECK(state.sequences == n_seq && state.heads == H_q, "state holds ", state.sequences, " x ", state.heads,
             ", expected ", n_seq, " x ", H_q);
  FUZZ_CHECK(static_cast<index_t>(state.lse.size()) == n_seq * H_q, "state.lse has ", state.lse.size(), " entries");
  const bool sparse = state.save == sus::SaveForBackward::sus_mask;
  for (index_t b = 0; b < n_seq; ++b) {
    const index_t n_q = varlen ? o.cu_seqlens_q[b + 1] - o.cu_seqlens_q[b] : S_q;
    const index_t n_k = varlen ? o.cu_seqlens_k[b + 1] - o.cu_seqlens_k[b] : S_k;
    for (index_t h = 0; h < H_q; ++h) {
      const auto& lse = state.lse[state.at(b, h)];
      FUZZ_CHECK(lse.size() == n_q, "state.lse[", state.at(b, h), "] has ", lse.size(), " values, expected ", n_q);
      for (index_t i = 0; i < n_q; ++i)
        FUZZ_CHECK(std::isfinite(static_cast<double>(lse[i])) || lse[i] == -std::numeric_limits<T>::infinity(),
                   "lse of sequence ", b, ", head ", h, ", row ", i, " is ", lse[i]);
      if (!sparse) continue;
      const sus::Csr<T>& m = state.masks[state.at(b, h)];
      FUZZ_CHECK(m.rows == n_q && m.cols == n_k, "saved mask (", b, ", ", h, ") is ", m.rows, "x", m.cols);
      try {
        m.validate(state.sampler.draw == sus::Draw::systematic ? state.sampler.c : -1);
      } catch (const sus::Error& e) {
        FUZZ_CHECK(false, "saved mask (", b, ", ", h, ") is invalid: ", e.what());
      }
      for (index_t i = 0; i < n_q; ++i)
        if (m.row_nnz(i) > 0)
          FUZZ_CHECK(m.col_indices[m.row_offsets[i + 1] - 1] < sus::detail::visible_keys(i, n_q, n_k, o),
                     "saved mask (", b, ", ", h, ") has an entry above the causal limit in row ", i);
    }
  }
  if (state.save == sus::SaveForBackward::lse_only) return;

  // Backward.
  Buffer<T> dO, dQ, dK, dV;
  decode_view(r, dO, B, S_q, H_q, D_v, nullptr);
  decode_view(r, dQ, B, S_q, H_q, D, &nan_fill);
  decode_view(r, dK, B, S_k, H_kv, D, &nan_fill);
  decode_view(r, dV, B, S_k, H_kv, D_v, &nan_fill);
  for (Buffer<T>* g : {&dQ, &dK, &dV}) prepare_output(r, *g, o.accumulate);
  sus::MultiHeadOptions bo = o;
  const std::uint8_t change = r.byte();
  const bool changed = change >= 0xF0;  // options that differ from the forward's: rejected
  if (changed) {
    switch (change % 4) {
      case 0: bo.causal = !o.causal; break;
      case 1: {
        const double s = o.scale ? *o.scale : 1 / std::sqrt(static_cast<double>(D));
        bo.scale = s == 0 ? 1.0 : 2 * s;
        break;
      }
      case 2:  // causal with the other alignment
        bo.causal = true;
        bo.alignment = o.alignment == sus::CausalAlignment::top_left ? sus::CausalAlignment::bottom_right
                                                                     : sus::CausalAlignment::top_left;
        break;
      default:
        bo.cu_seqlens_q.push_back(0);
        bo.cu_seqlens_k.push_back(0);
        break;
    }
  }
  const Buffer<T> dQ0 = dQ, dK0 = dK, dV0 = dV;
  const std::vector<T> O1 = O.buf, dO0 = dO.buf;
  const char* bwd = "multihead_attention_backward";
  try {
    sus::multihead_attention_backward(cview(Q), cview(K), cview(V), cview(O), cview(dO), state, dQ.view, dK.view,
                                      dV.view, bo);
  } catch (const sus::Error&) {
    return;
  }
  FUZZ_CHECK(!changed, bwd, " accepted options that differ from the forward's (change ", change % 4, ")");
  for (const auto& [name, v] : {std::pair<const char*, const Buffer<T>*>{"dO", &dO}, {"dQ", &dQ}, {"dK", &dK}, {"dV", &dV}})
    check_accepted(bwd, name, *v);
  FUZZ_CHECK(same_bits(Q.buf, Q0) && same_bits(K.buf, K0) && same_bits(V.buf, V0) && same_bits(O.buf, O1) &&
                 same_bits(dO.buf, dO0),
             bwd, " changed an input");
  check_output(bwd, "dQ", dQ);
  check_output(bwd, "dK", dK);
  check_output(bwd, "dV", dV);

  // The two-pass schedule of the SUS backward: the same values as the per-group one.
  if (!sparse) return;
  Buffer<T> dQ2 = dQ0, dK2 = dK0, dV2 = dV0;
  dQ2.view.data = dQ2.buf.empty() ? dQ0.view.data : dQ2.buf.data();
  dK2.view.data = dK2.buf.empty() ? dK0.view.data : dK2.buf.data();
  dV2.view.data = dV2.buf.empty() ? dV0.view.data : dV2.buf.data();
  sus::detail::multihead_backward<T>(cview(Q), cview(K), cview(V), cview(O), cview(dO), state, dQ2.view, dK2.view,
                                     dV2.view, bo, sus::detail::SparseSchedule::two_pass);
  FUZZ_CHECK(same_values(dQ2.buf, dQ.buf) && same_values(dK2.buf, dK.buf) && same_values(dV2.buf, dV.buf),
             "the two-pass and per-group schedules of the SUS backward differ: ", difference("dQ", dQ2.buf, dQ.buf),
             difference("dK", dK2.buf, dK.buf), difference("dV", dV2.buf, dV.buf));
}

}  // namespace

SUS_FUZZ_ENTRY_POINT(run)
