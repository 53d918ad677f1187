// The example transformer (examples/transformer): whole-model gradient vs finite differences,
// unbiasedness of the whole-model SUS gradient, mask seeding, checkpoints, Brown text.
// Sizes are tiny: the whole file runs in about a second in Release, and in about 15 s under
// ASan/UBSan (Debug, -O1) in CI.
#include <catch2/catch.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <vector>

#include "test_util.hpp"
#include "transformer/data.hpp"
#include "transformer/model.hpp"

using namespace sus_test;

namespace {

// 2 layers x 2 heads x head dim 8 (d_model 16): every code path of the real model, tiny.
model::Config tiny_config() {
  model::Config cfg;
  cfg.n_layer = 2;
  cfg.n_head = 2;
  cfg.head_dim = 8;
  cfg.max_seq = 64;
  return cfg;
}

// Parameters far from the GPT-2 init (matrices N(0, 0.3²), gains 1 + N(0, 0.1²), biases
// N(0, 0.1²)), so attention is peaked and every tensor, LayerNorm included, has a
// non-trivial gradient.
template <class T>
void randomize(model::Model<T>& m, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> z(0.0, 1.0);
  for (const model::Tensor& t : m.layout().tensors) {
    const bool gain = t.name.size() >= 2 && t.name.compare(t.name.size() - 2, 2, ".g") == 0;
    for (index_t i = 0; i < t.size(); ++i)
      m.params[static_cast<std::size_t>(t.offset + i)] =
          static_cast<T>(t.matrix ? 0.3 * z(gen) : (gain ? 1.0 : 0.0) + 0.1 * z(gen));
  }
}

struct Batch {
  int B, n;
  std::vector<int> inputs, targets;
};

Batch random_batch(int B, int n, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  Batch b{B, n, {}, {}};
  for (int i = 0; i < B * n; ++i) {
    b.inputs.push_back(byte(gen));
    b.targets.push_back(byte(gen));
  }
  return b;
}

}  // namespace

// Central differences in double, step h = 1e-5: truncation error O(h²·L''') ~ 1e-10 and
// rounding ~ 1e-16·|L|/h ~ 1e-10, against gradient entries of 1e-4 … 1e-1. For every tensor,
// 16 random coordinates (all of them for tensors that small) are compared, plus the
// directional derivative along one random direction over all parameters.
// Tolerance: max|g − fd| ≤ 1e-6 · max|fd| per tensor (norm-wise, as max_rel_error).
TEST_CASE("model: whole-model gradient (dense attention backward) matches central finite differences",
          "[model][fd]") {
  model::Model<double> m(tiny_config());
  randomize(m, 7);
  const Batch batch = random_batch(2, 7, 11);  // n = 7: blocks and causal rows of odd length
  const model::ForwardOptions fwd;             // Record::dense_weights
  auto loss = [&] { return m.forward(batch.inputs, batch.targets, batch.B, batch.n, {model::Record::none, {}, 0}); };

  m.forward(batch.inputs, batch.targets, batch.B, batch.n, fwd);
  m.backward(model::Backward::dense);
  const std::vector<double> g = m.grads;
  const double h = 1e-5, tol = 1e-6;
  std::mt19937_64 gen(3);

  double worst = 0;
  std::string worst_tensor;
  for (const model::Tensor& t : m.layout().tensors) {
    std::vector<index_t> coords;
    if (t.size() <= 16) {
      for (index_t i = 0; i < t.size(); ++i) coords.push_back(t.offset + i);
    } else {
      std::uniform_int_distribution<index_t> pick(0, t.size() - 1);
      for (int k = 0; k < 16; ++k) coords.push_back(t.offset + pick(gen));
    }
    double max_diff = 0, max_ref = 1e-30;
    for (index_t c : coords) {
      double& p = m.params[static_cast<std::size_t>(c)];
      const double saved = p;
      p = saved + h;
      const double up = loss();
      p = saved - h;
      const double down = loss();
      p = saved;
      const double fd = (up - down) / (2 * h);
      max_diff = std::max(max_diff, std::abs(g[static_cast<std::size_t>(c)] - fd));
      max_ref = std::max(max_ref, std::abs(fd));
    }
    const double rel = max_diff / max_ref;
    INFO("tensor " << t.name << ": max|g - fd| = " << max_diff << ", max|fd| = " << max_ref);
    CHECK(rel <= tol);
    CHECK(max_ref > 1e-8);  // the tensor really has a gradient to check
    if (rel > worst) worst = rel, worst_tensor = t.name;
  }

  // Directional derivative along a random unit direction u over all parameters.
  std::normal_distribution<double> z(0.0, 1.0);
  std::vector<double> u(m.params.size());
  double norm = 0;
  for (double& x : u) x = z(gen), norm += x * x;
  double gu = 0;
  for (std::size_t i = 0; i < u.size(); ++i) u[i] /= std::sqrt(norm), gu += g[i] * u[i];
  const std::vector<double> saved = m.params;
  for (std::size_t i = 0; i < u.size(); ++i) m.params[i] = saved[i] + h * u[i];
  const double up = loss();
  for (std::size_t i = 0; i < u.size(); ++i) m.params[i] = saved[i] - h * u[i];
  const double down = loss();
  m.params = saved;
  const double fd_dir = (up - down) / (2 * h);
  const double dir_rel = std::abs(gu - fd_dir) / std::abs(fd_dir);
  std::printf("model FD check: max relative error %.3g (tensor %s), directional %.3g (tolerance %.0e)\n", worst,
              worst_tensor.c_str(), dir_rel, tol);
  CAPTURE(worst, worst_tensor, gu, fd_dir, dir_rel);
  CHECK(dir_rel <= tol);
}


