// Forward: the fast blocked forward against the float64 reference, the reference against a
// direct Eigen formula, and every recorder.
#include <catch2/catch.hpp>

#include "test_util.hpp"

using namespace sus_test;

namespace {

// Each row names what it targets.
const Shape kForwardShapes[] = {
    {1, 1, 1, 1, false, "smallest problem: one query, one key, d = 1"},
    {1, 1, 4, 4, true, "causal n = 1: row 0 sees only key 0"},
    {7, 13, 5, 3, false, "cross attention n_q < n_k, odd d, d_v != d"},
    {64, 64, 16, 16, true, "causal, exactly one forward row block"},
    {130, 130, 64, 64, true, "causal, partial last row block (64 + 64 + 2)"},
    {200, 150, 32, 48, false, "n_q > n_k, d_v > d, several blocks"},
    {300, 300, 64, 64, false, "non-causal, 4 full blocks + partial"},
};

// The float64 reference on float inputs cast to double.
struct Reference64 {
  M<double> O, W;
  sus::Vector<double> lse;
  Reference64(const M<float>& Q, const M<float>& K, const M<float>& V, const sus::AttentionOptions& o)
      : O(Q.rows(), V.cols()) {
    sus::DenseWeights<double> w;
    sus::LogSumExp<double> l;
    sus::reference::attention_forward<double>(Q.cast<double>(), K.cast<double>(), V.cast<double>(), O,
                                              sus::recorders(w, l), o);
    W = w.W;
    lse = l.lse;
  }
};

}  // namespace

TEST_CASE("forward (float) matches the float64 reference within 1e-5", "[forward]") {
  std::uint64_t seed = 100;
  for (const Shape& s : kForwardShapes) {
    INFO(s.targets << ": n_q=" << s.n_q << " n_k=" << s.n_k << " d=" << s.d << " d_v=" << s.d_v);
    sus::AttentionOptions o;
    o.causal = s.causal;
    const M<float> Q = random_matrix<float>(s.n_q, s.d, seed++, 2.0), K = random_matrix<float>(s.n_k, s.d, seed++, 2.0),
                   V = random_matrix<float>(s.n_k, s.d_v, seed++);
    M<float> O(s.n_q, s.d_v);
    sus::DenseWeights<float> w;
    sus::LogSumExp<float> l;
    sus::attention_forward(Q, K, V, O, sus::recorders(w, l), o);
    const Reference64 ref(Q, K, V, o);
    const double eO = max_rel_error(O, ref.O), eW = max_rel_error(w.W, ref.W), eL = max_rel_error(l.lse, ref.lse);
    CAPTURE(eO, eW, eL);
    CHECK(eO <= 1e-5);
    CHECK(eW <= 1e-5);
    CHECK(eL <= 1e-5);
    // Double fast path against the double reference: only summation order differs.
    M<double> O64(s.n_q, s.d_v);
    sus::attention_forward(Q.cast<double>(), K.cast<double>(), V.cast<double>(), O64, sus::NoRecord{}, o);
    const double e64 = max_rel_error(O64, ref.O);
    CAPTURE(e64);
    CHECK(e64 <= 1e-12);
  }
}

TEST_CASE("reference forward matches softmax(s Q K^T) V written with Eigen", "[forward][reference]") {
  for (bool causal : {false, true}) {
    const index_t n = 37, d = 8;
    const M<double> Q = random_matrix<double>(n, d, 7, 2.0), K = random_matrix<double>(n, d, 8, 2.0),
                    V = random_matrix<double>(n, d, 9);
    sus::AttentionOptions o;
    o.causal = causal;
    o.scale = 0.3;
    M<double> O(n, d);
    sus::DenseWeights<double> w;
    sus::LogSumExp<double> l;
    sus::reference::attention_forward<double>(Q, K, V, O, sus::recorders(w, l), o);
    // Direct: E = exp(S) with masked entries 0, W = E / rowsum(E).
    M<double> S = 0.3 * Q * K.transpose();
    M<double> E = S.array().exp();
    if (causal) E.triangularView<Eigen::StrictlyUpper>().setZero();
    const sus::Vector<double> Z = E.rowwise().sum();
    const M<double> W = (E.array().colwise() / Z.array()).matrix();
    const double eW = max_rel_error(w.W, W), eO = max_rel_error(O, W * V),
                 eL = max_rel_error(l.lse, Z.array().log().matrix());
    CAPTURE(causal, eW, eO, eL);
    CHECK(eW <= 1e-13);
    CHECK(eO <= 1e-13);
    CHECK(eL <= 1e-13);
  }
}

TEST_CASE("SusMask recorder equals sample_mask of the recorded W, bit for bit", "[forward][sampler]") {
  const index_t n = 150, d = 16;
  for (bool causal : {false, true})
    for (auto budget : {sus::Budget::paper, sus::Budget::waterfill})
      for (auto draw : {sus::Draw::independent, sus::Draw::systematic}) {
        INFO("causal=" << causal << " " << sus::to_string(budget) << "/" << sus::to_string(draw));
        const Problem<float> p(n, n, d, d, causal, 31);
        const sus::SamplerOptions so{6, budget, draw, 1234};
        sus::SusMask<float> fused(so);
        sus::DenseWeights<float> dense;
        M<float> O(n, d);
        sus::attention_forward(p.Q, p.K, p.V, O, sus::recorders(fused, dense), p.options);
        const sus::Csr<float> after = sus::sample_mask(dense.W, so);
        fused.mask.validate(draw == sus::Draw::systematic ? 6 : -1);
        CHECK(fused.mask.row_offsets == after.row_offsets);
        CHECK(fused.mask.col_indices == after.col_indices);
        CHECK(fused.mask.values == after.values);
      }
}

TEST_CASE("SusMask gives the same CSR when rows arrive out of order", "[forward][sampler]") {
  const Problem<double> p(40, 40, 8, 8, true, 5);
  const sus::SamplerOptions so{3, sus::Budget::paper, sus::Draw::independent, 99};
  sus::SusMask<double> forward_order(so), reverse_order(so);
  for (auto* rec : {&forward_order, &reverse_order}) rec->begin(p.W.rows(), p.W.cols());
  for (index_t i = 0; i < p.W.rows(); ++i) forward_order.record(i, p.W.row(i).data(), p.W.cols(), 0.0);
  for (index_t i = p.W.rows() - 1; i >= 0; --i) reverse_order.record(i, p.W.row(i).data(), p.W.cols(), 0.0);
  forward_order.end();
  reverse_order.end();
  reverse_order.mask.validate();
  CHECK(forward_order.mask.row_offsets == reverse_order.mask.row_offsets);
  CHECK(forward_order.mask.col_indices == reverse_order.mask.col_indices);
  CHECK(forward_order.mask.values == reverse_order.mask.values);
}

TEST_CASE("log-sum-exp reproduces W: W_ij = exp(s q_i.k_j - lse_i)", "[forward]") {
  const index_t n = 90, d = 32;
  const Problem<float> p(n, n, d, d, true, 77, 2.0);
  sus::LogSumExp<float> l;
  M<float> O(n, d);
  sus::attention_forward(p.Q, p.K, p.V, O, l, p.options);
  const double s = 1.0 / std::sqrt(double(d));
  M<double> S = s * p.Q.cast<double>() * p.K.cast<double>().transpose();
  M<double> W = (S.array().colwise() - l.lse.cast<double>().array()).exp();
  W.triangularView<Eigen::StrictlyUpper>().setZero();
  const double e = max_rel_error(W, p.W);
  CAPTURE(e);
  CHECK(e <= 1e-5);
}
