// Edge cases: n = 1, d = 1, d_v != d, n_q != n_k, c = 1, c >= n, causal row 0, rows with exact
// zeros, sizes that leave partial row blocks, accumulate, explicit scale, empty problems.
//
// Every case runs the fast paths (attention_forward with DenseWeights + LogSumExp + SusMask,
// attention_backward_dense, attention_backward_sparse on a sample_mask mask) against the
// sus::reference:: versions on the same inputs:
//   max |fast − reference| / max |reference| <= 1e-5 (float), 1e-12 (double),
// and checks that every output is finite.
#include <catch2/catch.hpp>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "test_util.hpp"

namespace {

using sus::index_t;
using sus_test::Grads;
using sus_test::M;

template <class T>
constexpr double tol() {
  return std::is_same<T, float>::value ? 1e-5 : 1e-12;
}

// max|a − b| / max|b| (0 for empty matrices; shapes must agree).
template <class A, class B>
double rel_diff(const A& a, const B& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  if (b.size() == 0) return 0;
  return sus_test::max_rel_error(a, b);
}

#define CHECK_CLOSE(T, what, a, b)                                                                           \
  do {                                                                                                       \
    const double err_ = rel_diff(a, b);                                                                      \
    INFO(what << ": max |a − b| / max |b| = " << err_ << " (tolerance " << tol<T>() << ")");                 \
    CHECK(err_ <= tol<T>());                                                                                 \
  } while (0)

template <class T>
bool csr_equal(const sus::Csr<T>& a, const sus::Csr<T>& b) {
  return a.rows == b.rows && a.cols == b.cols && a.row_offsets == b.row_offsets && a.col_indices == b.col_indices &&
         a.values == b.values;
}

template <class T>
bool finite_grads(const Grads<T>& g) {
  return g.dQ.allFinite() && g.dK.allFinite() && g.dV.allFinite();
}

const char* variant_name(const sus::SamplerOptions& so) {
  static std::string s;
  s = std::string(sus::to_string(so.budget)) + "/" + sus::to_string(so.draw) + "/c=" + std::to_string(so.c);
  return s.c_str();
}

struct EdgeCase {
  const char* name;  // the case and the bug it targets
  index_t n_q, n_k, d, d_v;
  bool causal;
  double qk_scale;  // Q, K entries uniform in [−qk_scale, qk_scale]
  std::optional<double> scale;
  int c;
  sus::Budget budget;
  sus::Draw draw;
};

// Everything one case computes, fast and reference.
template <class T>
struct Run {
  M<T> Q, K, V, dO;
  sus::AttentionOptions opt;
  M<T> O_fast, O_ref;
  sus::DenseWeights<T> W_fast, W_ref;
  sus::LogSumExp<T> lse_fast, lse_ref;
  sus::Csr<T> mask;  // sample_mask(W_fast)
  Grads<T> dense_fast, dense_ref, sparse_fast, sparse_ref;

