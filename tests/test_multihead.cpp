// The multi-head API against a loop of the single-head reference over (sequence, head):
// layouts, grouped-query heads, cross attention, both causal alignments, varlen batches,
// boolean and additive masks, fully masked rows; determinism across thread counts;
// unbiasedness through the multi-head path; bad input.
#include <catch2/catch.hpp>

#include <memory>
#include <utility>
#include <vector>

#include "test_util.hpp"

using namespace sus_test;
using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;
using sus::HeadsView;

namespace {

enum class Layout { bshd, bhsd, packed_qkv };
enum class MaskKind { none, bool_full, bool_key_padding, additive_heads };

const char* to_string(Layout l) { return l == Layout::bshd ? "bshd" : l == Layout::bhsd ? "bhsd" : "packed_qkv"; }

struct Case {
  const char* name;
  Layout layout;
  index_t B, Sq, Sk, H, Hkv, D, Dv;
  bool causal;
  sus::CausalAlignment alignment;
  std::vector<index_t> cu_q, cu_k;  // varlen when set (B = 1)
  MaskKind mask;
};

// A multi-head problem: buffers, views of them in the case's layout, and its masks.
template <class T>
struct Problem4 {
  Case c;
  std::vector<T> qkv, q, k, v, o, dout, dqkv, dq, dk, dv;
  HeadsView<T> Q, K, V, O, dO, dQ, dK, dV;
  std::unique_ptr<bool[]> keep;  // boolean mask storage
  std::vector<T> add;            // additive mask storage
  sus::HeadsMask<T> mask;
  sus::MultiHeadOptions options;

  static HeadsView<T> view(Layout l, std::vector<T>& buf, index_t B, index_t S, index_t H, index_t D) {
    buf.resize(static_cast<std::size_t>(B * S * H * D));
    return l == Layout::bhsd ? sus::bhsd(buf.data(), B, H, S, D) : sus::bshd(buf.data(), B, S, H, D);
  }
  static void fill(std::vector<T>& buf, std::uint64_t seed, double scale) {
    const M<T> r = random_matrix<T>(1, static_cast<index_t>(buf.size()), seed, scale);
    std::copy(r.data(), r.data() + r.size(), buf.begin());
  }

  Problem4(const Case& c_, std::uint64_t seed) : c(c_) {
    if (c.layout == Layout::packed_qkv) {  // one [B, S, H + 2·H_kv, D] buffer, as from a fused projection
      REQUIRE((c.Sq == c.Sk && c.D == c.Dv));
      const index_t W = c.H + 2 * c.Hkv, row = W * c.D;
      qkv.resize(static_cast<std::size_t>(c.B * c.Sq * row));
      dqkv.resize(qkv.size());
      auto sub = [&](std::vector<T>& buf, index_t h0, index_t heads) {
        return HeadsView<T>(buf.data() + h0 * c.D, c.B, c.Sq, heads, c.D, c.Sq * row, row, c.D,
                            static_cast<index_t>(buf.size()) - h0 * c.D);
      };
      Q = sub(qkv, 0, c.H), K = sub(qkv, c.H, c.Hkv), V = sub(qkv, c.H + c.Hkv, c.Hkv);
      dQ = sub(dqkv, 0, c.H), dK = sub(dqkv, c.H, c.Hkv), dV = sub(dqkv, c.H + c.Hkv, c.Hkv);
      fill(qkv, seed, 1.5);
    } else {
      Q = view(c.layout, q, c.B, c.Sq, c.H, c.D);
      K = view(c.layout, k, c.B, c.Sk, c.Hkv, c.D);
      V = view(c.layout, v, c.B, c.Sk, c.Hkv, c.Dv);
      dQ = view(c.layout, dq, c.B, c.Sq, c.H, c.D);
      dK = view(c.layout, dk, c.B, c.Sk, c.Hkv, c.D);
      dV = view(c.layout, dv, c.B, c.Sk, c.Hkv, c.Dv);
      fill(q, seed, 1.5), fill(k, seed + 1, 1.5), fill(v, seed + 2, 1.0);
    }
    O = view(c.layout, o, c.B, c.Sq, c.H, c.Dv);
    dO = view(c.layout, dout, c.B, c.Sq, c.H, c.Dv);
    fill(dout, seed + 3, 1.0);
    options.causal = c.causal;
    options.alignment = c.alignment;
    options.cu_seqlens_q = c.cu_q;
    options.cu_seqlens_k = c.cu_k;
    options.num_threads = 2;
    std::mt19937_64 gen(seed + 4);
    if (c.mask == MaskKind::bool_full || c.mask == MaskKind::bool_key_padding) {
      const bool full = c.mask == MaskKind::bool_full;
      const index_t mh = full ? c.H : 1, mr = full ? c.Sq : 1, n = c.B * mh * mr * c.Sk;
      keep.reset(new bool[static_cast<std::size_t>(n)]);
      for (index_t e = 0; e < n; ++e) keep[e] = gen() % 3 != 0;
      if (full)  // fully masked rows: query 1 of every head, and every query of head 0 of batch 0's row 2
        for (index_t bh = 0; bh < c.B * mh; ++bh) std::fill_n(keep.get() + (bh * mr + 1) * c.Sk, c.Sk, false);
      mask = sus::heads_bool_mask<T>(keep.get(), c.B, mh, mr, c.Sk);
    } else if (c.mask == MaskKind::additive_heads) {  // [1, H, S_q, S_k]: shared across the batch
      add.resize(static_cast<std::size_t>(c.H * c.Sq * c.Sk));
      for (auto& a : add) a = gen() % 4 == 0 ? -std::numeric_limits<T>::infinity() : static_cast<T>((gen() % 100) / 25.0 - 2);
      std::fill_n(add.begin() + 3 * c.Sk, c.Sk, -std::numeric_limits<T>::infinity());  // head 0, query 3: fully masked
      mask = sus::heads_additive_mask<T>(add.data(), 1, c.H, c.Sq, c.Sk);
    }
  }

