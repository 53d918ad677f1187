// Regression tests for the defects that fuzzing found (tests/fuzz/, docs/fuzzing.md): each case
// names the defect and how it showed before the fix. The hang runs as its own ctest case with a
// TIMEOUT (tag [hang]); the undefined behaviour shows in the sanitizer build (scripts/test-sanitize).
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"

namespace {

using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;
using sus::index_t;

constexpr index_t kHuge = index_t(1) << 62;

// Q, K, V, O, dO, dQ, dK, dV over one small buffer each, with the sizes and strides given; the
// views address nothing when seq = 0, whatever their batch, heads and strides.
template <class T>
struct EmptyViews {
  std::vector<T> buf = std::vector<T>(64 * 8, T(0));
  sus::HeadsView<T> view(int slot, index_t B, index_t S, index_t H, index_t D, index_t sb, index_t ss, index_t sh) {
    return {buf.data() + 64 * slot, B, S, H, D, sb, ss, sh};
  }
};

template <class T>
std::string forward_message(EmptyViews<T>& e, index_t B, index_t S, index_t H_q, index_t H_kv, index_t stride,
                            sus::SaveForBackward save) {
  sus::AttentionState<T> state;
  state.save = save;
  return sus_test::error_message([&] {
    sus::multihead_attention_forward(
        e.view(0, B, S, H_q, 4, stride, stride, 4), e.view(1, B, S, H_kv, 4, stride, stride, 4),
        e.view(2, B, S, H_kv, 4, stride, stride, 4), e.view(3, B, S, H_q, 4, stride, stride, 4), state);
  });
}

// A read-only [B, S, H, D] view of a vector.
template <class T>
sus::HeadsView<const T> cbshd(const std::vector<T>& v, index_t B, index_t S, index_t H, index_t D) {
  return sus::bshd(v.data(), B, S, H, D);
}

}  // namespace

// Defect 1: a view with S = 0 skipped every size check, so B·H overflowed (H = 2^62) and the
// forward wrote through an empty lse vector (segfault).
TEMPLATE_TEST_CASE("robustness: (sequence, head) pairs that overflow index_t are rejected before any allocation",
                   "[robustness]", float, double) {
  using T = TestType;
  EmptyViews<T> e;
  for (auto save :
       {sus::SaveForBackward::lse_only, sus::SaveForBackward::sus_mask, sus::SaveForBackward::dense_weights}) {
    INFO("B = 2, S = 0, H = 2^62, save " << static_cast<int>(save));
    CHECK_THAT(forward_message(e, 2, 0, kHuge, 1, 0, save), StartsWith("sus::multihead_attention_forward:") &&
                                                                Contains("'Q'") && Contains("(sequence, head) pairs"));
  }
  // The backward, with a state that a small call filled: the pair count is checked first.
  sus::AttentionState<T> state;
  const std::string msg = sus_test::error_message([&] {
    sus::multihead_attention_backward(e.view(0, 2, 0, kHuge, 4, 0, 0, 4), e.view(1, 2, 0, 1, 4, 0, 0, 4),
                                      e.view(2, 2, 0, 1, 4, 0, 0, 4), e.view(3, 2, 0, kHuge, 4, 0, 0, 4),
                                      e.view(4, 2, 0, kHuge, 4, 0, 0, 4), state, e.view(5, 2, 0, kHuge, 4, 0, 0, 4),
                                      e.view(6, 2, 0, 1, 4, 0, 0, 4), e.view(7, 2, 0, 1, 4, 0, 0, 4));
  });
  CHECK_THAT(msg, StartsWith("sus::multihead_attention_backward:") && Contains("(sequence, head) pairs"));
  // Varlen: cu_seqlens of many empty sequences count as pairs too.
  sus::MultiHeadOptions o;
  o.cu_seqlens_q.assign(static_cast<std::size_t>(sus::max_heads_per_call / 4 + 2), 0);
  o.cu_seqlens_k = o.cu_seqlens_q;
  sus::AttentionState<T> vs;
  vs.save = sus::SaveForBackward::lse_only;
  CHECK_THAT(sus_test::error_message([&] {
               sus::multihead_attention_forward(e.view(0, 1, 0, 4, 4, 0, 0, 4), e.view(1, 1, 0, 4, 4, 0, 0, 4),
                                                e.view(2, 1, 0, 4, 4, 0, 0, 4), e.view(3, 1, 0, 4, 4, 0, 0, 4), vs, o);
             }),
             Contains("(sequence, head) pairs"));
  // The layout helpers multiply sizes: an overflow is an error, not a wrapped stride.
  CHECK_THAT(sus_test::error_message([&] { sus::bshd(e.buf.data(), 2, kHuge, 4, 4); }),
             StartsWith("sus::bshd:") && Contains("overflow"));
  CHECK_THAT(sus_test::error_message([&] { sus::bhsd(e.buf.data(), kHuge, 4, 4, 4); }),
             StartsWith("sus::bhsd:") && Contains("overflow"));
}