  Run(index_t n_q, index_t n_k, index_t d, index_t d_v)
      : dense_fast(n_q, n_k, d, d_v), dense_ref(n_q, n_k, d, d_v), sparse_fast(n_q, n_k, d, d_v),
        sparse_ref(n_q, n_k, d, d_v) {}
};

// Runs every path on one case and checks fast == reference and finiteness.
template <class T>
Run<T> run_case(const EdgeCase& c, std::uint64_t seed) {
  INFO("case: " << c.name << " [n_q=" << c.n_q << " n_k=" << c.n_k << " d=" << c.d << " d_v=" << c.d_v
                << (c.causal ? " causal" : "") << " " << (std::is_same<T, float>::value ? "float" : "double") << "]");
  Run<T> r(c.n_q, c.n_k, c.d, c.d_v);
  r.Q = sus_test::random_matrix<T>(c.n_q, c.d, seed, c.qk_scale);
  r.K = sus_test::random_matrix<T>(c.n_k, c.d, seed + 1, c.qk_scale);
  r.V = sus_test::random_matrix<T>(c.n_k, c.d_v, seed + 2);
  r.dO = sus_test::random_matrix<T>(c.n_q, c.d_v, seed + 3);
  r.opt.causal = c.causal;
  r.opt.scale = c.scale;
  sus::SamplerOptions so;
  so.c = c.c;
  so.budget = c.budget;
  so.draw = c.draw;
  so.seed = seed;
  INFO("sampler: " << variant_name(so));

  // Forward: fast with three recorders at once, reference with two.
  r.O_fast.resize(c.n_q, c.d_v);
  r.O_ref.resize(c.n_q, c.d_v);
  sus::SusMask<T> streamed(so);
  sus::attention_forward(r.Q, r.K, r.V, r.O_fast, sus::recorders(r.W_fast, r.lse_fast, streamed), r.opt);
  sus::reference::attention_forward<T>(r.Q, r.K, r.V, r.O_ref, sus::recorders(r.W_ref, r.lse_ref), r.opt);
  CHECK(r.O_fast.allFinite());
  CHECK(r.W_fast.W.allFinite());
  CHECK_CLOSE(T, "O", r.O_fast, r.O_ref);
  CHECK_CLOSE(T, "W", r.W_fast.W, r.W_ref.W);
  if (c.n_k > 0) {
    CHECK(r.lse_fast.lse.allFinite());
    CHECK_CLOSE(T, "lse", r.lse_fast.lse, r.lse_ref.lse);
  }

  // Sampler: the streamed mask equals sample_mask of the recorded W, is valid, keeps only
  // non-zero weights, and systematic rows hold at most c entries.
  r.mask = sus::sample_mask(r.W_fast.W, so);
  CHECK(csr_equal(streamed.mask, r.mask));
  REQUIRE_NOTHROW(r.mask.validate(c.draw == sus::Draw::systematic ? c.c : -1));
  index_t kept_zero = 0;
  for (index_t i = 0; i < r.mask.rows; ++i)
    for (index_t p = r.mask.row_offsets[i]; p < r.mask.row_offsets[i + 1]; ++p)
      kept_zero += !(r.W_fast.W(i, r.mask.col_indices[p]) > T(0)) || !(r.mask.values[p] > T(0));
  CHECK(kept_zero == 0);

  // Backwards.
  sus::attention_backward_dense(r.Q, r.K, r.V, r.O_fast, r.dO, r.W_fast.W, r.dense_fast.dQ, r.dense_fast.dK,
                                r.dense_fast.dV, r.opt);
  sus::reference::attention_backward_dense<T>(r.Q, r.K, r.V, r.O_fast, r.dO, r.W_fast.W, r.dense_ref.dQ,
                                              r.dense_ref.dK, r.dense_ref.dV, r.opt);
  sus::attention_backward_sparse(r.Q, r.K, r.V, r.O_fast, r.dO, r.mask, r.sparse_fast.dQ, r.sparse_fast.dK,
                                 r.sparse_fast.dV, r.opt);
  sus::reference::attention_backward_sparse<T>(r.Q, r.K, r.V, r.O_fast, r.dO, r.mask, r.sparse_ref.dQ,
                                               r.sparse_ref.dK, r.sparse_ref.dV, r.opt);
  CHECK(finite_grads(r.dense_fast));
  CHECK(finite_grads(r.sparse_fast));
  CHECK_CLOSE(T, "dense dQ", r.dense_fast.dQ, r.dense_ref.dQ);
  CHECK_CLOSE(T, "dense dK", r.dense_fast.dK, r.dense_ref.dK);
  CHECK_CLOSE(T, "dense dV", r.dense_fast.dV, r.dense_ref.dV);
  CHECK_CLOSE(T, "sparse dQ", r.sparse_fast.dQ, r.sparse_ref.dQ);
  CHECK_CLOSE(T, "sparse dK", r.sparse_fast.dK, r.sparse_ref.dK);
  CHECK_CLOSE(T, "sparse dV", r.sparse_fast.dV, r.sparse_ref.dV);
  return r;
}

constexpr auto P = sus::Budget::paper;
constexpr auto WF = sus::Budget::waterfill;
constexpr auto IND = sus::Draw::independent;
constexpr auto SYS = sus::Draw::systematic;

// The table. Name: the shape of the case — the bug it targets.
const EdgeCase kCases[] = {
    // name                                                          n_q  n_k   d d_v causal  qk  scale  c  budget draw
    {"n_q = n_k = 1 — single-entry softmax, W = 1, D_i = dP_ii", 1, 1, 4, 3, false, 1, {}, 2, P, IND},
    {"n_q = n_k = 1 causal — block with one row, kv = 1", 1, 1, 4, 3, true, 1, {}, 2, WF, SYS},
    {"n_q = 1, n_k = 7 — one query row, partial everything", 1, 7, 3, 2, false, 1, {}, 2, P, SYS},
    {"n_q = 7, n_k = 1 — one key, every W row is [1]", 7, 1, 3, 2, false, 1, {}, 2, WF, IND},
    {"d = 1 — default scale 1/sqrt(1), rank-1 scores", 9, 9, 1, 3, false, 2, {}, 3, P, IND},
    {"d = 1, d_v = 1 causal", 9, 9, 1, 1, true, 2, {}, 3, WF, SYS},
    {"d_v != d (3 vs 7) — V/dV shapes not confused with K/dK", 10, 10, 3, 7, false, 1, {}, 3, P, SYS},
    {"d_v != d (8 vs 2) causal", 10, 10, 8, 2, true, 1, {}, 3, WF, IND},
    {"cross attention n_q < n_k — n_k used for W columns, not n_q", 5, 9, 4, 3, false, 1, {}, 3, P, IND},
    {"cross attention n_q > n_k — dK/dV sized n_k", 9, 5, 4, 3, false, 1, {}, 3, WF, SYS},
    {"c = 1 paper/independent — q = W, values W/q = 1", 12, 12, 4, 3, false, 1, {}, 1, P, IND},
    {"c = 1 paper/systematic — exactly one point per row", 12, 12, 4, 3, true, 1, {}, 1, P, SYS},
    {"c = 1 waterfill/independent — λ = 1/Σw", 12, 12, 4, 3, false, 1, {}, 1, WF, IND},
    {"c = 1 waterfill/systematic", 12, 12, 4, 3, true, 1, {}, 1, WF, SYS},
    {"c = n waterfill/independent — everything non-zero kept with q = 1", 8, 8, 4, 3, false, 1, {}, 8, WF, IND},
    {"c > n waterfill/systematic causal", 8, 8, 4, 3, true, 1, {}, 50, WF, SYS},
    {"c > n paper/independent — weights >= 1/c saturate", 8, 8, 4, 3, false, 1, {}, 50, P, IND},
    {"huge scores: weights down to the exp clamp (denormals) — no 0/0, no overflow in W/q", 40, 40, 4, 3, false, 30,
     {}, 4, P, IND},
    {"huge scores causal, waterfill/systematic — huge dynamic range in the water level", 40, 40, 4, 3, true, 30, {}, 4,
     WF, SYS},
    {"huge scores, waterfill/independent, c = 1", 40, 40, 4, 3, false, 30, {}, 1, WF, IND},
    {"n = 300 — partial forward (64) and dense-backward (256) row blocks", 300, 300, 8, 8, false, 1, {}, 8, P, IND},
    {"n = 300 causal — block-wise kv limits with partial blocks", 300, 300, 8, 8, true, 1, {}, 8, WF, SYS},
    {"n_q = 300, n_k = 70 — partial blocks in cross attention", 300, 70, 5, 6, false, 1, {}, 5, WF, IND},
    {"n_q = 65, n_k = 257 — one row past a block boundary", 65, 257, 4, 4, false, 1, {}, 5, P, SYS},
    {"explicit scale 0.37 (not 1/sqrt(d))", 20, 20, 4, 3, false, 1, 0.37, 4, P, IND},
    {"explicit negative scale −2", 20, 20, 4, 3, true, 1, -2.0, 4, WF, SYS},
    {"explicit scale 0 — uniform weights", 20, 20, 4, 3, false, 1, 0.0, 4, P, SYS},
};

template <class T>
void run_table() {
  for (const auto& c : kCases) run_case<T>(c, 1234);
}

// Backward calls used by the accumulate / overwrite tests.
enum class Bwd { dense, sparse, ref_dense, ref_sparse };
const char* to_string(Bwd b) {
  switch (b) {
    case Bwd::dense: return "attention_backward_dense";
    case Bwd::sparse: return "attention_backward_sparse";
    case Bwd::ref_dense: return "reference::attention_backward_dense";
    default: return "reference::attention_backward_sparse";
  }
}
template <class T>
void backward(Bwd b, const Run<T>& r, Grads<T>& g, const sus::AttentionOptions& opt) {
  switch (b) {
    case Bwd::dense:
      sus::attention_backward_dense(r.Q, r.K, r.V, r.O_fast, r.dO, r.W_fast.W, g.dQ, g.dK, g.dV, opt);
      break;
    case Bwd::sparse:
      sus::attention_backward_sparse(r.Q, r.K, r.V, r.O_fast, r.dO, r.mask, g.dQ, g.dK, g.dV, opt);
      break;
    case Bwd::ref_dense:
      sus::reference::attention_backward_dense<T>(r.Q, r.K, r.V, r.O_fast, r.dO, r.W_fast.W, g.dQ, g.dK, g.dV, opt);
      break;
    case Bwd::ref_sparse:
      sus::reference::attention_backward_sparse<T>(r.Q, r.K, r.V, r.O_fast, r.dO, r.mask, g.dQ, g.dK, g.dV, opt);
      break;
  }
}
constexpr Bwd kBackwards[] = {Bwd::dense, Bwd::sparse, Bwd::ref_dense, Bwd::ref_sparse};

}  // namespace

