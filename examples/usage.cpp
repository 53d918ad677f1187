// The README's usage example, compiled and run by the build. The region between the
// [readme] markers must appear verbatim in README.md (checked by the readme_snippet test).
#include <sus/sus.hpp>

#include <cstdio>

int main() {
  const sus::index_t n = 1024, d = 64, d_v = 64;
  const sus::Matrix<float> Q = sus::Matrix<float>::Random(n, d), K = sus::Matrix<float>::Random(n, d),
                           V = sus::Matrix<float>::Random(n, d_v), dO = sus::Matrix<float>::Random(n, d_v);
  // [readme]
  // Q: n x d, K: n x d, V: n x d_v, dO: n x d_v — row-major (sus::Matrix<float> or any Eigen::Ref).
  sus::AttentionOptions options;  // scale = 1/sqrt(d) unless set; causal = false unless set
  options.causal = true;

  // 1. Forward: O = softmax(s·Q·Kᵀ)·V. Each finished row of W is sampled into the mask at
  //    once, so no n x n matrix is kept.
  sus::Matrix<float> O(n, d_v);
  sus::SusMask<float> sus_mask({/*c=*/32, sus::Budget::paper, sus::Draw::independent, /*seed=*/42});
  sus::attention_forward(Q, K, V, O, sus_mask, options);

  // 2. Backward in O(nnz·d): unbiased estimates of dQ, dK, dV.
  sus::Matrix<float> dQ(n, d), dK(n, d), dV(n, d_v);
  sus::attention_backward_sparse(Q, K, V, O, dO, sus_mask.mask, dQ, dK, dV, options);
  // [readme]
  std::printf("kept %lld of %lld weights; |dQ| = %g, |dK| = %g, |dV| = %g\n",
              static_cast<long long>(sus_mask.mask.nnz()), static_cast<long long>(n * (n + 1) / 2), dQ.norm(),
              dK.norm(), dV.norm());
  return 0;
}