// Defect 2: an empty view with a huge batch (2^62) made the forward loop for as long as it was
// given, building one entry per sequence. Its own ctest case with a TIMEOUT (tests/CMakeLists.txt).
TEMPLATE_TEST_CASE("robustness: an empty view with a huge batch is rejected at once", "[.hang]", float, double) {
  using T = TestType;
  EmptyViews<T> e;
  for (index_t B : {kHuge, index_t(1) << 40, sus::max_heads_per_call + 1}) {
    INFO("B = " << B << ", S = 0, H = 1");
    CHECK_THAT(forward_message(e, B, 0, 1, 1, 0, sus::SaveForBackward::sus_mask),
               StartsWith("sus::multihead_attention_forward:") && Contains("(sequence, head) pairs"));
  }
  // At the limit the call is accepted and does nothing but fill the state (kept small here).
  sus::AttentionState<T> state;
  state.save = sus::SaveForBackward::sus_mask;
  REQUIRE_NOTHROW(sus::multihead_attention_forward(e.view(0, 4096, 0, 2, 4, 0, 0, 4), e.view(1, 4096, 0, 1, 4, 0, 0, 4),
                                                   e.view(2, 4096, 0, 1, 4, 0, 0, 4), e.view(3, 4096, 0, 2, 4, 0, 0, 4),
                                                   state));
  CHECK(state.masks.size() == 4096 * 2);
}

// Defect 3: Budget::waterfill with denormal weights. The water level (c − |S|)/rest overflowed
// to +inf, and min(1, inf·0) gave q = 1 to exact zeros: a row kept every zero entry.
TEST_CASE("robustness: waterfill with denormal weights keeps q = 0 on zeros and spends exactly c", "[robustness]") {
  const double tiny = std::numeric_limits<double>::denorm_min();
  const int c = 3;
  // One weight near 1, three denormals, then 1000 exact zeros: support 4 > c, so the level is
  // set by the denormals, λ = 2 / (3·tiny), far past DBL_MAX.
  std::vector<double> w(1004, 0.0);
  w[0] = 1.0;
  w[1] = w[2] = w[3] = tiny;
  std::vector<double> q(w.size());
  const double total =
      sus::inclusion_probabilities(w.data(), static_cast<index_t>(w.size()), c, sus::Budget::waterfill, q.data());
  CHECK(total == Approx(c).epsilon(1e-12));
  CHECK(q[0] == 1.0);
  for (int j = 1; j <= 3; ++j) CHECK(q[j] == Approx(2.0 / 3.0).epsilon(1e-12));
  index_t nonzero_q_on_zero_w = 0;
  for (std::size_t j = 4; j < w.size(); ++j) nonzero_q_on_zero_w += q[j] != 0.0;
  CHECK(nonzero_q_on_zero_w == 0);
  // Mixed: denormals of several sizes and zeros interleaved; every q in [0, 1], Σq = c.
  std::vector<double> w2(2000, 0.0);
  for (std::size_t j = 0; j < w2.size(); j += 3) w2[j] = tiny * static_cast<double>(1 + j % 17);
  w2[1] = 1.0;
  std::vector<double> q2(w2.size());
  const double total2 =
      sus::inclusion_probabilities(w2.data(), static_cast<index_t>(w2.size()), 8, sus::Budget::waterfill, q2.data());
  CHECK(total2 == Approx(8).epsilon(1e-9));
  for (std::size_t j = 0; j < w2.size(); ++j) {
    INFO("j = " << j << ", w = " << w2[j] << ", q = " << q2[j]);
    REQUIRE(q2[j] >= 0.0);
    REQUIRE(q2[j] <= 1.0);
    if (w2[j] == 0.0) REQUIRE(q2[j] == 0.0);
  }
  // Through sample_mask: no zero weight is kept; systematic keeps at most c per row.
  sus::Matrix<double> W =
      Eigen::Map<const sus::Matrix<double>>(w.data(), 1, static_cast<index_t>(w.size())).replicate(64, 1);
  for (auto draw : {sus::Draw::systematic, sus::Draw::independent}) {
    const sus::Csr<double> m = sus::sample_mask(W, sus::SamplerOptions{c, sus::Budget::waterfill, draw, 5});
    INFO("draw " << sus::to_string(draw) << ": " << m.nnz() << " kept in 64 rows");
    for (index_t p = 0; p < m.nnz(); ++p) REQUIRE(w[static_cast<std::size_t>(m.col_indices[p])] > 0.0);
    if (draw == sus::Draw::systematic) CHECK(m.max_row_nnz() <= c);
    CHECK(m.nnz() <= 64 * 4);  // only the 4 non-zero weights can be kept
  }
}