// ---------------------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("edge: fast paths match the references on the edge-case table", "[edge]", float, double) {
  run_table<TestType>();
}

TEMPLATE_TEST_CASE("edge: n_q = n_k = 1 gives W = 1, O = V, dV = dO and (near) zero dQ, dK", "[edge]", float, double) {
  using T = TestType;
  for (bool causal : {false, true}) {
    const auto r = run_case<T>({"n = 1", 1, 1, 4, 3, causal, 1, {}, 1, P, IND}, 5);
    CHECK(r.W_fast.W(0, 0) == T(1));
    CHECK(r.W_ref.W(0, 0) == T(1));
    CHECK(r.O_fast == r.V);  // 1·V exactly
    REQUIRE(r.mask.nnz() == 1);
    CHECK(r.mask.values[0] == T(1));  // W/q = 1/1
    CHECK(r.dense_fast.dV == r.dO);
    CHECK(r.sparse_fast.dV == r.dO);
    // dS = 1·(dP − D) with D = dO·O = dO·V = dP: zero up to the rounding of two d_v-term dot products.
    const double bound = 4 * std::numeric_limits<T>::epsilon() * r.dO.cwiseAbs().sum() * r.V.cwiseAbs().maxCoeff() *
                         std::max(r.Q.cwiseAbs().maxCoeff(), r.K.cwiseAbs().maxCoeff());
    for (const Grads<T>* g : {&r.dense_fast, &r.sparse_fast, &r.dense_ref, &r.sparse_ref}) {
      CAPTURE(g->dQ, g->dK, bound);
      CHECK(g->dQ.cwiseAbs().maxCoeff() <= bound);
      CHECK(g->dK.cwiseAbs().maxCoeff() <= bound);
    }
  }
}