  struct Seq {
    index_t batch, q0, n_q, k0, n_k;
  };
  std::vector<Seq> seqs() const {
    std::vector<Seq> s;
    if (c.cu_q.empty())
      for (index_t b = 0; b < c.B; ++b) s.push_back({b, 0, c.Sq, 0, c.Sk});
    else
      for (std::size_t b = 0; b + 1 < c.cu_q.size(); ++b)
        s.push_back({0, c.cu_q[b], c.cu_q[b + 1] - c.cu_q[b], c.cu_k[b], c.cu_k[b + 1] - c.cu_k[b]});
    return s;
  }
};

// Copy of rows [r0, r0 + n) of head h of batch entry b, in double.
template <class T>
M<double> head_copy(const HeadsView<T>& v, index_t b, index_t h, index_t r0, index_t n) {
  return v.head(b, h, r0, n).template cast<double>();
}

// The single-head double-precision mask of (b, h), or an empty one.
template <class T>
struct RefMask {
  std::vector<double> add;
  sus::ScoreMask<double> m;
  RefMask(const sus::HeadsMask<T>& hm, index_t b, index_t h) {
    const sus::ScoreMask<T> s = hm.head(b, h);
    if (s.empty()) return;
    if (s.keep) {
      m = {s.keep, nullptr, s.rows, s.cols, s.row_stride};
      return;
    }
    const index_t rows = s.row_stride == 0 ? 1 : s.rows;
    add.resize(static_cast<std::size_t>(rows * s.cols));
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < s.cols; ++j) add[i * s.cols + j] = s.add[i * s.row_stride + j];
    m = {nullptr, add.data(), s.rows, s.cols, s.row_stride == 0 ? 0 : s.cols};
  }
};

struct Errors {
  double O = 0, lse = 0, W = 0, dQ = 0, dK = 0, dV = 0;
  bool finite = true;
};

