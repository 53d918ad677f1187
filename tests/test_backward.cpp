// Backward: the reference against float64 central finite differences, the GEMM dense
// backward against the reference, and the sparse backward against both.
#include <catch2/catch.hpp>

#include "test_util.hpp"

using namespace sus_test;

namespace {

const Shape kBackwardShapes[] = {
    {1, 1, 1, 1, false, "one query, one key: W = 1, dQ = dK = 0"},
    {5, 5, 3, 3, true, "causal, tiny"},
    {6, 9, 4, 2, false, "cross attention, d_v < d"},
    {12, 12, 5, 7, false, "d_v > d, odd sizes"},
};

// L(Q, K, V) = Σ O ∘ G for a fixed G, whose gradient is the backward with dO = G.
double loss(const M<double>& Q, const M<double>& K, const M<double>& V, const M<double>& G,
            const sus::AttentionOptions& o) {
  M<double> O(Q.rows(), V.cols());
  sus::reference::attention_forward<double>(Q, K, V, O, sus::NoRecord{}, o);
  return (O.array() * G.array()).sum();
}

// Central differences dL/dX for every entry of X (X is one of Q, K, V inside the lambda).
template <class F>
M<double> finite_differences(M<double>& X, F loss_of_current, double h) {
  M<double> g(X.rows(), X.cols());
  for (index_t i = 0; i < X.rows(); ++i)
    for (index_t j = 0; j < X.cols(); ++j) {
      const double x = X(i, j);
      X(i, j) = x + h;
      const double up = loss_of_current();
      X(i, j) = x - h;
      const double down = loss_of_current();
      X(i, j) = x;
      g(i, j) = (up - down) / (2 * h);
    }
  return g;
}

}  // namespace

TEST_CASE("reference backward matches float64 central finite differences within 1e-6", "[backward][reference]") {
  std::uint64_t seed = 11;
  for (const Shape& s : kBackwardShapes) {
    INFO(s.targets);
    Problem<double> p(s.n_q, s.n_k, s.d, s.d_v, s.causal, seed += 10, 1.5);
    Grads<double> g(p), gs(p);
    sus::reference::attention_backward_dense<double>(p.Q, p.K, p.V, p.O, p.dO, p.W, g.dQ, g.dK, g.dV, p.options);
    // The reference sparse backward on the keep-everything mask is the same computation.
    const auto all = sus::sample_mask(p.W, {static_cast<int>(s.n_k), sus::Budget::waterfill, sus::Draw::systematic, 0});
    sus::reference::attention_backward_sparse<double>(p.Q, p.K, p.V, p.O, p.dO, all, gs.dQ, gs.dK, gs.dV, p.options);

    auto L = [&] { return loss(p.Q, p.K, p.V, p.dO, p.options); };
    const double h = 1e-5;
    const M<double> fQ = finite_differences(p.Q, L, h), fK = finite_differences(p.K, L, h),
                    fV = finite_differences(p.V, L, h);
    // Relative to the largest gradient entry of the three (dQ, dK are exactly 0 when n_k = 1).
    const double scale = std::max({fQ.cwiseAbs().maxCoeff(), fK.cwiseAbs().maxCoeff(), fV.cwiseAbs().maxCoeff()});
    const double eQ = (g.dQ - fQ).cwiseAbs().maxCoeff() / scale, eK = (g.dK - fK).cwiseAbs().maxCoeff() / scale,
                 eV = (g.dV - fV).cwiseAbs().maxCoeff() / scale;
    CAPTURE(eQ, eK, eV, scale);
    CHECK(eQ <= 1e-6);
    CHECK(eK <= 1e-6);
    CHECK(eV <= 1e-6);
    check_grads_close(gs, g, 1e-13);
  }
}