// c = 1, all four budget x draw variants, over several seeds.
TEMPLATE_TEST_CASE("edge: c = 1 with every budget and draw", "[edge][sampler]", float, double) {
  using T = TestType;
  for (auto budget : {P, WF})
    for (auto draw : {IND, SYS})
      for (bool causal : {false, true})
        for (std::uint64_t seed : {1u, 2u, 3u}) {
          const auto r = run_case<T>({"c = 1", 16, 16, 4, 3, causal, 1, {}, 1, budget, draw}, seed);
          INFO(sus::to_string(budget) << "/" << sus::to_string(draw) << (causal ? " causal" : "") << " seed " << seed);
          const auto& m = r.mask;
          for (index_t i = 0; i < m.rows; ++i) {
            if (draw == SYS) CHECK(m.row_nnz(i) <= 1);  // hard cap c = 1
            for (index_t p = m.row_offsets[i]; p < m.row_offsets[i + 1]; ++p) {
              const T w = r.W_fast.W(i, m.col_indices[p]);
              if (budget == P) {
                CAPTURE(i, w, m.values[p]);
                CHECK(m.values[p] == T(1));  // q = min(1, 1·w) = w, so W/q = 1 exactly
              } else {
                // waterfill, c = 1: q = λ·w with λ = 1/Σ_j w_j (Σ q = 1), so W/q = Σ_j w_j ≈ 1
                CAPTURE(i, w, m.values[p]);
                CHECK(std::abs(static_cast<double>(m.values[p]) - 1.0) <= 10 * sus::row_sum_tolerance<T>());
              }
            }
          }
          if (draw == SYS) {  // Σ q = 1 per row: one point per row, so (almost surely) one entry per row
            CAPTURE(m.nnz());
            CHECK(m.nnz() >= m.rows - 1);
          }
        }
}

// c >= number of non-zero weights, waterfill: every non-zero weight has q = 1, so the mask is W
// exactly and the sparse backward is the dense backward.
TEMPLATE_TEST_CASE("edge: c >= n with waterfill keeps W exactly, and the sparse backward equals the dense one", "[edge][sampler]",
                   float, double) {
  using T = TestType;
  const index_t n = 24;
  for (int c : {24, 25, 1000})
    for (auto draw : {IND, SYS})
      for (bool causal : {false, true}) {
        const auto r = run_case<T>({"c >= n", n, n, 4, 3, causal, 1, {}, c, WF, draw}, 77);
        INFO("c = " << c << " draw " << sus::to_string(draw) << (causal ? " causal" : ""));
        CHECK(r.mask.to_dense() == r.W_fast.W);
        index_t nonzero = (r.W_fast.W.array() != T(0)).count();
        CHECK(r.mask.nnz() == nonzero);
        CHECK_CLOSE(T, "sparse dQ vs dense dQ", r.sparse_fast.dQ, r.dense_fast.dQ);
        CHECK_CLOSE(T, "sparse dK vs dense dK", r.sparse_fast.dK, r.dense_fast.dK);
        CHECK_CLOSE(T, "sparse dV vs dense dV", r.sparse_fast.dV, r.dense_fast.dV);
      }
  // paper budget, c large: weights >= 1/c have q = 1 and are stored exactly.
  for (auto draw : {IND, SYS}) {
    const int c = 1000;
    const auto r = run_case<T>({"paper, c = 1000", n, n, 4, 3, false, 1, {}, c, P, draw}, 78);
    const M<T> dense = r.mask.to_dense();
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < n; ++j)
        if (static_cast<double>(r.W_fast.W(i, j)) * c >= 1.0) {
          CAPTURE(i, j, r.W_fast.W(i, j), dense(i, j));
          CHECK(dense(i, j) == r.W_fast.W(i, j));
        }
  }
}

