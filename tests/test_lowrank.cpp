// The low-rank (polynomial) estimator: the feature map against the Taylor polynomial, the
// prefix-sum backward and forward against their explicit n x n references, and the error
// against the exact gradient for tiny entries, bounded by the Taylor remainder.
#include <catch2/catch.hpp>

#include <sus/lowrank.hpp>

#include "test_util.hpp"

using namespace sus_test;

namespace {

// Q, K with every |s·q·k| ≤ B: rows of norm √(B/s) (Cauchy–Schwarz), directions random.
template <class T>
Problem<T> bounded_problem(index_t n_q, index_t n_k, index_t d, index_t d_v, bool causal, std::uint64_t seed,
                           double B) {
  Problem<T> p(n_q, n_k, d, d_v, causal, seed);
  const double s = 1.0 / std::sqrt(double(d)), radius = std::sqrt(B / s);
  for (M<T>* X : {&p.Q, &p.K})
    for (index_t i = 0; i < X->rows(); ++i) X->row(i) *= static_cast<T>(radius / X->row(i).norm());
  sus::DenseWeights<T> rec;
  sus::attention_forward(p.Q, p.K, p.V, p.O, rec, p.options);
  p.W = rec.W;
  return p;
}

template <class T>
sus::Vector<T> lse_of(const Problem<T>& p) {
  sus::LogSumExp<T> rec;
  M<T> O(p.Q.rows(), p.V.cols());
  sus::attention_forward(p.Q, p.K, p.V, O, rec, p.options);
  return rec.lse;
}

}  // namespace

TEST_CASE("lowrank feature map: r = C(d+g, g) and phi(s q) . phi(k) = T_g(s q.k)", "[lowrank]") {
  CHECK(sus::lowrank::feature_dim(1, 0) == 1);
  CHECK(sus::lowrank::feature_dim(3, 2) == 10);    // C(5, 2)
  CHECK(sus::lowrank::feature_dim(16, 4) == 4845);  // C(20, 4)
  CHECK(sus::lowrank::feature_dim(64, 2) == 2145);  // C(66, 2)
  for (index_t d : {index_t(1), index_t(3), index_t(7)})
    for (int g = 0; g <= 5; ++g) {
      INFO("d=" << d << " g=" << g);
      const sus::lowrank::FeatureMap<double> phi(d, g);
      REQUIRE(phi.dim() == sus::lowrank::feature_dim(d, g));
      const M<double> X = random_matrix<double>(4, d, 11 + d, 1.5), Y = random_matrix<double>(4, d, 12 + d, 1.5);
      const double s = -0.7;  // any sign
      M<double> FX(4, phi.dim()), FY(4, phi.dim());
      phi.apply(X, s, FX);
      phi.apply(Y, 1.0, FY);
      for (index_t i = 0; i < 4; ++i)
        for (index_t j = 0; j < 4; ++j) {
          const double want = sus::lowrank::taylor_exp(s * X.row(i).dot(Y.row(j)), g);
          CHECK(FX.row(i).dot(FY.row(j)) == Approx(want).epsilon(1e-12).margin(1e-12));
        }
    }
}

TEST_CASE("lowrank backward equals its explicit n x n reference within 1e-5 (float) and 1e-10 (double)",
          "[lowrank]") {
  struct Case {
    index_t n_q, n_k, d, d_v;
    bool causal;
    sus::CausalAlignment align;
    index_t block;
    const char* targets;
  };
  const Case cases[] = {
      {37, 37, 4, 3, true, sus::CausalAlignment::top_left, 8, "causal, several blocks, partial last block"},
      {37, 37, 4, 3, false, sus::CausalAlignment::top_left, 8, "non-causal: states only"},
      {20, 45, 3, 5, true, sus::CausalAlignment::bottom_right, 6, "n_q < n_k, bottom-right: the state starts full"},
      {45, 20, 3, 2, true, sus::CausalAlignment::bottom_right, 7, "n_q > n_k: leading rows see no key"},
      {30, 25, 5, 4, true, sus::CausalAlignment::top_left, 64, "one block: explicit part only"},
  };
  for (const Case& k : cases)
    for (int g : {0, 1, 2, 3}) {
      INFO(k.targets << " g=" << g);
      sus::lowrank::Options lo;
      lo.degree = g;
      lo.block = k.block;
      for (bool accumulate : {false, true}) {
        Problem<double> p(k.n_q, k.n_k, k.d, k.d_v, k.causal, 300 + g, 1.5);
        p.options.alignment = k.align;
        p.options.accumulate = accumulate;
        sus::attention_forward(p.Q, p.K, p.V, p.O, sus::NoRecord{}, p.options);
        const sus::Vector<double> lse = lse_of(p);
        Grads<double> got(p), ref(p);
        for (Grads<double>* gr : {&got, &ref}) gr->dQ.setConstant(0.5), gr->dK.setConstant(-0.25), gr->dV.setConstant(1);
        sus::lowrank::attention_backward<double>(p.Q, p.K, p.V, p.O, p.dO, lse, got.dQ, got.dK, got.dV, p.options, lo);
        sus::lowrank::reference::attention_backward<double>(p.Q, p.K, p.V, p.O, p.dO, lse, ref.dQ, ref.dK, ref.dV,
                                                            p.options, lo);
        check_grads_close(got, ref, 1e-10);
        // float against the double reference
        const M<float> Qf = p.Q.cast<float>(), Kf = p.K.cast<float>(), Vf = p.V.cast<float>(), Of = p.O.cast<float>(),
                       dOf = p.dO.cast<float>();
        const sus::Vector<float> lsef = lse.cast<float>();
        Grads<float> gf(p);
        gf.dQ = M<float>::Constant(k.n_q, k.d, 0.5f);
        gf.dK = M<float>::Constant(k.n_k, k.d, -0.25f);
        gf.dV = M<float>::Constant(k.n_k, k.d_v, 1.0f);
        sus::lowrank::attention_backward<float>(Qf, Kf, Vf, Of, dOf, lsef, gf.dQ, gf.dK, gf.dV, p.options, lo);
        check_grads_close(gf, ref, 1e-5);
      }
    }
}