// The whole-model SUS gradient (every attention backward sparse, fresh masks per layer,
// sequence and head) is unbiased: over N = 2000 seeds its mean is within k·σ/√N of the exact
// gradient in every one of the ~10.7k coordinates (one sequence of 12 tokens, c = 4). The gradient is a product of independent
// per-layer factors each linear in its W̃ with E[W̃] = W, so E[g̃] = g exactly.
// False-failure probability: k is the Bonferroni threshold for a total of 1e-3 over all
// coordinates of both variants under the normal approximation of each mean (the values are
// bounded — W̃ = W/q ≤ max(W, 1/c) — so the CLT holds well at N = 2000; the union bound
// over strongly correlated coordinates is conservative). The seeds are fixed: reproducible.
// Skew: rarely kept small weights make the draws skewed, and at 5σ the normal approximation
// of a mean of 2000 is only rough. At c = 2 the worst z reached 5.3 for one seed base (3.5 at
// N = 20000 for the same seeds: skew, not bias); at c = 4 it stayed ≤ 4.0 over 9 seed bases
// for both variants, well inside k ≈ 5.5 — hence c = 4.
// Power: the same test, run on the estimator that forgets the 1/q rescaling (values W instead
// of W/q), must report violations.
TEST_CASE("model: the whole-model SUS gradient is unbiased (mean over 2000 seeds within k sigma/sqrt(N))",
          "[model][unbiased][statistical]") {
  model::Model<double> m(tiny_config());
  randomize(m, 21);
  const Batch batch = random_batch(1, 12, 5);
  m.forward(batch.inputs, batch.targets, batch.B, batch.n);  // records W
  m.backward(model::Backward::dense);
  const std::vector<double> exact = m.grads;
  const int N = 2000, c = 4;
  const int variants = 2;
  const double k = normal_two_sided_quantile(1e-3 / (variants * double(exact.size())));

  for (auto [budget, draw] : {std::pair{sus::Budget::paper, sus::Draw::independent},
                              std::pair{sus::Budget::waterfill, sus::Draw::systematic}}) {
    INFO(sus::to_string(budget) << "/" << sus::to_string(draw) << ", c = " << c << ", k = " << k);
    Moments mom(exact.size());
    for (int t = 0; t < N; ++t) {
      m.sample_masks({c, budget, draw, /*seed=*/99}, /*stream=*/static_cast<std::uint64_t>(t));
      m.backward(model::Backward::sparse);
      mom.add(m.grads);
    }
    // Coordinates no mask reaches (the final LayerNorm, the last MLP, …) have σ = 0 and must
    // equal the exact gradient up to the rounding of the two computation orders (slack 1e-9).
    const Verdict v = judge_means(mom, exact, N, k, /*slack_rel=*/1e-9, /*random_rel=*/1e-12);
    std::printf("model unbiasedness (%s/%s, c = %d, N = %d): worst z = %.2f over %lld random coordinates "
                "(threshold %.2f)\n",
                sus::to_string(budget), sus::to_string(draw), c, N, v.worst_z, static_cast<long long>(v.random_coords),
                k);
    CAPTURE(v.worst_z, v.random_coords);
    CHECK(v.random_coords > index_t(exact.size() / 2));  // the masks reach most parameters
    CHECK(v.violations == 0);
  }

  SECTION("power: the test rejects the estimator without the 1/q rescaling") {
    const int N_power = 500;
    Moments mom(exact.size());
    for (int t = 0; t < N_power; ++t) {
      m.sample_masks({c, sus::Budget::paper, sus::Draw::independent, 7}, static_cast<std::uint64_t>(t));
      for (int l = 0; l < 2; ++l)
        for (int b = 0; b < batch.B; ++b)
          for (int h = 0; h < 2; ++h) {
            sus::Csr<double>& mask = m.mask(l, b, h);
            const auto& W = m.weights(l, b, h);
            for (index_t i = 0; i < mask.rows; ++i)
              for (index_t p = mask.row_offsets[i]; p < mask.row_offsets[i + 1]; ++p)
                mask.values[p] = W(i, mask.col_indices[p]);
          }
      m.backward(model::Backward::sparse);
      mom.add(m.grads);
    }
    const Verdict v = judge_means(mom, exact, N_power, k, /*slack_rel=*/1e-9, /*random_rel=*/1e-12);
    std::printf("model unbiasedness power check (no 1/q): worst z = %.1f, %lld violations\n", v.worst_z,
                static_cast<long long>(v.violations));
    CHECK(v.violations > 0);
  }
}