// Causal row 0 sees only key 0: W(0,0) = exp(0)/1 = 1 exactly, O_0 = V_0, and
// dS(0,0) = 1·(dP_00 − D_0) = 0 since D_0 = dO_0·O_0 = dO_0·V_0 = dP_00, so dQ_0 = 0.
TEMPLATE_TEST_CASE("edge: causal row 0 has W(0,0) = 1, its mask row is {(0, 1)}, its dQ row is 0", "[edge]", float,
                   double) {
  using T = TestType;
  for (index_t d_v : {4, 8})
    for (auto budget : {P, WF})
      for (auto draw : {IND, SYS})
        for (int c : {1, 3}) {
          const auto r = run_case<T>({"causal row 0", 70, 70, 5, d_v, true, 1, {}, c, budget, draw}, 9);
          INFO(sus::to_string(budget) << "/" << sus::to_string(draw) << " c = " << c << " d_v = " << d_v);
          CHECK(r.W_fast.W(0, 0) == T(1));
          CHECK(r.W_ref.W(0, 0) == T(1));
          CHECK((r.W_fast.W.row(0).tail(69).array() == T(0)).all());
          CHECK(r.O_fast.row(0) == r.V.row(0));
          CHECK(r.O_ref.row(0) == r.V.row(0));
          REQUIRE(r.mask.row_nnz(0) == 1);
          CHECK(r.mask.col_indices[0] == 0);
          CHECK(r.mask.values[0] == T(1));
          // The references and the sparse backward accumulate D_0 and dP_00 as the same
          // d_v-term dot product: exactly zero.
          for (const Grads<T>* g : {&r.dense_ref, &r.sparse_ref, &r.sparse_fast}) {
            CAPTURE(g->dQ.row(0));
            CHECK((g->dQ.row(0).array() == T(0)).all());
          }
          // The dense backward gets dP from a GEMM and D from a row sum, summed in different
          // orders once d_v >= 8: zero up to the rounding of a d_v-term dot product.
          const double bound = 4 * std::numeric_limits<T>::epsilon() * r.dO.row(0).cwiseAbs().sum() *
                               r.V.cwiseAbs().maxCoeff() * r.K.cwiseAbs().maxCoeff();
          CAPTURE(r.dense_fast.dQ.row(0), bound);
          CHECK(r.dense_fast.dQ.row(0).cwiseAbs().maxCoeff() <= bound);
        }
}