TEST_CASE("GEMM dense backward (float) matches the float64 reference within 1e-5", "[backward]") {
  const Shape shapes[] = {
      {64, 64, 16, 16, true, "causal, less than one row block (128) and one key tile (256)"},
      {300, 300, 64, 64, true, "causal, full and partial row blocks and key tiles: dK/dV rows beyond a block"},
      {257, 100, 32, 24, false, "n_q one past two row blocks, cross attention"},
      {3, 500, 8, 8, false, "few queries, many keys: a full and a partial key tile"},
      {130, 770, 16, 8, true, "causal cross attention, bottom-right: the blocks see 768 keys (3 full tiles) and 770 (a partial 4th)",
       sus::CausalAlignment::bottom_right},
      {1100, 600, 8, 8, false, "three row groups (4 blocks of 128 each), the last one partial"},
      {1200, 300, 8, 8, true, "causal bottom-right, n_q > n_k: rows < 900 see no key, so group 0 and blocks 4-6 of "
       "group 1 are skipped and its block 7 sees 1-128 keys", sus::CausalAlignment::bottom_right},
  };
  std::uint64_t seed = 500;
  for (const Shape& s : shapes) {
    INFO(s.targets);
    const Problem<float> p(s.n_q, s.n_k, s.d, s.d_v, s.causal, seed += 10, 2.0, s.alignment);
    Grads<float> g(p);
    sus::attention_backward_dense(p.Q, p.K, p.V, p.O, p.dO, p.W, g.dQ, g.dK, g.dV, p.options);
    Grads<double> r(p);
    sus::reference::attention_backward_dense<double>(p.Q.cast<double>(), p.K.cast<double>(), p.V.cast<double>(),
                                                     p.O.cast<double>(), p.dO.cast<double>(), p.W.cast<double>(), r.dQ,
                                                     r.dK, r.dV, p.options);
    check_grads_close(g, r, 1e-5);
  }
}

TEST_CASE("sparse backward with a keep-everything mask equals the dense backward within 1e-5", "[backward]") {
  for (bool causal : {false, true})
    for (auto draw : {sus::Draw::independent, sus::Draw::systematic}) {
      INFO("causal=" << causal << " draw=" << sus::to_string(draw));
      const index_t n = 200, d = 32;
      const Problem<float> p(n, n, d, d, causal, 42, 2.0);
      // waterfill with c >= support keeps every non-zero weight with q = 1: W̃ = W exactly.
      const auto all = sus::sample_mask(p.W, {static_cast<int>(n), sus::Budget::waterfill, draw, 3});
      const index_t expected_nnz = causal ? n * (n + 1) / 2 : n * n;
      REQUIRE(all.nnz() == expected_nnz);
      Grads<float> gs(p), gd(p);
      sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, p.dO, all, gs.dQ, gs.dK, gs.dV, p.options);
      sus::attention_backward_dense(p.Q, p.K, p.V, p.O, p.dO, p.W, gd.dQ, gd.dK, gd.dV, p.options);
      check_grads_close(gs, gd, 1e-5);
    }
}

TEST_CASE("sparse backward matches the reference sparse backward on sampled masks", "[backward]") {
  std::uint64_t seed = 900;
  for (bool causal : {false, true})
    for (int c : {1, 4, 16}) {
      INFO("causal=" << causal << " c=" << c);
      const Problem<float> p(130, 130, 24, 20, causal, seed += 3, 2.0);
      const auto mask = sus::sample_mask(p.W, {c, sus::Budget::paper, sus::Draw::independent, seed});
      Grads<float> g(p);
      sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, p.dO, mask, g.dQ, g.dK, g.dV, p.options);
      const sus::Csr<double> mask64 = mask.cast<double>();
      Grads<double> r(p);
      sus::reference::attention_backward_sparse<double>(p.Q.cast<double>(), p.K.cast<double>(), p.V.cast<double>(),
                                                        p.O.cast<double>(), p.dO.cast<double>(), mask64, r.dQ, r.dK,
                                                        r.dV, p.options);
      check_grads_close(g, r, 1e-5);
    }
}

TEST_CASE("determinism: same seed gives bitwise identical masks and gradients, other seeds differ",
          "[backward][determinism]") {
  const Problem<float> p(120, 120, 16, 16, true, 3, 2.0);
  for (auto budget : {sus::Budget::paper, sus::Budget::waterfill})
    for (auto draw : {sus::Draw::independent, sus::Draw::systematic}) {
      INFO(sus::to_string(budget) << "/" << sus::to_string(draw));
      auto run = [&](std::uint64_t seed) {
        sus::SusMask<float> rec({4, budget, draw, seed});
        M<float> O(p.Q.rows(), p.V.cols());
        sus::attention_forward(p.Q, p.K, p.V, O, rec, p.options);
        Grads<float> g(p);
        sus::attention_backward_sparse(p.Q, p.K, p.V, O, p.dO, rec.mask, g.dQ, g.dK, g.dV, p.options);
        return std::make_pair(rec.mask, g);
      };
      const auto a = run(17), b = run(17), c = run(18);
      CHECK(a.first.col_indices == b.first.col_indices);
      CHECK(a.first.values == b.first.values);
      // Bitwise: compare the bytes, not with a tolerance.
      CHECK(a.second.dQ == b.second.dQ);
      CHECK(a.second.dK == b.second.dK);
      CHECK(a.second.dV == b.second.dV);
      CHECK(a.first.col_indices != c.first.col_indices);
      CHECK(a.second.dQ != c.second.dQ);
    }
}