// SusMask inside the forward and sample_masks on the recorded W draw the same masks for the
// same (seed, stream): the sparse gradients agree bit for bit. Seeds differ per head.
TEST_CASE("model: masks recorded in the forward equal masks sampled from the recorded W", "[model][seeds]") {
  model::Model<double> m(tiny_config());
  randomize(m, 4);
  const Batch batch = random_batch(2, 9, 8);
  const sus::SamplerOptions so{3, sus::Budget::paper, sus::Draw::systematic, 1234};
  m.forward(batch.inputs, batch.targets, 2, 9, {model::Record::sus_mask, so, 17});
  m.backward(model::Backward::sparse);
  const std::vector<double> g1 = m.grads;
  m.forward(batch.inputs, batch.targets, 2, 9);
  m.sample_masks(so, 17);
  m.backward(model::Backward::sparse);
  CHECK(g1 == m.grads);
  // ... and sus::sample_mask on the full recorded W draws the same masks too.
  for (int l = 0; l < 2; ++l)
    for (int b = 0; b < 2; ++b)
      for (int h = 0; h < 2; ++h) {
        sus::SamplerOptions head = so;
        head.seed = model::mask_seed(so.seed, 17, l, b, h);
        const sus::Csr<double> ref = sus::sample_mask(m.weights(l, b, h), head);
        const sus::Csr<double>& got = m.mask(l, b, h);
        CHECK(got.row_offsets == ref.row_offsets);
        CHECK(got.col_indices == ref.col_indices);
        CHECK(got.values == ref.values);
      }
  m.sample_masks(so, 18);  // another step: other masks, another gradient
  m.backward(model::Backward::sparse);
  CHECK(g1 != m.grads);

  std::set<std::uint64_t> seeds;
  for (std::uint64_t step = 0; step < 4; ++step)
    for (int l = 0; l < 3; ++l)
      for (int b = 0; b < 3; ++b)
        for (int h = 0; h < 3; ++h) seeds.insert(model::mask_seed(1234, step, l, b, h));
  CHECK(seeds.size() == 4u * 27u);
}