// Rows with exact zeros. The reference forward's std::exp underflows to exactly 0 for huge
// negative scores (the fast forward's vectorised exp clamps its argument, so it returns tiny
// denormals instead of 0: exact zeros there come only from the causal mask, covered by the
// table). The sampler must never keep a zero weight (W/q = 0/0 would be NaN), and the sparse
// and dense backwards must stay finite and match the references on such W.
TEMPLATE_TEST_CASE("edge: weights that are exactly 0 are never sampled, and the backwards stay finite", "[edge][sampler]",
                   float, double) {
  using T = TestType;
  const index_t n = 48, d = 4, d_v = 3;
  for (bool causal : {false, true}) {
    const M<T> Q = sus_test::random_matrix<T>(n, d, 60, 30.0), K = sus_test::random_matrix<T>(n, d, 61, 30.0);
    const M<T> V = sus_test::random_matrix<T>(n, d_v, 62), dO = sus_test::random_matrix<T>(n, d_v, 63);
    sus::AttentionOptions opt;
    opt.causal = causal;
    M<T> O(n, d_v);
    sus::DenseWeights<T> rec;
    sus::reference::attention_forward<T>(Q, K, V, O, rec, opt);
    const M<T>& W = rec.W;
    const index_t zeros = (W.array() == T(0)).count();
    index_t mixed_rows = 0;  // rows with a zero and at least two non-zeros
    for (index_t i = 0; i < n; ++i)
      mixed_rows += (W.row(i).array() == T(0)).any() && (W.row(i).array() > T(0)).count() >= 2;
    INFO((causal ? "causal: " : "") << "exact zeros in W: " << zeros << " of " << W.size() << ", mixed rows "
                                    << mixed_rows);
    REQUIRE(zeros > W.size() / 10);  // the case really has exact zeros (beyond the causal ones)
    REQUIRE(mixed_rows > 0);
    REQUIRE(O.allFinite());
    for (auto budget : {P, WF})
      for (auto draw : {IND, SYS})
        for (int c : {1, 4, 64})
          for (std::uint64_t seed : {10u, 11u, 12u}) {
            sus::SamplerOptions so;
            so.c = c;
            so.budget = budget;
            so.draw = draw;
            so.seed = seed;
            INFO("sampler " << variant_name(so) << " seed " << seed);
            for (int ref = 0; ref < 2; ++ref) {
              const sus::Csr<T> mask = ref ? sus::reference::sample_mask<T>(W, so) : sus::sample_mask(W, so);
              INFO((ref ? "reference::sample_mask" : "sample_mask"));
              REQUIRE_NOTHROW(mask.validate());
              index_t kept_zero = 0;
              for (index_t i = 0; i < n; ++i)
                for (index_t p = mask.row_offsets[i]; p < mask.row_offsets[i + 1]; ++p)
                  kept_zero += W(i, mask.col_indices[p]) == T(0);
              CHECK(kept_zero == 0);
              Grads<T> fast(n, n, d, d_v), slow(n, n, d, d_v);
              sus::attention_backward_sparse(Q, K, V, O, dO, mask, fast.dQ, fast.dK, fast.dV, opt);
              sus::reference::attention_backward_sparse<T>(Q, K, V, O, dO, mask, slow.dQ, slow.dK, slow.dV, opt);
              CHECK(finite_grads(fast));
              CHECK_CLOSE(T, "sparse dQ", fast.dQ, slow.dQ);
              CHECK_CLOSE(T, "sparse dK", fast.dK, slow.dK);
              CHECK_CLOSE(T, "sparse dV", fast.dV, slow.dV);
            }
          }
    Grads<T> fast(n, n, d, d_v), slow(n, n, d, d_v);
    sus::attention_backward_dense(Q, K, V, O, dO, W, fast.dQ, fast.dK, fast.dV, opt);
    sus::reference::attention_backward_dense<T>(Q, K, V, O, dO, W, slow.dQ, slow.dK, slow.dV, opt);
    CHECK(finite_grads(fast));
    CHECK_CLOSE(T, "dense dQ", fast.dQ, slow.dQ);
    CHECK_CLOSE(T, "dense dK", fast.dK, slow.dK);
    CHECK_CLOSE(T, "dense dV", fast.dV, slow.dV);
  }
}

// Waterfill on rows with a huge dynamic range: the water level must spend exactly
// min(c, #non-zero) even when the saturated set reaches c − (negligible weights).
// Row [1 − 3ε, ε, ε, ε, δ] with δ ≪ ε·2^-53 and c = 4: the exact answer is q ≈ [1, 1, 1, 1, λδ]
// (Σ q = 4). Targets the fixed-point iteration: rounding can make all three ε saturate, so
// |S| = c, rest = δ and λ = (c − |S|)/rest = 0.
TEMPLATE_TEST_CASE("edge: waterfill spends the whole budget on rows with negligible weights", "[edge][sampler]",
                   float, double) {
  using T = TestType;
  const T eps = T(1e-3), delta = T(1e-30);
  const std::vector<std::vector<T>> rows = {
      {T(1) - 3 * eps, eps, eps, eps, delta},
      {T(1) - 3 * eps, eps, delta, eps, eps, delta, delta},
      {T(0.5), T(0.25), T(0.25), delta},
  };
  for (const auto& w : rows) {
    const index_t n = static_cast<index_t>(w.size());
    const index_t support = std::count_if(w.begin(), w.end(), [](T x) { return x > T(0); });
    for (int c = 1; c < support; ++c) {
      std::vector<T> q(w.size());
      const double total = sus::inclusion_probabilities(w.data(), n, c, WF, q.data());
      const Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> q_row(q.data(), n);
      INFO("c = " << c << ", row of " << n << ", q = " << q_row);
      CHECK(total == Approx(double(c)).epsilon(1e-6));
      for (index_t j = 0; j < n; ++j) {
        CHECK(q[j] >= T(0));
        CHECK(q[j] <= T(1));
        CHECK(q[j] >= std::min(T(1), static_cast<T>(c) * w[j]) * T(0.999999));  // λ ≥ c
      }
    }
  }
}