// Defect 4: the backwards accepted a huge finite scale (-1.7e38) and returned non-finite
// gradients without an error (the forward rejects the same scale through its overflow check).
TEMPLATE_TEST_CASE("robustness: a backward whose gradients overflow throws instead of returning Inf", "[robustness]",
                   float, double) {
  using T = TestType;
  const double huge = -0.5 * static_cast<double>(std::numeric_limits<T>::max());
  sus_test::Problem<T> p(6, 7, 4, 3, false, 3);
  sus::Csr<T> mask = sus::sample_mask(p.W, sus::SamplerOptions{2, sus::Budget::paper, sus::Draw::systematic, 1});
  sus_test::Grads<T> g(p);
  sus::AttentionOptions o;
  o.scale = huge;
  // dO·1e3: the unscaled sums s multiplies reach 1e2, so s·dS·K overflows.
  const sus::Matrix<T> dO3 = p.dO * T(1e3);
  CHECK_THAT(sus_test::error_message(
                 [&] { sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, dO3, mask, g.dQ, g.dK, g.dV, o); }),
             StartsWith("sus::attention_backward_sparse:") && Contains("not finite") && Contains("scale"));
  CHECK_THAT(sus_test::error_message(
                 [&] { sus::attention_backward_dense(p.Q, p.K, p.V, p.O, dO3, p.W, g.dQ, g.dK, g.dV, o); }),
             StartsWith("sus::attention_backward_dense:") && Contains("not finite"));
  // Adding into outputs near T's largest value overflows too, at the default scale, with
  // gradients that alone fit (a large dO: the increments reach T's last ulp).
  o.scale.reset();
  o.accumulate = true;
  const sus::Matrix<T> big_dO = p.dO * static_cast<T>(static_cast<double>(std::numeric_limits<T>::max()) / 1e6);
  g.dV.setConstant(std::numeric_limits<T>::max());
  g.dQ.setZero();
  g.dK.setZero();
  CHECK_THAT(sus_test::error_message(
                 [&] { sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, big_dO, mask, g.dQ, g.dK, g.dV, o); }),
             Contains("output 'dV'") && Contains("not finite"));
  o.accumulate = false;  // not adding: the same call's gradients are finite
  REQUIRE_NOTHROW(sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, big_dO, mask, g.dQ, g.dK, g.dV, o));
  CHECK((g.dQ.allFinite() && g.dK.allFinite() && g.dV.allFinite()));
  // The same scale on moderate inputs whose gradients fit is accepted (the bound is only a shortcut).
  o = {};
  o.scale = 1e3;
  REQUIRE_NOTHROW(sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, p.dO, mask, g.dQ, g.dK, g.dV, o));
  CHECK(g.dQ.allFinite());
  // Multi-head, both saved states, one and two threads (two threads: the two-pass schedule).
  // Q = 0 keeps the forward's scores finite at the huge scale; dQ = s·dS·K then overflows.
  const index_t B = 1, S = 6, H = 2, D = 4;
  std::vector<T> q(B * S * H * D, T(0)), k(q.size()), v(q.size()), out(q.size()), dout(q.size()), dq(q.size()),
      dk(q.size()), dv(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) {
    k[i] = T(0.25) * T(i % 5);
    v[i] = T(i % 7) - T(3);
    dout[i] = T(1e3) * (T(i % 3) - T(1));
  }
  for (auto save : {sus::SaveForBackward::sus_mask, sus::SaveForBackward::dense_weights}) {
    sus::AttentionState<T> state;
    state.save = save;
    sus::MultiHeadOptions mo;
    mo.scale = huge;
    sus::multihead_attention_forward(cbshd(q, B, S, H, D), cbshd(k, B, S, H, D), cbshd(v, B, S, H, D),
                                     sus::bshd(out.data(), B, S, H, D), state, mo);
    for (auto threads : {1, 2}) {
      mo.num_threads = threads;
      INFO("save " << static_cast<int>(save) << ", threads " << threads);
      CHECK_THAT(sus_test::error_message([&] {
                   sus::multihead_attention_backward(cbshd(q, B, S, H, D), cbshd(k, B, S, H, D), cbshd(v, B, S, H, D),
                                                     cbshd(out, B, S, H, D), cbshd(dout, B, S, H, D), state,
                                                     sus::bshd(dq.data(), B, S, H, D), sus::bshd(dk.data(), B, S, H, D),
                                                     sus::bshd(dv.data(), B, S, H, D), mo);
                 }),
                 StartsWith("sus::multihead_attention_backward:") && Contains("not finite") && Contains("'dQ'"));
    }
  }
}