// The fused kernel scatters into dK, dV in ascending row order; the composition gathers
// through the transposed mask in the same order. Same operations, same order: same bits.
namespace {
template <class T>
void check_fused_equals_composition(const Shape& sh, bool accumulate) {
  const index_t n_q = sh.n_q, n_k = sh.n_k, d = sh.d, d_v = sh.d_v;
  INFO(sh.targets << ": " << (sizeof(T) == 4 ? "float" : "double") << " accumulate=" << accumulate << " n_q=" << n_q
                  << " n_k=" << n_k << " d=" << d << " d_v=" << d_v << " causal=" << sh.causal);
  const Problem<T> p(n_q, n_k, d, d_v, sh.causal, 61, 2.0);
  const auto mask = sus::sample_mask(p.W, {5, sus::Budget::waterfill, sus::Draw::independent, 8});
  const T s = static_cast<T>(1.0 / std::sqrt(double(d)));  // as the library rounds it
  sus::AttentionOptions o = p.options;
  o.accumulate = accumulate;
  Grads<T> fused(p), composed(p);
  for (Grads<T>* g : {&fused, &composed}) {  // same starting values for accumulate
    g->dQ = random_matrix<T>(n_q, d, 1);
    g->dK = random_matrix<T>(n_k, d, 2);
    g->dV = random_matrix<T>(n_k, d_v, 3);
  }
  sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, p.dO, mask, fused.dQ, fused.dK, fused.dV, o);

  const sus::Vector<T> D = sus::detail::row_dot<T>(p.dO, p.O);
  std::vector<T> dS(static_cast<std::size_t>(mask.nnz()));
  sus::sparse::sddmm<T>(mask, p.dO, p.V, dS.data());  // dP on the mask
  for (index_t i = 0; i < mask.rows; ++i)
    for (index_t e = mask.row_offsets[i]; e < mask.row_offsets[i + 1]; ++e) dS[e] = mask.values[e] * (dS[e] - D[i]);
  sus::sparse::spmm<T>(mask, dS.data(), p.K, composed.dQ, s, accumulate);
  const sus::sparse::TransposedPattern t(mask);
  sus::sparse::spmm_transposed<T>(t, dS.data(), p.Q, composed.dK, s, accumulate);
  sus::sparse::spmm_transposed<T>(t, mask.values.data(), p.dO, composed.dV, T(1), accumulate);
  CHECK(fused.dQ == composed.dQ);
  CHECK(fused.dK == composed.dK);
  CHECK(fused.dV == composed.dV);
  CAPTURE((fused.dK - composed.dK).cwiseAbs().maxCoeff());
  // The key-blocked kernel with any block size (one key; a block that does not divide n_k;
  // all keys in one block), and the split passes (rows, then keys by ranges) with any key range:
  // the same bits, whichever path the public call took on this machine.
  using Args = sus::detail::BackwardArgs<T>;
  const auto check_variant = [&](const char* what, index_t size, auto&& run) {
    INFO(what << "=" << size);
    Grads<T> g(p);
    g.dQ = random_matrix<T>(n_q, d, 1);
    g.dK = random_matrix<T>(n_k, d, 2);
    g.dV = random_matrix<T>(n_k, d_v, 3);
    const sus::ConstMatrixRef<T> Q(p.Q), K(p.K), V(p.V), O(p.O), dO(p.dO);
    sus::MatrixRef<T> dQ(g.dQ), dK(g.dK), dV(g.dV);
    run(Args{Q, K, V, O, dO, dQ, dK, dV}, size);
    CHECK(g.dQ == composed.dQ);
    CHECK(g.dK == composed.dK);
    CHECK(g.dV == composed.dV);
  };
  // Q, K, V, O, dO as strided views (rows 3 values wider than the head, as a head of a fused
  // buffer): the key-blocked kernel packs K, V and, over several blocks, copies Q, dO; the
  // split passes pack K, V.
  using Strided = Eigen::Map<const M<T>, 0, Eigen::OuterStride<>>;
  const auto widen = [](const M<T>& m) {
    M<T> w = M<T>::Constant(m.rows(), m.cols() + 3, T(7));
    w.leftCols(m.cols()) = m;
    return w;
  };
  const M<T> Qw = widen(p.Q), Kw = widen(p.K), Vw = widen(p.V), Ow = widen(p.O), dOw = widen(p.dO);
  const auto strided = [](const M<T>& w, index_t cols) {
    return sus::ConstMatrixRef<T>(Strided(w.data(), w.rows(), cols, Eigen::OuterStride<>(w.cols())));
  };
  const sus::ConstMatrixRef<T> Qs = strided(Qw, d), Ks = strided(Kw, d), Vs = strided(Vw, d_v), Os = strided(Ow, d_v),
                               dOs = strided(dOw, d_v);
  for (index_t size : {index_t(1), index_t(7), index_t(64), n_k}) {
    check_variant("block_keys", size, [&](const Args& a, index_t block) {
      sus::detail::sparse_backward_blocked<T>(a, mask, s, accumulate, accumulate, block);
    });
    check_variant("strided inputs, block_keys", size, [&](const Args& a, index_t block) {
      sus::detail::sparse_backward_blocked<T>(Args{Qs, Ks, Vs, Os, dOs, a.dQ, a.dK, a.dV}, mask, s, accumulate,
                                              accumulate, block);
    });
    check_variant("range_keys", size, [&](const Args& a, index_t range) {
      sus::detail::sparse_backward_split<T>(a, mask, s, accumulate, accumulate, range);
    });
    // the split passes pack K, V key by key for the rows pass, whatever their strides
    check_variant("strided inputs, range_keys", size, [&](const Args& a, index_t range) {
      sus::detail::sparse_backward_split<T>(Args{Qs, Ks, Vs, Os, dOs, a.dQ, a.dK, a.dV}, mask, s, accumulate, accumulate,
                                            range);
    });
  }
}
}  // namespace