// Runs the multi-head forward + backward (saving `save`) and the single-head reference loop,
// and returns the worst norm-wise relative error per output (max over heads).
template <class T>
Errors compare_with_reference(Problem4<T>& p, sus::SaveForBackward save, const sus::SamplerOptions& so) {
  sus::AttentionState<T> state;
  state.save = save;
  state.sampler = so;
  sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, state, p.options, p.mask);
  sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, state, p.dQ, p.dK, p.dV, p.options);
  Errors e;
  const index_t group = p.c.H / p.c.Hkv;
  const auto seqs = p.seqs();
  for (index_t s = 0; s < static_cast<index_t>(seqs.size()); ++s) {
    const auto& sp = seqs[s];
    for (index_t g = 0; g < p.c.Hkv; ++g) {
      const M<double> Kg = head_copy(p.K, sp.batch, g, sp.k0, sp.n_k), Vg = head_copy(p.V, sp.batch, g, sp.k0, sp.n_k);
      M<double> dK_ref = M<double>::Zero(sp.n_k, p.c.D), dV_ref = M<double>::Zero(sp.n_k, p.c.Dv);
      for (index_t h = g * group; h < (g + 1) * group; ++h) {
        const M<double> Qh = head_copy(p.Q, sp.batch, h, sp.q0, sp.n_q), dOh = head_copy(p.dO, sp.batch, h, sp.q0, sp.n_q);
        M<double> O_ref(sp.n_q, p.c.Dv);
        sus::DenseWeights<double> W_ref;
        sus::LogSumExp<double> lse_ref;
        const RefMask<T> rm(p.mask, sp.batch, h);
        sus::AttentionOptions o = p.options;
        o.accumulate = true;
        sus::reference::attention_forward<double>(Qh, Kg, Vg, O_ref, sus::recorders(W_ref, lse_ref), o, rm.m);
        const M<double> O_got = head_copy(p.O, sp.batch, h, sp.q0, sp.n_q);
        if (sp.n_q > 0) e.O = std::max(e.O, max_rel_error(O_got, O_ref));
        const auto& lse = state.lse[state.at(s, h)];
        for (index_t i = 0; i < sp.n_q; ++i) {
          if (std::isinf(lse_ref.lse[i])) {  // fully masked row: −inf, zero output
            if (!(std::isinf(lse[i]) && lse[i] < 0) || O_got.row(i).cwiseAbs().maxCoeff() != 0) e.finite = false;
          } else {
            e.lse = std::max(e.lse, std::abs(lse[i] - lse_ref.lse[i]) / std::max(1.0, std::abs(lse_ref.lse[i])));
          }
        }
        M<double> dQ_ref = M<double>::Zero(sp.n_q, p.c.D);
        if (save == sus::SaveForBackward::dense_weights) {
          if (W_ref.W.size() > 0) e.W = std::max(e.W, max_rel_error(state.weights[state.at(s, h)], W_ref.W));
          sus::reference::attention_backward_dense<double>(Qh, Kg, Vg, O_ref, dOh, W_ref.W, dQ_ref, dK_ref, dV_ref, o);
        } else {
          const sus::Csr<double> mask = state.masks[state.at(s, h)].template cast<double>();
          sus::reference::attention_backward_sparse<double>(Qh, Kg, Vg, O_ref, dOh, mask, dQ_ref, dK_ref, dV_ref, o);
        }
        const M<double> dQ_got = head_copy(p.dQ, sp.batch, h, sp.q0, sp.n_q);
        if (sp.n_q > 0) e.dQ = std::max(e.dQ, max_rel_error(dQ_got, dQ_ref));
        e.finite = e.finite && dQ_got.allFinite() && O_got.allFinite();
        for (index_t i = 0; i < sp.n_q; ++i)  // a fully masked row has an exactly zero gradient
          if (std::isinf(lse_ref.lse[i]) && dQ_got.row(i).cwiseAbs().maxCoeff() != 0) e.finite = false;
      }
      if (sp.n_k > 0) {
        const M<double> dK_got = head_copy(p.dK, sp.batch, g, sp.k0, sp.n_k), dV_got = head_copy(p.dV, sp.batch, g, sp.k0, sp.n_k);
        e.dK = std::max(e.dK, max_rel_error(dK_got, dK_ref));
        e.dV = std::max(e.dV, max_rel_error(dV_got, dV_ref));
        e.finite = e.finite && dK_got.allFinite() && dV_got.allFinite();
      }
    }
  }
  return e;
}

using sus::CausalAlignment;
constexpr auto TL = CausalAlignment::top_left;
constexpr auto BR = CausalAlignment::bottom_right;

std::vector<Case> feature_cases() {
  return {
      // name                                            layout          B   Sq   Sk  H Hkv D  Dv causal align cu_q cu_k mask
      {"bshd, H_q = H_kv, two row blocks", Layout::bshd, 2, 150, 150, 3, 3, 8, 8, false, TL, {}, {}, MaskKind::none},
      {"bhsd, GQA 4/2, d_v != d, causal", Layout::bhsd, 2, 150, 150, 4, 2, 8, 6, true, TL, {}, {}, MaskKind::none},
      {"packed QKV (and packed dQKV), MQA 4/1, causal", Layout::packed_qkv, 2, 40, 40, 4, 1, 8, 8, true, TL, {}, {},
       MaskKind::none},
      {"cross attention n_q < n_k, causal top-left", Layout::bshd, 2, 20, 33, 2, 1, 8, 8, true, TL, {}, {},
       MaskKind::none},
      {"cross attention n_q < n_k, causal bottom-right", Layout::bshd, 2, 20, 33, 2, 1, 8, 8, true, BR, {}, {},
       MaskKind::none},
      {"n_q > n_k, causal bottom-right: the first 13 queries see no key", Layout::bhsd, 1, 33, 20, 2, 2, 8, 8, true,
       BR, {}, {}, MaskKind::none},
      {"n_q > n_k, causal top-left", Layout::bhsd, 1, 33, 20, 2, 2, 8, 8, true, TL, {}, {}, MaskKind::none},
      {"varlen (n_q, n_k) = (5,7) (0,2) (3,0) (12,10), GQA 4/2, non-causal", Layout::bshd, 1, 20, 19, 4, 2, 8, 8,
       false, TL, {0, 5, 5, 8, 20}, {0, 7, 9, 9, 19}, MaskKind::none},
      {"varlen, causal bottom-right", Layout::bshd, 1, 20, 19, 4, 2, 8, 8, true, BR, {0, 5, 5, 8, 20},
       {0, 7, 9, 9, 19}, MaskKind::none},
      {"bool mask [B, H, S_q, S_k] with fully masked rows, GQA", Layout::bshd, 2, 30, 25, 4, 2, 8, 8, false, TL, {},
       {}, MaskKind::bool_full},
      {"bool key-padding mask [B, 1, 1, S_k] + causal", Layout::bhsd, 2, 30, 30, 2, 1, 8, 8, true, TL, {}, {},
       MaskKind::bool_key_padding},
      {"additive mask [1, H, S_q, S_k] with -inf, + causal bottom-right", Layout::bshd, 2, 24, 30, 2, 2, 8, 8, true,
       BR, {}, {}, MaskKind::additive_heads},
  };
}

}  // namespace