TEST_CASE("lowrank forward equals its explicit reference, and large g approaches the exact forward", "[lowrank]") {
  for (bool causal : {false, true}) {
    INFO("causal=" << causal);
    Problem<double> p(33, 33, 4, 3, causal, 77, 1.0);
    sus::lowrank::Options lo;
    lo.block = 5;
    for (int g : {0, 2, 4}) {
      lo.degree = g;
      M<double> got(33, 3), ref(33, 3);
      sus::lowrank::attention_forward<double>(p.Q, p.K, p.V, got, p.options, lo);
      sus::lowrank::reference::attention_forward<double>(p.Q, p.K, p.V, ref, p.options, lo);
      CHECK(max_rel_error(got, ref) <= 1e-10);
    }
    const Problem<double> q = bounded_problem<double>(33, 33, 4, 3, causal, 78, 0.5);
    lo.degree = 12;
    M<double> approx(33, 3);
    sus::lowrank::attention_forward<double>(q.Q, q.K, q.V, approx, q.options, lo);
    CHECK(max_rel_error(approx, q.O) <= 1e-9);  // remainder 0.5^13/13! ≈ 2e-14, plus rounding
  }
}

TEST_CASE("lowrank error vs the exact gradient for entries B <= 0.1 falls with g within the Taylor bound",
          "[lowrank]") {
  // Every weight is W_ij (1 + δ_ij) with |δ_ij| ≤ ε_g = e^{2B} B^{g+1} / (g+1)!, and each
  // gradient is linear in the weights, so entrywise
  //   |dV~ − dV|_jk ≤ ε_g Σ_i W_ij |dO_ik|,   |dQ~ − dQ|_ik ≤ ε_g s Σ_j W_ij |dP_ij − D_i| |K_jk|,
  //   |dK~ − dK|_jk ≤ ε_g s Σ_i W_ij |dP_ij − D_i| |Q_ik|.
  // The check is that bound (plus 1e-13 of rounding), and a fall of ≥ 5x per degree (the
  // remainder falls by ≈ B/(g+2) ≤ 1/20 per degree). Deterministic: no false failures.
  const double B = 0.1;
  for (bool causal : {false, true}) {
    INFO("causal=" << causal);
    const index_t n = 40, d = 4, d_v = 3;
    const Problem<double> p = bounded_problem<double>(n, n, d, d_v, causal, 500, B);
    const double s = 1.0 / std::sqrt(double(d));
    const double max_entry = (s * p.Q * p.K.transpose()).cwiseAbs().maxCoeff();
    REQUIRE(max_entry <= B * (1 + 1e-12));
    Grads<double> exact(p);
    sus::reference::attention_backward_dense<double>(p.Q, p.K, p.V, p.O, p.dO, p.W, exact.dQ, exact.dK, exact.dV,
                                                     p.options);
    // The entrywise bound's sums (without ε).
    M<double> bQ = M<double>::Zero(n, d), bK = M<double>::Zero(n, d), bV = M<double>::Zero(n, d_v);
    for (index_t i = 0; i < n; ++i) {
      const double D = p.dO.row(i).dot(p.O.row(i));
      for (index_t j = 0; j < n; ++j) {
        const double w = p.W(i, j);
        if (w == 0) continue;
        const double c = std::abs(p.dO.row(i).dot(p.V.row(j)) - D);
        bQ.row(i) += s * w * c * p.K.row(j).cwiseAbs();
        bK.row(j) += s * w * c * p.Q.row(i).cwiseAbs();
        bV.row(j) += w * p.dO.row(i).cwiseAbs();
      }
    }
    const sus::Vector<double> lse = lse_of(p);
    double previous = 0, factorial = 1;
    for (int g = 0; g <= 4; ++g) {
      INFO("g=" << g);
      factorial *= g + 1;
      const double eps = std::exp(2 * B) * std::pow(B, g + 1) / factorial;
      sus::lowrank::Options lo;
      lo.degree = g;
      lo.block = 16;
      Grads<double> approx(p);
      sus::lowrank::attention_backward<double>(p.Q, p.K, p.V, p.O, p.dO, lse, approx.dQ, approx.dK, approx.dV,
                                               p.options, lo);
      const double over_Q = ((approx.dQ - exact.dQ).cwiseAbs() - eps * bQ).maxCoeff();
      const double over_K = ((approx.dK - exact.dK).cwiseAbs() - eps * bK).maxCoeff();
      const double over_V = ((approx.dV - exact.dV).cwiseAbs() - eps * bV).maxCoeff();
      CAPTURE(eps, over_Q, over_K, over_V);
      CHECK(over_Q <= 1e-13);
      CHECK(over_K <= 1e-13);
      CHECK(over_V <= 1e-13);
      const double err = std::max({max_rel_error(approx.dQ, exact.dQ), max_rel_error(approx.dK, exact.dK),
                                   max_rel_error(approx.dV, exact.dV)});
      CAPTURE(err, previous);
      if (g > 0) CHECK(err <= previous / 5);
      previous = err;
    }
  }
}