// accumulate = true adds the gradient to what the outputs hold: result = initial + gradient.
TEMPLATE_TEST_CASE("edge: options.accumulate adds to the outputs for every backward", "[edge]", float, double) {
  using T = TestType;
  struct Shape {
    index_t n_q, n_k;
    bool causal;
  };
  for (const Shape s : {Shape{7, 11, false}, Shape{300, 300, false}, Shape{300, 300, true}}) {
    const auto r = run_case<T>({"accumulate", s.n_q, s.n_k, 4, 5, s.causal, 1, {}, 4, WF, SYS}, 21);
    for (Bwd b : kBackwards) {
      INFO(to_string(b) << " n_q = " << s.n_q << " n_k = " << s.n_k << (s.causal ? " causal" : ""));
      Grads<T> fresh(r.Q.rows(), r.K.rows(), r.Q.cols(), r.V.cols());
      backward(b, r, fresh, r.opt);
      Grads<T> acc(r.Q.rows(), r.K.rows(), r.Q.cols(), r.V.cols());
      acc.dQ = sus_test::random_matrix<T>(acc.dQ.rows(), acc.dQ.cols(), 31);
      acc.dK = sus_test::random_matrix<T>(acc.dK.rows(), acc.dK.cols(), 32);
      acc.dV = sus_test::random_matrix<T>(acc.dV.rows(), acc.dV.cols(), 33);
      const Grads<T> initial = acc;
      auto opt = r.opt;
      opt.accumulate = true;
      backward(b, r, acc, opt);
      CHECK_CLOSE(T, "dQ", acc.dQ, (initial.dQ + fresh.dQ).eval());
      CHECK_CLOSE(T, "dK", acc.dK, (initial.dK + fresh.dK).eval());
      CHECK_CLOSE(T, "dV", acc.dV, (initial.dV + fresh.dV).eval());
      // Twice: initial + 2·gradient.
      backward(b, r, acc, opt);
      CHECK_CLOSE(T, "dQ twice", acc.dQ, (initial.dQ + 2 * fresh.dQ).eval());
      CHECK_CLOSE(T, "dK twice", acc.dK, (initial.dK + 2 * fresh.dK).eval());
      CHECK_CLOSE(T, "dV twice", acc.dV, (initial.dV + 2 * fresh.dV).eval());
    }
  }
}

// accumulate = false overwrites: NaN garbage in the caller's buffers must not leak through
// (e.g. a dK row no query attends to, or rows beyond a causal block's kv).
TEMPLATE_TEST_CASE("edge: accumulate = false overwrites NaN-filled outputs completely", "[edge]", float, double) {
  using T = TestType;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (bool causal : {false, true}) {
    const auto r = run_case<T>({"overwrite", 300, 300, 4, 3, causal, 1, {}, 2, P, IND}, 41);
    for (Bwd b : kBackwards) {
      INFO(to_string(b) << (causal ? " causal" : ""));
      Grads<T> zero(300, 300, 4, 3), dirty(300, 300, 4, 3);
      zero.dQ.setZero();
      zero.dK.setZero();
      zero.dV.setZero();
      dirty.dQ.setConstant(nan);
      dirty.dK.setConstant(nan);
      dirty.dV.setConstant(nan);
      backward(b, r, zero, r.opt);
      backward(b, r, dirty, r.opt);
      CHECK(finite_grads(dirty));
      CHECK(dirty.dQ == zero.dQ);
      CHECK(dirty.dK == zero.dK);
      CHECK(dirty.dV == zero.dV);
    }
    // Forward: O filled with NaN is overwritten.
    M<T> O = M<T>::Constant(300, 3, nan);
    sus::attention_forward(r.Q, r.K, r.V, O, sus::NoRecord{}, r.opt);
    CHECK(O == r.O_fast);
  }
}

// options.scale = s equals the default scale applied to Q·s·sqrt(d); scale 0 gives uniform
// weights and exactly zero dQ, dK.
TEMPLATE_TEST_CASE("edge: explicit options.scale", "[edge]", float, double) {
  using T = TestType;
  const index_t n = 20, d = 4;
  const double s = 0.37;
  const auto r = run_case<T>({"scale 0.37", n, n, d, 3, false, 1, s, 4, P, IND}, 51);
  const M<T> Q2 = (r.Q.template cast<double>() * (s * std::sqrt(double(d)))).template cast<T>();
  M<T> O2(n, 3);
  sus::DenseWeights<T> W2;
  sus::attention_forward(Q2, r.K, r.V, O2, W2);  // default scale 1/sqrt(d)
  CHECK_CLOSE(T, "W with scale s vs W of Q·s·sqrt(d) with the default scale", W2.W, r.W_fast.W);
  // 1e-5 float: the two paths round s·Q differently (relative 1e-7 in each score).

  for (bool causal : {false, true}) {
    const auto z = run_case<T>({"scale 0", n, n, d, 3, causal, 1, 0.0, 4, P, IND}, 52);
    for (index_t i = 0; i < n; ++i) {
      const index_t len = causal ? i + 1 : n;
      CAPTURE(i, z.W_fast.W.row(i));
      CHECK((z.W_fast.W.row(i).head(len).array() == T(1) / static_cast<T>(len)).all());
    }
    for (const Grads<T>* g : {&z.dense_fast, &z.sparse_fast, &z.dense_ref, &z.sparse_ref}) {
      CHECK((g->dQ.array() == T(0)).all());  // s·(...) with s = 0
      CHECK((g->dK.array() == T(0)).all());
    }
  }
}