TEST_CASE("multihead: every feature matches a loop of the single-head reference (dense and SUS)", "[multihead]") {
  // Tolerance: float against the float64 reference, norm-wise relative (as in the core tests).
  constexpr double tol = 1e-5;
  std::uint64_t seed = 100;
  for (const Case& c : feature_cases())
    for (auto save : {sus::SaveForBackward::dense_weights, sus::SaveForBackward::sus_mask}) {
      Problem4<float> p(c, seed += 10);
      const bool sus_save = save == sus::SaveForBackward::sus_mask;
      const sus::SamplerOptions so{3, seed % 20 < 10 ? sus::Budget::waterfill : sus::Budget::paper,
                                   seed % 40 < 20 ? sus::Draw::systematic : sus::Draw::independent, seed};
      const Errors e = compare_with_reference(p, save, so);
      INFO(c.name << " [" << to_string(c.layout) << ", " << (sus_save ? "SUS" : "dense") << "]");
      CAPTURE(e.O, e.lse, e.W, e.dQ, e.dK, e.dV);
      CHECK(e.finite);
      CHECK(e.O <= tol);
      CHECK(e.lse <= tol);
      CHECK(e.W <= tol);
      CHECK(e.dQ <= tol);
      CHECK(e.dK <= tol);
      CHECK(e.dV <= tol);
    }
}

TEST_CASE("multihead: the SUS mask of (b, h) is the single-head SusMask with head_seed(seed, b, h)", "[multihead]") {
  const Case c{"GQA causal", Layout::bshd, 2, 150, 150, 4, 2, 8, 8, true, TL, {}, {}, MaskKind::none};
  Problem4<float> p(c, 7);
  sus::AttentionState<float> state;
  state.sampler = {4, sus::Budget::paper, sus::Draw::independent, 99};
  sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, state, p.options);
  for (index_t b = 0; b < c.B; ++b)
    for (index_t h = 0; h < c.H; ++h) {
      const M<float> Qh = p.Q.head(b, h, 0, c.Sq), Kg = p.K.head(b, h / 2, 0, c.Sk), Vg = p.V.head(b, h / 2, 0, c.Sk);
      M<float> O(c.Sq, c.Dv);
      sus::SamplerOptions so = state.sampler;
      so.seed = sus::head_seed(so.seed, b, h);
      sus::SusMask<float> single(so);
      sus::attention_forward(Qh, Kg, Vg, O, single, p.options);
      const auto& m = state.masks[state.at(b, h)];
      INFO("b = " << b << ", h = " << h);
      CHECK(m.row_offsets == single.mask.row_offsets);
      CHECK(m.col_indices == single.mask.col_indices);
      CHECK(m.values == single.mask.values);
    }
  // Different heads get different masks.
  CHECK(state.masks[0].col_indices != state.masks[1].col_indices);
}

TEST_CASE("multihead: empty views from bshd (S_k = 0, S_q = 0) give zero outputs", "[multihead]") {
  std::vector<float> q(2 * 4 * 1 * 8, 0.5f), o(q.size(), 7.f), dq(q.size(), 7.f), none;
  sus::AttentionState<float> st;
  const auto Q = sus::bshd(q.data(), 2, 4, 1, 8), O = sus::bshd(o.data(), 2, 4, 1, 8);
  const auto K0 = sus::bshd(none.data(), 2, 0, 1, 8);
  sus::multihead_attention_forward(Q, K0, K0, O, st);
  CHECK(std::all_of(o.begin(), o.end(), [](float x) { return x == 0.f; }));
  sus::multihead_attention_backward(Q, K0, K0, O, Q, st, sus::bshd(dq.data(), 2, 4, 1, 8),
                                    sus::bshd(none.data(), 2, 0, 1, 8), sus::bshd(none.data(), 2, 0, 1, 8));
  CHECK(std::all_of(dq.begin(), dq.end(), [](float x) { return x == 0.f; }));
  const auto Q0 = sus::bshd(none.data(), 2, 0, 1, 8);  // no queries at all
  sus::multihead_attention_forward(Q0, Q, Q, Q0, st);
  CHECK(st.sequences == 2);
  CHECK(st.masks[0].rows == 0);
}