TEST_CASE("model: the backward refuses missing recorded state", "[model][errors]") {
  model::Model<double> m(tiny_config());
  m.init(1);
  const Batch batch = random_batch(1, 4, 1);
  CHECK_THROWS_WITH(m.backward(model::Backward::dense), Catch::Contains("before forward"));
  m.forward(batch.inputs, batch.targets, 1, 4, {model::Record::none, {}, 0});
  CHECK_THROWS_WITH(m.backward(model::Backward::dense), Catch::Contains("Record::dense_weights"));
  CHECK_THROWS_WITH(m.backward(model::Backward::sparse), Catch::Contains("needs masks"));
  CHECK_THROWS_WITH(m.forward(batch.inputs, batch.targets, 1, 65), Catch::Contains("max_seq"));
}

TEST_CASE("model: checkpoints round-trip and refuse mismatched files", "[model][checkpoint]") {
  const auto dir = std::filesystem::temp_directory_path();
  const std::string path = (dir / "sus_test_model_checkpoint.bin").string();
  model::Model<float> m(tiny_config());
  m.init(5);
  model::save_checkpoint(path, m.config(), 42, m.params);
  const model::Checkpoint ck = model::load_checkpoint(path);
  CHECK(ck.config == m.config());
  CHECK(ck.step == 42u);
  model::Model<double> md(ck.config);
  model::load_into(md, ck);
  for (std::size_t i = 0; i < m.params.size(); ++i) REQUIRE(md.params[i] == double(m.params[i]));

  model::Config other = tiny_config();
  other.n_layer = 3;
  model::Model<float> m3(other);
  CHECK_THROWS_WITH(model::load_into(m3, ck), Catch::Contains("differs"));

  const std::string bytes = data::read_file(path);
  auto write = [&](const std::string& b) { std::ofstream(path, std::ios::binary | std::ios::trunc) << b; };
  std::string wrong_version = bytes;
  wrong_version[8] = 9;  // the version field follows the 8-byte magic
  write(wrong_version);
  CHECK_THROWS_WITH(model::load_checkpoint(path), Catch::Contains("version 9"));
  write("not a checkpoint at all");
  CHECK_THROWS_WITH(model::load_checkpoint(path), Catch::Contains("bad magic"));
  write(bytes.substr(0, bytes.size() - 4));
  CHECK_THROWS_WITH(model::load_checkpoint(path), Catch::Contains("truncated"));
  write(bytes + "x");
  CHECK_THROWS_WITH(model::load_checkpoint(path), Catch::Contains("trailing"));
  std::filesystem::remove(path);
}

TEST_CASE("data: Brown form C becomes plain text, and the split is by document", "[model][data]") {
  const std::string raw =
      "\n\n\tThe/at jury/nn said/vbd ``/`` no/at 1-1/2/cd ''/'' ,/, it/pps (/( said/vbd )/) ./.\n\n"
      "Next/ap sentence/nn ./.\n\n\tNew/jj paragraph/nn ./.\n";
  CHECK(data::brown_to_text(raw) == "The jury said \"no 1-1/2\", it (said). Next sentence.\nNew paragraph.\n");

  data::Corpus corpus;
  for (int k = 0; k < 20; ++k) corpus.documents.push_back(std::string(1, char('a' + k)));
  const data::Split split = data::split_by_document(corpus);
  CHECK(split.val_documents == 2u);
  CHECK(split.train_documents == 18u);
  CHECK(std::string(split.val.begin(), split.val.end()) == "j\nt");
  // Unigram baseline: a stream of one repeated byte costs ~0 bits under its own counts.
  const std::vector<std::uint8_t> same(1000, 'a');
  CHECK(data::unigram_bits_per_byte(same, same) < 0.4);
}