TEST_CASE("fused sparse backward is bitwise equal to SDDMM -> SpMM -> transposed SpMM", "[backward][sparse]") {
  // d = d_v = 64 or 128 take the kernel's compile-time-length path (Q_i, dO_i and the dQ_i
  // accumulator in registers where the compiler has vector extensions); (24, 20) the run-time
  // one. A head whose K, V, dK, dV fit one key block (key_block_bytes(): 256 KiB to 8 MiB,
  // from the L2 size) runs in place; a larger one (n_k = 16384 at d = 64, 48000 at (24, 20),
  // 11000 at (64, 128): over 8 MiB on any machine) by the split passes where the key blocks
  // are under split_below_block_bytes (a small L2) and by key blocks otherwise (its K and V
  // are contiguous). The shapes between (1100 at d = 64, 3100 at (24, 20)) may also run in
  // place, depending on the machine's L2, and every shape also runs the key-blocked kernel
  // with block sizes 1, 7, 64 and n_k and the split passes with key ranges of 1, 7, 64 and n_k
  // keys, whichever path the public call took.
  using Config = sus::detail::SparseBackwardConfig;
  static_assert(16384 * (64 + 64) * 2 * sizeof(float) > Config::max_block_bytes, "16384 x 64: key blocks");
  static_assert(48000 * (24 + 20) * 2 * sizeof(float) > Config::max_block_bytes, "48000 x (24, 20): key blocks");
  static_assert(11000 * (64 + 128) * 2 * sizeof(float) > Config::max_block_bytes, "11000 x (64, 128): key blocks");
  static_assert(170 * (64 + 64) * 2 * sizeof(float) <= Config::min_block_bytes, "170 x 64 must work in place");
  // 170 x 128 (348 KiB in float, 696 KiB in double) runs in place where key_block_bytes() is
  // at least that (an L2 of 512 KiB, or 1 MiB for double) and by key blocks otherwise.
  const Shape shapes[] = {{150, 170, 24, 20, false, "run-time dims, in place"},
                          {150, 170, 64, 64, false, "compile-time dims, in place"},
                          {90, 170, 128, 128, true, "compile-time dims 128, in place (L2 >= 512 KiB), causal"},
                          {40, 1100, 64, 64, false, "in place or blocked (L2)"},
                          {1100, 1100, 64, 64, true, "in place or blocked (L2), causal"},
                          {30, 3100, 24, 20, false, "run-time dims, in place or blocked (L2)"},
                          {24, 16384, 64, 64, false, "split passes or key blocks (L2)"},
                          {40, 16384, 64, 64, true, "split passes or key blocks (L2), causal"},
                          {10, 48000, 24, 20, false, "run-time dims, split passes or key blocks (L2)"},
                          {20, 11000, 64, 128, false, "d != d_v (run-time rows, 128-long D_i), split passes or key blocks (L2)"}};
  for (const Shape& sh : shapes)
    for (bool accumulate : {false, true}) check_fused_equals_composition<float>(sh, accumulate);
  // double: the register rows hold 8 lanes per vector (64: 8 vectors, 128: 16)
  for (const Shape& sh : {shapes[1], shapes[2]})
    for (bool accumulate : {false, true}) check_fused_equals_composition<double>(sh, accumulate);
}