TEST_CASE("multihead: both SUS schedules (per group, two-pass) equal the fused single-head kernel bit for bit",
          "[multihead]") {
  // H_q = H_kv (no group sums), so each head's dQ, dK, dV is exactly one single-head backward.
  // n = 600 with 2 and 3 threads: several row tasks, and the keys cut into several ranges.
  // d = 16, d_v = 12 go through memory (MemoryRow), d = d_v = 64 through registers; d = 64,
  // d_v = 128 through memory, with D_i = dO_i·O_i over 128 values.
  using sus::detail::SparseSchedule;
  for (SparseSchedule schedule : {SparseSchedule::per_group, SparseSchedule::two_pass})
    for (int threads : {1, 2, 3})
      for (Layout layout : {Layout::bshd, Layout::bhsd})
        for (bool accumulate : {false, true})
          for (std::pair<index_t, index_t> dims : {std::pair<index_t, index_t>(16, 12), {64, 64}, {64, 128}}) {
            const index_t dim = dims.first, dim_v = dims.second;
            const Case c{"equal", layout, 2, 600, 600, 2, 2, dim, dim_v, true, TL, {}, {}, MaskKind::none};
            Problem4<float> p(c, 31);
            p.options.accumulate = accumulate;
            p.options.num_threads = threads;
            INFO(to_string(layout) << (accumulate ? " accumulate" : "") << " threads " << threads << " d " << dim << "/" << dim_v
                                   << (schedule == SparseSchedule::two_pass ? " two-pass" : " per group"));
            std::fill(p.dq.begin(), p.dq.end(), 0.25f), std::fill(p.dk.begin(), p.dk.end(), -0.5f);
            std::fill(p.dv.begin(), p.dv.end(), 0.125f);
            sus::AttentionState<float> state;
            state.sampler = {16, sus::Budget::paper, sus::Draw::independent, 5};
            sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, state, p.options);
            sus::detail::multihead_backward<float>(p.Q, p.K, p.V, p.O, p.dO, state, p.dQ, p.dK, p.dV, p.options,
                                                   schedule);
            for (index_t b = 0; b < c.B; ++b)
              for (index_t h = 0; h < c.H; ++h) {
                const M<float> Q = p.Q.head(b, h, 0, c.Sq), K = p.K.head(b, h, 0, c.Sk), V = p.V.head(b, h, 0, c.Sk),
                               O = p.O.head(b, h, 0, c.Sq), dO = p.dO.head(b, h, 0, c.Sq);
                M<float> dQ = M<float>::Constant(c.Sq, c.D, 0.25f), dK = M<float>::Constant(c.Sk, c.D, -0.5f),
                         dV = M<float>::Constant(c.Sk, c.Dv, 0.125f);
                sus::attention_backward_sparse(Q, K, V, O, dO, state.masks[state.at(b, h)], dQ, dK, dV, p.options);
                CHECK(M<float>(p.dQ.head(b, h, 0, c.Sq)) == dQ);
                CHECK(M<float>(p.dK.head(b, h, 0, c.Sk)) == dK);
                CHECK(M<float>(p.dV.head(b, h, 0, c.Sk)) == dV);
              }
          }
}

// Needs OpenMP: without it every thread count runs serially and there is nothing to compare
// (tests/CMakeLists.txt then adds a ctest case that reports itself skipped).
#ifdef _OPENMP
TEST_CASE("multihead: masks, outputs and gradients are bitwise identical for 1, 2 and 3 threads and nested calls",
          "[multihead]") {
  const Case cases[] = {
      {"one head, n = 600 (5 row blocks)", Layout::bshd, 1, 600, 600, 1, 1, 16, 16, true, TL, {}, {}, MaskKind::none},
      {"GQA 4/2, B = 2", Layout::bhsd, 2, 200, 200, 4, 2, 16, 16, true, TL, {}, {}, MaskKind::none},
      {"varlen", Layout::bshd, 1, 20, 19, 4, 2, 8, 8, true, BR, {0, 5, 5, 8, 20}, {0, 7, 9, 9, 19}, MaskKind::none},
      // n_k = 1500: deep enough that Eigen's threaded GEMM blocking would round O = W·V differently
      {"cross attention, n_k = 1500", Layout::bshd, 1, 256, 1500, 2, 2, 64, 64, false, TL, {}, {}, MaskKind::none},
  };
  for (const Case& c : cases)
    for (auto save : {sus::SaveForBackward::sus_mask, sus::SaveForBackward::dense_weights}) {
      INFO(c.name << (save == sus::SaveForBackward::sus_mask ? " [SUS]" : " [dense]"));
      std::vector<std::vector<float>> outs;
      std::vector<std::vector<sus::Csr<float>>> masks;
      auto run = [&](int threads) {
        Problem4<float> p(c, 5);
        p.options.num_threads = threads;
        sus::AttentionState<float> state;
        state.save = save;
        state.sampler = {8, sus::Budget::waterfill, sus::Draw::systematic, 11};
        sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, state, p.options);
        sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, state, p.dQ, p.dK, p.dV, p.options);
        std::vector<float> all;
        for (auto* buf : {&p.o, &p.dq, &p.dk, &p.dv}) all.insert(all.end(), buf->begin(), buf->end());
        outs.push_back(all);
        masks.push_back(state.masks);
      };
      for (int threads : {1, 2, 3}) run(threads);
