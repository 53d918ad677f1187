// Quickstart: forward (records the SUS mask) -> sparse backward -> compare with the exact
// dense backward. Prints the relative gradient error, the kept fraction and both timings.
//
//   quickstart [n=2048] [d=64] [c=32] [--causal]
//
// The inputs are random (Q, K with N(0, 1.5²) entries), so the attention is only mildly
// peaked; trained models are far more concentrated, and SUS's error is lower on them.
#include <sus/sus.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

namespace {

using Mat = sus::Matrix<float>;

Mat gaussian(sus::index_t rows, sus::index_t cols, std::mt19937_64& gen, float sigma) {
  std::normal_distribution<float> dist(0.0f, sigma);
  Mat m(rows, cols);
  for (sus::index_t i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  return m;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double rel_error(const Mat& approx, const Mat& exact) { return (approx - exact).norm() / exact.norm(); }

}  // namespace

int main(int argc, char** argv) {
  sus::index_t n = 2048, d = 64;
  int c = 32;
  bool causal = false;
  int positional = 0;
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--causal") == 0) causal = true;
    else if (positional == 0) n = std::atol(argv[a]), ++positional;
    else if (positional == 1) d = std::atol(argv[a]), ++positional;
    else c = std::atoi(argv[a]);
  }
  std::mt19937_64 gen(1);
  const Mat Q = gaussian(n, d, gen, 1.5f), K = gaussian(n, d, gen, 1.5f), V = gaussian(n, d, gen, 1.0f),
            dO = gaussian(n, d, gen, 1.0f);
  sus::AttentionOptions options;
  options.causal = causal;

  try {
    // 1. Forward: O = softmax(s·Q·Kᵀ)·V, sampling each finished row of W into the mask.
    //    (DenseWeights is recorded only to run the exact backward for comparison.)
    Mat O(n, d);
    sus::SusMask<float> sus_mask({c, sus::Budget::paper, sus::Draw::independent, /*seed=*/42});
    sus::DenseWeights<float> dense;
    sus::attention_forward(Q, K, V, O, sus::recorders(sus_mask, dense), options);

    // 2. Backward, both ways.
    Mat dQ(n, d), dK(n, d), dV(n, d), dQ_ref(n, d), dK_ref(n, d), dV_ref(n, d);
    auto t0 = std::chrono::steady_clock::now();
    sus::attention_backward_sparse(Q, K, V, O, dO, sus_mask.mask, dQ, dK, dV, options);
    const double t_sparse = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    sus::attention_backward_dense(Q, K, V, O, dO, dense.W, dQ_ref, dK_ref, dV_ref, options);
    const double t_dense = seconds_since(t0);

    // 3. Compare.
    const double pairs = causal ? 0.5 * double(n) * double(n + 1) : double(n) * double(n);
    std::printf("n = %lld, d = %lld, c = %d, %s, sampler paper/independent\n", static_cast<long long>(n),
                static_cast<long long>(d), c, causal ? "causal" : "non-causal");
    std::printf("kept entries: %lld of %.0f (%.3f%% kept, %.2f per row on average, max %lld)\n",
                static_cast<long long>(sus_mask.mask.nnz()), pairs, 100.0 * sus_mask.mask.nnz() / pairs,
                double(sus_mask.mask.nnz()) / double(n), static_cast<long long>(sus_mask.mask.max_row_nnz()));
    std::printf("relative error of one SUS gradient (||g~ - g|| / ||g||): dQ %.4f  dK %.4f  dV %.4f\n",
                rel_error(dQ, dQ_ref), rel_error(dK, dK_ref), rel_error(dV, dV_ref));

    // The estimator is unbiased: averaging over independent masks shrinks the error like 1/sqrt(#masks).
    Mat sQ = Mat::Zero(n, d), g1(n, d), g2(n, d), g3(n, d);
    const int masks = 16;
    for (int m = 0; m < masks; ++m) {
      const auto mask = sus::sample_mask(dense.W, {c, sus::Budget::paper, sus::Draw::independent, 1000u + m});
      sus::attention_backward_sparse(Q, K, V, O, dO, mask, g1, g2, g3, options);
      sQ += g1;
    }
    std::printf("relative error of the mean of %d SUS dQ: %.4f (about 1/sqrt(%d) of a single one)\n", masks,
                rel_error(sQ / float(masks), dQ_ref), masks);
    std::printf("backward time (one run, indicative; see bench/ for medians): sparse %.2f ms, dense %.2f ms\n",
                1e3 * t_sparse, 1e3 * t_dense);
  } catch (const sus::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
