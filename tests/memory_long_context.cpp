// Peak resident memory of one long-context SUS step: the multi-head forward with fused
// sampling (one head, causal) then the SUS backward, at n = 32768, d = 64, c = 32 by default.
// A dense W for this head would be n²·4 bytes = 4 GiB; the fused forward keeps one row block
// of scores per thread, so the peak is O(n·(d + c)).
//
//   memory_long_context [n] [d] [c] [limit_MiB]
//
// Prints the peak RSS (getrusage) and exits 1 if it is above limit_MiB.
#include <sus/sus.hpp>

#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {
double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;  // Linux: KiB
}
}  // namespace

int main(int argc, char** argv) {
  const sus::index_t n = argc > 1 ? std::atoll(argv[1]) : 32768, d = argc > 2 ? std::atoll(argv[2]) : 64;
  const int c = argc > 3 ? std::atoi(argv[3]) : 32;
  const double limit = argc > 4 ? std::atof(argv[4]) : 256.0;
  const double at_start = peak_rss_mib();

  using M = sus::Matrix<float>;
  const M Q = M::Random(n, d), K = M::Random(n, d), V = M::Random(n, d), dO = M::Random(n, d);
  M O(n, d), dQ(n, d), dK(n, d), dV(n, d);
  sus::MultiHeadOptions options;
  options.causal = true;
  sus::AttentionState<float> state;
  state.save = sus::SaveForBackward::sus_mask;
  state.sampler = {c, sus::Budget::paper, sus::Draw::independent, 1};
  sus::multihead_attention_forward(sus::bshd(Q, 1, n, 1, d), sus::bshd(K, 1, n, 1, d), sus::bshd(V, 1, n, 1, d),
                                   sus::bshd(O, 1, n, 1, d), state, options);
  const double after_forward = peak_rss_mib();
  sus::multihead_attention_backward(sus::bshd(Q, 1, n, 1, d), sus::bshd(K, 1, n, 1, d), sus::bshd(V, 1, n, 1, d),
                                    sus::bshd(O, 1, n, 1, d), sus::bshd(dO, 1, n, 1, d), state,
                                    sus::bshd(dQ, 1, n, 1, d), sus::bshd(dK, 1, n, 1, d), sus::bshd(dV, 1, n, 1, d),
                                    options);
  const double peak = peak_rss_mib();
  const auto nnz = state.masks[0].nnz();
  const double dense_w_mib = static_cast<double>(n) * static_cast<double>(n) * sizeof(float) / (1024.0 * 1024.0);
  std::printf("n = %lld, d = %lld, c = %d, causal, threads = %d\n", static_cast<long long>(n),
              static_cast<long long>(d), c, sus::detail::resolve_threads(0));
  std::printf("kept %lld weights (%.2f per row); |dQ| = %.4g, |dK| = %.4g, |dV| = %.4g\n",
              static_cast<long long>(nnz), static_cast<double>(nnz) / static_cast<double>(n), dQ.norm(), dK.norm(),
              dV.norm());
  std::printf("peak RSS: %.1f MiB at start, %.1f MiB after the forward, %.1f MiB after the backward "
              "(limit %.0f MiB; a dense W alone: %.0f MiB)\n",
              at_start, after_forward, peak, limit, dense_w_mib);
  if (!(dQ.allFinite() && dK.allFinite() && dV.allFinite())) {
    std::printf("FAIL: non-finite gradient\n");
    return 1;
  }
  if (peak > limit) {
    std::printf("FAIL: peak RSS %.1f MiB > %.0f MiB\n", peak, limit);
    return 1;
  }
  return 0;
}