#pragma omp parallel num_threads(2)
      {  // the same call from inside the caller's own parallel region (a nested team of one)
#pragma omp single
        run(2);
      }
      for (std::size_t t = 1; t < outs.size(); ++t) {
        CHECK(outs[t] == outs[0]);
        REQUIRE(masks[t].size() == masks[0].size());
        for (std::size_t m = 0; m < masks[0].size(); ++m) {
          CHECK(masks[t][m].row_offsets == masks[0][m].row_offsets);
          CHECK(masks[t][m].col_indices == masks[0][m].col_indices);
          CHECK(masks[t][m].values == masks[0][m].values);
        }
      }
    }
}
#endif  // _OPENMP

// Unbiasedness through the multi-head path, with GQA (4 query heads on 2 key/value heads, so
// dK and dV sum two heads' SUS terms) and a varlen batch with an empty and a key-less
// sequence. N = 3000 masks per variant; each of the 640 + 2·304 = 1248 gradient entries must
// have |mean − exact| ≤ 5σ/√N. False-failure probability: per entry P(|Z| > 5) = 5.7e-7
// under the CLT, so ≤ 1248 · 2 · 5.7e-7 ≈ 1.4e-3 over both variants (union bound); the
// seeds are fixed, so the outcome is reproducible.
TEST_CASE("multihead: the SUS gradient through the multi-head path is unbiased (GQA, varlen)", "[multihead][unbiased]") {
  const Case c{"varlen GQA causal", Layout::bshd, 1, 20, 19, 4, 2, 8, 8, true, BR, {0, 5, 5, 8, 20}, {0, 7, 9, 9, 19},
               MaskKind::none};
  constexpr int N = 3000;
  constexpr double k = 5.0;
  for (auto variant : {std::make_pair(sus::Budget::paper, sus::Draw::independent),
                       std::make_pair(sus::Budget::waterfill, sus::Draw::systematic)}) {
    INFO(sus::to_string(variant.first) << "/" << sus::to_string(variant.second));
    Problem4<double> p(c, 21);
    p.options.num_threads = 1;
    // Exact gradient: the dense backward.
    sus::AttentionState<double> dense;
    dense.save = sus::SaveForBackward::dense_weights;
    sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, dense, p.options);
    sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, dense, p.dQ, p.dK, p.dV, p.options);
    std::vector<double> exact;
    for (auto* buf : {&p.dq, &p.dk, &p.dv}) exact.insert(exact.end(), buf->begin(), buf->end());
    Moments mom(exact.size());
    sus::AttentionState<double> state;
    std::vector<double> g;
    for (int n = 0; n < N; ++n) {
      state.sampler = {2, variant.first, variant.second, static_cast<std::uint64_t>(1000 + n)};
      sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, state, p.options);
      sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, state, p.dQ, p.dK, p.dV, p.options);
      g.clear();
      for (auto* buf : {&p.dq, &p.dk, &p.dv}) g.insert(g.end(), buf->begin(), buf->end());
      mom.add(g);
    }
    const Verdict v = judge_means(mom, exact, N, k, /*slack_rel=*/1e-12);
    CAPTURE(v.worst_z, v.violations, v.random_coords, exact.size());
    CHECK(v.violations == 0);
    CHECK(v.random_coords > static_cast<index_t>(exact.size()) / 2);  // the masks really are random
  }
}

// ---------------------------------------------------------------------------------------------
// Bad input: sus::Error naming the argument.
// ---------------------------------------------------------------------------------------------