// Defect 5, undefined behaviour that happened to be harmless (seen by UBSan in the sanitizer build).
TEST_CASE("robustness: Csr shapes whose rows + 1 overflow are rejected with the right count", "[robustness]") {
  // rows + 1 overflowed index_t in Csr::validate (the message printed a negative number).
  sus::Csr<float> m;
  m.rows = std::numeric_limits<index_t>::max();
  const std::string msg = sus_test::error_message([&] { m.validate(); });
  CHECK_THAT(msg, StartsWith("sus::Csr::validate:") && Contains("rows + 1 = 9223372036854775808"));
  CHECK_THAT(msg, !Contains("-9223372036854775808"));
  // The constructor sized its offsets with the same rows + 1.
  CHECK_THAT(sus_test::error_message([] { sus::Csr<float> big(std::numeric_limits<index_t>::max(), 1); }),
             StartsWith("sus::Csr:") && Contains("more rows"));
  CHECK_THAT(sus_test::error_message([] { sus::Csr<float> neg(-1, 1); }), Contains("negative shape"));
}

TEST_CASE("robustness: the backward's workspace is never null, even for an all-empty call", "[robustness]") {
  // A fresh thread's workspace was null for a request of 0 values, and the all-empty two-pass
  // backward offset that null pointer (packed_key_views: null + d).
  const float* p0 = nullptr;
  const double* p1 = nullptr;
  std::thread([&] {
    p0 = sus::detail::thread_workspace<float, 1>(0);
    p1 = sus::detail::thread_workspace<double>(0);
  }).join();
  CHECK(p0 != nullptr);
  CHECK(p1 != nullptr);
  // The call itself: K, V of every sequence empty, the two-pass schedule.
  using sus::detail::SparseSchedule;
  const index_t B = 2, H = 2, D = 4;
  std::vector<float> q(B * 3 * H * D, 0.25f), o(q.size(), 0.f), dout(q.size(), 1.f), dq(q.size(), 7.f);
  std::vector<float> kv(1, 0.f), dk(1, 7.f), dv(1, 7.f);
  sus::AttentionState<float> state;
  sus::MultiHeadOptions mo;
  mo.num_threads = 2;
  const sus::HeadsView<float> K(kv.data(), B, 0, H, D, 0, 0, D), V = K;
  sus::multihead_attention_forward(cbshd(q, B, 3, H, D), K, V, sus::bshd(o.data(), B, 3, H, D), state, mo);
  for (auto schedule : {SparseSchedule::two_pass, SparseSchedule::per_group}) {
    std::thread([&] {
      sus::detail::multihead_backward<float>(cbshd(q, B, 3, H, D), K, V, cbshd(o, B, 3, H, D), cbshd(dout, B, 3, H, D),
                                             state, sus::bshd(dq.data(), B, 3, H, D),
                                             sus::HeadsView<float>(dk.data(), B, 0, H, D, 0, 0, D),
                                             sus::HeadsView<float>(dv.data(), B, 0, H, D, 0, 0, D), mo, schedule);
    }).join();
    for (float x : dq) REQUIRE(x == 0.f);  // no key: zero gradient
    std::fill(dq.begin(), dq.end(), 7.f);
  }
}

TEMPLATE_TEST_CASE("robustness: empty views with huge strides address nothing", "[robustness]", float, double) {
  // With S = 0 the views' strides are never used, but head(b, h) still computed
  // data + b·stride_batch + h·stride_head: a signed overflow for b ≥ 2 at stride 2^62.
  using T = TestType;
  EmptyViews<T> e;
  for (auto save : {sus::SaveForBackward::sus_mask, sus::SaveForBackward::dense_weights}) {
    sus::AttentionState<T> state;
    state.save = save;
    const auto Q = e.view(0, 3, 0, 2, 4, kHuge, kHuge, kHuge), K = e.view(1, 3, 0, 1, 4, kHuge, kHuge, kHuge);
    const auto V = e.view(2, 3, 0, 1, 4, kHuge, kHuge, kHuge), O = e.view(3, 3, 0, 2, 4, kHuge, kHuge, kHuge);
    REQUIRE_NOTHROW(sus::multihead_attention_forward(Q, K, V, O, state));
    CHECK(state.sequences == 3);
    REQUIRE_NOTHROW(sus::multihead_attention_backward(
        Q, K, V, O, e.view(4, 3, 0, 2, 4, kHuge, kHuge, kHuge), state, e.view(5, 3, 0, 2, 4, kHuge, kHuge, kHuge),
        e.view(6, 3, 0, 1, 4, kHuge, kHuge, kHuge), e.view(7, 3, 0, 1, 4, kHuge, kHuge, kHuge)));
  }
}