// Empty problems. Documented behaviour (what the API does):
//   n_q = 0: accepted by every entry point. The forward writes nothing (O is 0 x d_v), recorders
//     see begin(0, n_k) / end(); sample_mask gives a 0 x n_k mask; the backwards set dK, dV to
//     zero (no query contributes) or leave them unchanged with accumulate.
//   n_k = 0 (non-causal): every query row is fully masked. O = 0, W is n_q x 0, lse = −inf,
//     the mask is n_q x 0 and empty, dQ = 0.
TEMPLATE_TEST_CASE("edge: n_q = 0 and n_k = 0 are accepted and give zeros", "[edge]", float, double) {
  using T = TestType;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  struct Shape {
    index_t n_q, n_k;
    bool causal;
  };
  for (const Shape sh : {Shape{0, 6, false}, Shape{0, 0, true}, Shape{0, 0, false}, Shape{5, 0, false}}) {
    INFO("n_q = " << sh.n_q << ", n_k = " << sh.n_k << (sh.causal ? " causal" : ""));
    const index_t d = 3, d_v = 2;
    Run<T> r(sh.n_q, sh.n_k, d, d_v);
    r.Q = sus_test::random_matrix<T>(sh.n_q, d, 1);
    r.K = sus_test::random_matrix<T>(sh.n_k, d, 2);
    r.V = sus_test::random_matrix<T>(sh.n_k, d_v, 3);
    r.dO = sus_test::random_matrix<T>(sh.n_q, d_v, 4);
    r.opt.causal = sh.causal;
    r.O_fast = M<T>::Constant(sh.n_q, d_v, nan);
    r.O_ref = M<T>::Constant(sh.n_q, d_v, nan);
    sus::SamplerOptions so;
    so.c = 2;
    sus::SusMask<T> streamed(so);
    REQUIRE_NOTHROW(
        sus::attention_forward(r.Q, r.K, r.V, r.O_fast, sus::recorders(r.W_fast, r.lse_fast, streamed), r.opt));
    REQUIRE_NOTHROW(
        sus::reference::attention_forward<T>(r.Q, r.K, r.V, r.O_ref, sus::recorders(r.W_ref, r.lse_ref), r.opt));
    CHECK((r.O_fast.array() == T(0)).all());
    CHECK((r.O_ref.array() == T(0)).all());
    CHECK(r.W_fast.W.rows() == sh.n_q);
    CHECK(r.W_fast.W.cols() == sh.n_k);
    CHECK(r.lse_fast.lse.size() == sh.n_q);
    for (index_t i = 0; i < sh.n_q; ++i) {
      CHECK(r.lse_fast.lse[i] == -std::numeric_limits<T>::infinity());
      CHECK(r.lse_ref.lse[i] == -std::numeric_limits<T>::infinity());
    }
    REQUIRE_NOTHROW(r.mask = sus::sample_mask(r.W_fast.W, so));
    CHECK(r.mask.rows == sh.n_q);
    CHECK(r.mask.cols == sh.n_k);
    CHECK(r.mask.nnz() == 0);
    CHECK(csr_equal(streamed.mask, r.mask));
    REQUIRE_NOTHROW(r.mask.validate());
    for (Bwd b : kBackwards) {
      INFO(to_string(b));
      Grads<T> g(sh.n_q, sh.n_k, d, d_v);
      g.dQ.setConstant(nan);
      g.dK.setConstant(nan);
      g.dV.setConstant(nan);
      REQUIRE_NOTHROW(backward(b, r, g, r.opt));
      CHECK((g.dQ.array() == T(0)).all());
      CHECK((g.dK.array() == T(0)).all());
      CHECK((g.dV.array() == T(0)).all());
      // accumulate leaves the (empty) contribution out: outputs unchanged
      Grads<T> a(sh.n_q, sh.n_k, d, d_v);
      a.dQ.setConstant(T(2));
      a.dK.setConstant(T(3));
      a.dV.setConstant(T(4));
      auto opt = r.opt;
      opt.accumulate = true;
      REQUIRE_NOTHROW(backward(b, r, a, opt));
      CHECK((a.dQ.array() == T(2)).all());
      CHECK((a.dK.array() == T(3)).all());
      CHECK((a.dV.array() == T(4)).all());
    }
  }
}