TEST_CASE("multihead: bad views, heads, cu_seqlens, masks and states throw sus::Error naming the argument",
          "[multihead][errors]") {
  const Case c{"base", Layout::bshd, 2, 10, 10, 4, 2, 8, 8, false, TL, {}, {}, MaskKind::none};
  Problem4<float> p(c, 3);
  sus::AttentionState<float> st;
  auto fwd = [&](const HeadsView<float>& Q, const HeadsView<float>& K, const HeadsView<float>& V,
                 const HeadsView<float>& O, const sus::MultiHeadOptions& o, const sus::HeadsMask<float>& m = {}) {
    return error_message([&] { sus::multihead_attention_forward(Q, K, V, O, st, o, m); });
  };
  const std::string fn = "sus::multihead_attention_forward";
  SECTION("strides that address an element twice") {
    HeadsView<float> Q = p.Q;
    Q.stride_head = 4;  // heads 8 wide, 4 apart
    CHECK_THAT(fwd(Q, p.K, p.V, p.O, p.options), StartsWith(fn) && Contains("'Q'") && Contains("twice"));
    HeadsView<float> O = p.O;
    O.stride_seq = 0;  // every position writes the same row
    CHECK_THAT(fwd(p.Q, p.K, p.V, O, p.options), StartsWith(fn) && Contains("'O'") && Contains("twice"));
  }
  SECTION("a view past its extent") {
    HeadsView<float> K = p.K;
    K.extent -= 1;
    CHECK_THAT(fwd(p.Q, K, p.V, p.O, p.options), StartsWith(fn) && Contains("'K'") && Contains("extent"));
  }
  SECTION("H_q not a multiple of H_kv") {
    std::vector<float> k3(2 * 10 * 3 * 8, 0.5f), v3(k3.size(), 0.5f);
    CHECK_THAT(fwd(p.Q, sus::bshd(k3.data(), 2, 10, 3, 8), sus::bshd(v3.data(), 2, 10, 3, 8), p.O, p.options),
               StartsWith(fn) && Contains("'K'") && Contains("multiple"));
  }
  SECTION("shape mismatch names the operand") {
    HeadsView<float> V = p.V;
    V.seq = 9;
    CHECK_THAT(fwd(p.Q, p.K, V, p.O, p.options), StartsWith(fn) && Contains("'V'") && Contains("[2, 9, 2, 8]"));
  }
  SECTION("outputs overlapping inputs") {
    CHECK_THAT(fwd(p.Q, p.K, p.V, p.Q, p.options), StartsWith(fn) && Contains("'O'") && Contains("'Q'"));
    st.save = sus::SaveForBackward::dense_weights;
    sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, st, p.options);
    CHECK_THAT(error_message([&] {
                 sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, st, p.dQ, p.dK, p.K, p.options);
               }),
               StartsWith("sus::multihead_attention_backward") && Contains("'dV'") && Contains("'K'"));
  }
  SECTION("cu_seqlens") {
    const Case vc{"varlen", Layout::bshd, 1, 20, 19, 4, 2, 8, 8, false, TL, {0, 5, 5, 8, 20}, {0, 7, 9, 9, 19},
                  MaskKind::none};
    Problem4<float> v(vc, 4);
    auto with = [&](std::vector<index_t> q, std::vector<index_t> k) {
      sus::MultiHeadOptions o = v.options;
      o.cu_seqlens_q = std::move(q);
      o.cu_seqlens_k = std::move(k);
      return fwd(v.Q, v.K, v.V, v.O, o);
    };
    CHECK_THAT(with({0, 5, 4, 8, 20}, vc.cu_k), StartsWith(fn) && Contains("cu_seqlens_q") && Contains("decreases"));
    CHECK_THAT(with(vc.cu_q, {0, 7, 9, 9, 18}), StartsWith(fn) && Contains("cu_seqlens_k") && Contains("ends at 18"));
    CHECK_THAT(with({1, 5, 5, 8, 20}, vc.cu_k), StartsWith(fn) && Contains("cu_seqlens_q") && Contains("start with 0"));
    CHECK_THAT(with(vc.cu_q, {}), StartsWith(fn) && Contains("both or neither"));
    CHECK_THAT(with({0, 20}, vc.cu_k), StartsWith(fn) && Contains("cu_seqlens_k") && Contains("B + 1"));
    sus::MultiHeadOptions o = p.options;  // batch 2 with cu_seqlens
    o.cu_seqlens_q = {0, 10};
    o.cu_seqlens_k = {0, 10};
    CHECK_THAT(fwd(p.Q, p.K, p.V, p.O, o), StartsWith(fn) && Contains("batch = 1"));
  }
  SECTION("mask shape mismatch, and a NaN additive entry") {
    std::unique_ptr<bool[]> keep(new bool[2 * 4 * 10 * 9]());
    CHECK_THAT(fwd(p.Q, p.K, p.V, p.O, p.options, sus::heads_bool_mask<float>(keep.get(), 2, 4, 10, 9)),
               StartsWith(fn) && Contains("'mask'") && Contains("[2, 4, 10, 9]"));
    CHECK_THAT(fwd(p.Q, p.K, p.V, p.O, p.options, sus::heads_bool_mask<float>(keep.get(), 3, 1, 1, 10)),
               StartsWith(fn) && Contains("'mask'"));
    std::vector<float> add(10 * 10, 0.f);
    add[17] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THAT(fwd(p.Q, p.K, p.V, p.O, p.options, sus::heads_additive_mask<float>(add.data(), 1, 1, 10, 10)),
               StartsWith(fn) && Contains("'mask'") && Contains("(1, 7)"));
  }
  SECTION("no query heads, a span past index_t, O over the mask, a bad sampler or thread count") {
    HeadsView<float> Q0 = p.Q;
    Q0.heads = 0;
    CHECK_THAT(fwd(Q0, p.K, p.V, p.O, p.options), StartsWith(fn) && Contains("'Q'") && Contains("H_q must be >= 1"));
    HeadsView<float> K = p.K;  // batch 2 -> 3 entries 2^62 apart: the last offset passes 2^63
    K.batch = 3;
    K.stride_batch = index_t(1) << 62;
    K.extent = -1;
    CHECK_THAT(fwd(p.Q, K, p.V, p.O, p.options), StartsWith(fn) && Contains("'K'") && Contains("index_t"));
    std::vector<float> add(static_cast<std::size_t>(2 * 10 * 4 * 8), 0.f);  // O and the mask in one buffer
    CHECK_THAT(fwd(p.Q, p.K, p.V, sus::bshd(add.data(), 2, 10, 4, 8), p.options,
                   sus::heads_additive_mask<float>(add.data(), 1, 1, 10, 10)),
               StartsWith(fn) && Contains("'O'") && Contains("'mask'"));
    st.sampler.c = 0;
    CHECK_THAT(fwd(p.Q, p.K, p.V, p.O, p.options), StartsWith(fn) && Contains("state.sampler.c"));
    st.sampler.c = 4;
    sus::MultiHeadOptions o = p.options;
    o.num_threads = -1;
    CHECK_THAT(fwd(p.Q, p.K, p.V, p.O, o), StartsWith(fn) && Contains("num_threads"));
  }
  SECTION("backward options that differ from the forward's, and a state left by a failed forward") {
    st.save = sus::SaveForBackward::sus_mask;
    sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, st, p.options);
    sus::MultiHeadOptions o = p.options;
    o.causal = true;
    const std::string bwd = "sus::multihead_attention_backward";
    CHECK_THAT(error_message([&] { sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, st, p.dQ, p.dK, p.dV, o); }),
               StartsWith(bwd) && Contains("'options'") && Contains("forward"));
    o = p.options;
    o.scale = 0.5;
    CHECK_THAT(error_message([&] { sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, st, p.dQ, p.dK, p.dV, o); }),
               StartsWith(bwd) && Contains("'options'"));
    std::vector<float> big(p.q.size(), 3e38f), ones(p.k.size(), 1.f);  // scores overflow: the forward throws
    CHECK_THAT(fwd(sus::bshd(big.data(), 2, 10, 4, 8), sus::bshd(ones.data(), 2, 10, 2, 8), p.V, p.O, p.options),
               Contains("not finite"));
    CHECK_THAT(error_message([&] {
                 sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, st, p.dQ, p.dK, p.dV, p.options);
               }),
               StartsWith(bwd) && Contains("'state'") && Contains("holds 0 sequences"));
  }
  SECTION("a state without what the backward needs, or of another shape") {
    st.save = sus::SaveForBackward::lse_only;
    sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, st, p.options);
    const std::string bwd = "sus::multihead_attention_backward";
    CHECK_THAT(error_message([&] {
                 sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, st, p.dQ, p.dK, p.dV, p.options);
               }),
               StartsWith(bwd) && Contains("'state'") && Contains("lse_only"));
    st.save = sus::SaveForBackward::sus_mask;
    sus::multihead_attention_forward(p.Q, p.K, p.V, p.O, st, p.options);
    st.heads = 2;
    CHECK_THAT(error_message([&] {
                 sus::multihead_attention_backward(p.Q, p.K, p.V, p.O, p.dO, st, p.dQ, p.dK, p.dV, p.options);
               }),
               StartsWith(bwd) && Contains("'state'"));
  }
}