TEST_CASE("lowrank rejects bad degree, lse and oversized states with sus::Error naming the argument", "[lowrank]") {
  Problem<float> p(10, 10, 4, 4, true, 9);
  const sus::Vector<float> lse = lse_of(p);
  Grads<float> g(p);
  sus::lowrank::Options lo;
  auto run = [&](const sus::Vector<float>& l) {
    return error_message([&] {
      sus::lowrank::attention_backward<float>(p.Q, p.K, p.V, p.O, p.dO, l, g.dQ, g.dK, g.dV, p.options, lo);
    });
  };
  lo.degree = -1;
  CHECK_THAT(run(lse), Catch::Contains("options.degree = -1"));
  lo.degree = 2;
  CHECK_THAT(run(lse.head(9)), Catch::Contains("argument 'lse' has 9 entries, expected n_q = 10"));
  sus::Vector<float> bad = lse;
  bad[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THAT(run(bad), Catch::Contains("argument 'lse'") && Catch::Contains("row 3"));
  lo.max_state = 100;
  CHECK_THAT(run(lse), Catch::Contains("needs a state of r·d·d_v = 15·4·4") && Catch::Contains("max_state = 100"));
  lo.max_state = index_t(1) << 28;
  lo.block = 0;
  CHECK_THAT(run(lse), Catch::Contains("options.block = 0"));
  CHECK_THAT(error_message([] { sus::lowrank::feature_dim(0, 2); }), Catch::Contains("head dim d = 0"));
  // Odd degree on very negative scores: the forward's normaliser goes negative and is reported.
  const M<double> Qn = M<double>::Constant(6, 2, 10.0), Kn = -Qn, Vn = random_matrix<double>(6, 2, 4);
  M<double> O(6, 2);  // every score s·q·k = −200/√2: T_1 = 1 + s·q·k < 0
  sus::lowrank::Options odd;
  odd.degree = 1;
  CHECK_THAT(error_message([&] { sus::lowrank::attention_forward<double>(Qn, Kn, Vn, O, {}, odd); }),
             Catch::Contains("row 0") && Catch::Contains("normaliser") && Catch::Contains("not positive"));
  // The reference forward checks its arguments as the fast one does, and reports the same row.
  CHECK_THAT(error_message([&] { sus::lowrank::reference::attention_forward<double>(Qn, Kn, Vn, O, {}, odd); }),
             Catch::Contains("lowrank::reference::attention_forward") && Catch::Contains("row 0") &&
                 Catch::Contains("not positive"));
  const M<double> K_bad = random_matrix<double>(6, 3, 5);  // d = 3, Q has d = 2
  CHECK_THAT(error_message([&] { sus::lowrank::reference::attention_forward<double>(Qn, K_bad, Vn, O); }),
             Catch::Contains("argument 'K' has shape 6x3") && Catch::Contains("expected 6x2"));
  M<double> O_bad(5, 2);
  CHECK_THAT(error_message([&] { sus::lowrank::reference::attention_forward<double>(Qn, Kn, Vn, O_bad); }),
             Catch::Contains("argument 'O' has shape 5x2") && Catch::Contains("expected 6x2"));
  lo.degree = -1;
  CHECK_THAT(error_message([&] { sus::lowrank::reference::attention_forward<double>(Qn, Kn, Vn, O, {}, lo); }),
             Catch::Contains("options.degree = -1"));
}
