// A grouped-query causal attention layer in a training loop, through the multi-head API.
//
//   x: [B·S, C] -> qkv = x·W_qkv: [B, S, H_q + 2·H_kv, D] (one fused projection; Q, K, V are
//   strided views into it, no copies) -> attention (GQA, causal) -> O: [B, S, H_q, D]
//   -> y = O·W_o -> loss = ½‖y − target‖²
//
// Every step: the forward samples the SUS masks while it computes O (no S x S matrix is
// kept); the backward takes them from the AttentionState and writes dQ, dK, dV straight into
// a packed dQKV buffer laid out like qkv. Then plain SGD on W_qkv and W_o.
//
//   multihead [--dense] [--steps N] [--seq S] [--threads T]
#include <sus/sus.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

int main(int argc, char** argv) {
  using sus::index_t;
  using M = sus::Matrix<float>;
  index_t B = 2, S = 1024, steps = 20;
  bool dense = false;
  int threads = 0;
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--dense")) dense = true;
    else if (!std::strcmp(argv[a], "--steps") && a + 1 < argc) steps = std::atoll(argv[++a]);
    else if (!std::strcmp(argv[a], "--seq") && a + 1 < argc) S = std::atoll(argv[++a]);
    else if (!std::strcmp(argv[a], "--threads") && a + 1 < argc) threads = std::atoi(argv[++a]);
    else {
      std::fprintf(stderr, "usage: multihead [--dense] [--steps N] [--seq S] [--threads T]\n");
      return 2;
    }
  }
  const index_t H_q = 8, H_kv = 2, D = 32, C = H_q * D, P = (H_q + 2 * H_kv) * D;  // P: fused q|k|v width

  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto randn = [&](index_t r, index_t c, float scale) {
    M m(r, c);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = scale * normal(gen);
    return m;
  };
  const M x = randn(B * S, C, 1.f), target = randn(B * S, C, 1.f);
  M W_qkv = randn(C, P, 1.f / std::sqrt(float(C))), W_o = randn(C, C, 1.f / std::sqrt(float(C)));

  // Views of the packed buffers: row (b, s) of qkv holds H_q query heads, then H_kv key heads,
  // then H_kv value heads, D floats each. dqkv is laid out the same way.
  M qkv(B * S, P), dqkv(B * S, P), O(B * S, C), dO(B * S, C);
  auto part = [&](M& buf, index_t first_head, index_t heads) {
    return sus::HeadsView<float>(buf.data() + first_head * D, B, S, heads, D, S * P, P, D, buf.size() - first_head * D);
  };
  const auto Q = part(qkv, 0, H_q), K = part(qkv, H_q, H_kv), V = part(qkv, H_q + H_kv, H_kv);
  const auto dQ = part(dqkv, 0, H_q), dK = part(dqkv, H_q, H_kv), dV = part(dqkv, H_q + H_kv, H_kv);
  const auto Ov = sus::bshd(O, B, S, H_q, D), dOv = sus::bshd(dO, B, S, H_q, D);

  sus::MultiHeadOptions options;
  options.causal = true;
  options.num_threads = threads;  // 0: OpenMP's default; results do not depend on it
  sus::AttentionState<float> state;
  state.save = dense ? sus::SaveForBackward::dense_weights : sus::SaveForBackward::sus_mask;
  state.sampler = {/*c=*/32, sus::Budget::paper, sus::Draw::independent, /*seed=*/0};

  const float lr = 0.05f;
  std::printf("B = %lld, S = %lld, H_q = %lld, H_kv = %lld, D = %lld, causal, %s backward\n", (long long)B,
              (long long)S, (long long)H_q, (long long)H_kv, (long long)D, dense ? "dense" : "SUS (c = 32)");
  for (index_t step = 0; step < steps; ++step) {
    // Forward.
    qkv.noalias() = x * W_qkv;
    state.sampler.seed = static_cast<std::uint64_t>(step);  // fresh masks every step
    sus::multihead_attention_forward(Q, K, V, Ov, state, options);
    const M y = O * W_o, dy = y - target;
    const double loss = 0.5 * dy.squaredNorm() / double(B * S);
    // Backward: y = O·W_o, then attention, then qkv = x·W_qkv.
    const M dW_o = O.transpose() * dy;
    dO.noalias() = dy * W_o.transpose();
    sus::multihead_attention_backward(Q, K, V, Ov, dOv, state, dQ, dK, dV, options);
    const M dW_qkv = x.transpose() * dqkv;
    W_o -= (lr / float(B * S)) * dW_o;
    W_qkv -= (lr / float(B * S)) * dW_qkv;
    index_t kept = 0;
    for (const auto& m : state.masks) kept += m.nnz();
    if (step % 5 == 0 || step + 1 == steps)
      std::printf("step %3lld  loss %.5f%s\n", (long long)step, loss,
                  dense ? "" : ("  (SUS kept " + std::to_string(double(kept) / double(B * H_q * S)) + " weights per row)").c_str());
  }
  return 0;
}