TEST_CASE("the kernels' dot product has the bits of its portable definition, any length", "[backward][sparse]") {
  // dot (compiler vector lanes, register reduction) against dot_portable (the order written as
  // scalar loops): the same sums in the same order, so equal bits, float and double, every
  // length 0..200 (up to 12 full float lane blocks plus a tail), from unaligned starts.
  const M<float> af = random_matrix<float>(1, 300, 1), bf = random_matrix<float>(1, 300, 2);
  const M<double> ad = random_matrix<double>(1, 300, 3), bd = random_matrix<double>(1, 300, 4);
  for (index_t off : {index_t(0), index_t(1), index_t(3)})
    for (index_t n = 0; n <= 200; ++n) {
      INFO("n=" << n << " offset=" << off);
      CHECK(sus::detail::dot(af.data() + off, bf.data() + off, n) ==
            sus::detail::dot_portable(af.data() + off, bf.data() + off, n));
      CHECK(sus::detail::dot(ad.data() + off, bd.data() + off, n) ==
            sus::detail::dot_portable(ad.data() + off, bd.data() + off, n));
    }
}

TEST_CASE("sparse backward on strided views (heads of fused QKV and gradient buffers) is bitwise equal to contiguous",
          "[backward][sparse]") {
  // The kernel packs strided K, V and gathers dK, dV in contiguous scratch: data movement only,
  // so the bits must not change. Head 1 of 3 in [n, 3·H·d]-style buffers, causal, both dims paths.
  for (index_t d : {index_t(64), index_t(24)})
    for (bool accumulate : {false, true}) {
      INFO("d=" << d << " accumulate=" << accumulate);
      const index_t n = 140, H = 3, h = 1;
      const Problem<float> p(n, n, d, d, true, 71, 2.0);
      const auto mask = sus::sample_mask(p.W, {6, sus::Budget::paper, sus::Draw::systematic, 9});
      sus::AttentionOptions o = p.options;
      o.accumulate = accumulate;
      // Wide buffers holding the head at columns [h·d, (h+1)·d), other columns filled with noise.
      auto wide = [&](const M<float>& x, std::uint64_t seed) {
        M<float> w = random_matrix<float>(n, H * d, seed);
        w.middleCols(h * d, d) = x;
        return w;
      };
      const M<float> Qw = wide(p.Q, 1), Kw = wide(p.K, 2), Vw = wide(p.V, 3), Ow = wide(p.O, 4), dOw = wide(p.dO, 5);
      M<float> dQw = random_matrix<float>(n, H * d, 6), dKw = random_matrix<float>(n, H * d, 7),
               dVw = random_matrix<float>(n, H * d, 8);
      const M<float> dQw0 = dQw, dKw0 = dKw, dVw0 = dVw;
      Grads<float> c(p);
      c.dQ = dQw.middleCols(h * d, d);
      c.dK = dKw.middleCols(h * d, d);
      c.dV = dVw.middleCols(h * d, d);
      sus::attention_backward_sparse(p.Q, p.K, p.V, p.O, p.dO, mask, c.dQ, c.dK, c.dV, o);
      const auto cols = [&](const M<float>& x) { return sus::ConstMatrixRef<float>(x.middleCols(h * d, d)); };
      sus::MatrixRef<float> dQ(dQw.middleCols(h * d, d)), dK(dKw.middleCols(h * d, d)), dV(dVw.middleCols(h * d, d));
      sus::attention_backward_sparse(cols(Qw), cols(Kw), cols(Vw), cols(Ow), cols(dOw), mask, dQ, dK, dV, o);
      CHECK(M<float>(dQw.middleCols(h * d, d)) == c.dQ);
      CHECK(M<float>(dKw.middleCols(h * d, d)) == c.dK);
      CHECK(M<float>(dVw.middleCols(h * d, d)) == c.dV);
      // Columns of the other heads are untouched.
      for (index_t other : {index_t(0), index_t(2)}) {
        CHECK(dQw.middleCols(other * d, d) == dQw0.middleCols(other * d, d));
        CHECK(dKw.middleCols(other * d, d) == dKw0.middleCols(other * d, d));
        CHECK(dVw.middleCols(other * d, d) == dVw0.middleCols(other * d, d));
      }
    }
}