// Found by tests/fuzz (fuzz_csr, kept as tests/fuzz/crashes/fuzz_csr-float-scale-beyond-flt-max):
// a scale finite as a double but infinite as a float (1e39) passed the check, and a float
// backward with a mask without entries returned dQ, dK = inf·0 = NaN and no error.
TEST_CASE("robustness: a scale beyond the type's range is rejected, not turned into inf", "[robustness]") {
  sus_test::Problem<float> p(4, 5, 3, 2, false, 9);
  const sus::Csr<float> empty(4, 5);
  sus_test::Grads<float> g(p);
  sus::AttentionOptions o;
  o.scale = 1e39;
  CHECK_THAT(sus_test::error_message([&] {
               sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, p.dO, empty, g.dQ, g.dK, g.dV, o);
             }),
             StartsWith("sus::attention_backward_sparse:") && Contains("options.scale") && Contains("float"));
  sus::Matrix<float> O(4, 2);
  CHECK_THAT(sus_test::error_message([&] { sus::attention_forward(p.Q, p.K, p.V, O, sus::NoRecord{}, o); }),
             StartsWith("sus::attention_forward:") && Contains("options.scale"));
  // The same scale is fine in double.
  sus_test::Problem<double> pd(4, 5, 3, 2, false, 9);
  sus_test::Grads<double> gd(pd);
  REQUIRE_NOTHROW(sus::attention_backward_sparse(pd.Q, pd.K, pd.V, pd.O, pd.dO, sus::Csr<double>(4, 5), gd.dQ, gd.dK,
                                                 gd.dV, o));
  CHECK((gd.dQ.array() == 0).all());
}

// Found by tests/fuzz (fuzz_heads): empty views (S = 0) with a head dim of 2^62 passed the
// checks, and the backward counted their rows in bytes, 2·(d + d_v)·sizeof(T): a signed
// overflow (UBSan). Head dims are now at most sus::detail::max_head_dim, empty views included.
TEMPLATE_TEST_CASE("robustness: head dims beyond max_head_dim are rejected, even in empty views", "[robustness]",
                   float, double) {
  using T = TestType;
  EmptyViews<T> e;
  const index_t D = index_t(1) << 62;
  sus::AttentionState<T> state;
  CHECK_THAT(sus_test::error_message([&] {
               sus::multihead_attention_forward(e.view(0, 2, 0, 2, D, 0, 0, 0), e.view(1, 2, 0, 1, D, 0, 0, 0),
                                                e.view(2, 2, 0, 1, D, 0, 0, 0), e.view(3, 2, 0, 2, D, 0, 0, 0), state);
             }),
             StartsWith("sus::multihead_attention_forward:") && Contains("'Q'") && Contains("head dim must be <="));
  CHECK_THAT(sus_test::error_message([&] {
               sus::multihead_attention_backward(
                   e.view(0, 2, 0, 2, 4, 0, 0, 4), e.view(1, 2, 0, 1, 4, 0, 0, 4), e.view(2, 2, 0, 1, D, 0, 0, 0),
                   e.view(3, 2, 0, 2, D, 0, 0, 0), e.view(4, 2, 0, 2, D, 0, 0, 0), state,
                   e.view(5, 2, 0, 2, 4, 0, 0, 4), e.view(6, 2, 0, 1, 4, 0, 0, 4), e.view(7, 2, 0, 1, D, 0, 0, 0));
             }),
             StartsWith("sus::multihead_attention_backward:") && Contains("'V'") && Contains("value dim must be <="));
  // A single-head Map of 0 rows and 2^62 columns.
  const Eigen::Map<const sus::Matrix<T>> Q(e.buf.data(), 0, D);
  sus::Matrix<T> none(0, 1);
  CHECK_THAT(sus_test::error_message([&] {
               sus::attention_forward(Q, Q, none, none, sus::NoRecord{});
             }),
             StartsWith("sus::attention_forward:") && Contains("head dim d must be <="));
}