TEST_CASE("single head: dQ, dK, dV as column blocks of one packed [n, 3d] gradient buffer are accepted",
          "[multihead][errors]") {
  // The llm.c layout: qkv and its gradient are [n, 3d]; the three blocks interleave in memory
  // but share no element. The overlap check must accept them and reject a real overlap.
  const index_t n = 20, d = 8;
  const Problem<float> p(n, n, d, d, true, 3);
  const sus::Csr<float> mask = sus::sample_mask(p.W, {4, sus::Budget::paper, sus::Draw::independent, 1});
  M<float> packed = M<float>::Zero(n, 3 * d);
  auto dQ = packed.middleCols(0, d), dK = packed.middleCols(d, d), dV = packed.middleCols(2 * d, d);
  sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, p.dO, mask, dQ, dK, dV, p.options);
  Grads<float> ref(p);
  sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, p.dO, mask, ref.dQ, ref.dK, ref.dV, p.options);
  CHECK(M<float>(dQ) == ref.dQ);
  CHECK(M<float>(dK) == ref.dK);
  CHECK(M<float>(dV) == ref.dV);
  auto dK_bad = packed.middleCols(d / 2, d);  // shares half of each row with dQ
  CHECK_THAT(error_message([&] { sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, p.dO, mask, dQ, dK_bad, dV, p.options); }),
             StartsWith("sus::attention_backward_sparse") && Contains("'dQ'") && Contains("'dK'"));
}
