// model_grad — the C++ transformer's (examples/transformer/model.hpp) loss and exact gradient,
// for the cross-check of examples/torch/gpt.py (tests/python/test_gpt.py compiles and runs it).
//
//   model_grad init LAYERS HEADS HEAD_DIM SEED OUT.ckpt
//       writes a freshly initialised checkpoint (Model::init(SEED))
//   model_grad grad f32|f64 CHECKPOINT TOKENS B n OUT
//       TOKENS: B·(n + 1) bytes, window b = bytes [b·(n+1), (b+1)·(n+1)): inputs its first n,
//       targets its last n. Runs forward (Record::dense_weights) and backward (Backward::dense)
//       in float or double and writes to OUT the loss then the gradient in Layout order, all
//       as little-endian float64.
#include "../transformer/model.hpp"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

template <class T>
void grad(const std::string& checkpoint, const std::string& tokens_path, int B, int n, const std::string& out_path) {
  const model::Checkpoint ck = model::load_checkpoint(checkpoint);
  model::Model<T> m(ck.config);
  model::load_into(m, ck);
  std::ifstream in(tokens_path, std::ios::binary);
  const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() != static_cast<std::size_t>(B) * (n + 1))
    throw std::runtime_error("model_grad: " + tokens_path + " holds " + std::to_string(bytes.size()) +
                             " bytes, expected B·(n + 1)");
  std::vector<int> inputs, targets;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < n; ++t) {
      inputs.push_back(bytes[static_cast<std::size_t>(b) * (n + 1) + t]);
      targets.push_back(bytes[static_cast<std::size_t>(b) * (n + 1) + t + 1]);
    }
  const double loss = m.forward(inputs, targets, B, n);
  m.backward(model::Backward::dense);
  std::ofstream out(out_path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(&loss), sizeof(loss));
  for (T g : m.grads) {
    const double d = static_cast<double>(g);
    out.write(reinterpret_cast<const char*>(&d), sizeof(d));
  }
  if (!out) throw std::runtime_error("model_grad: cannot write " + out_path);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::vector<std::string> a(argv + 1, argv + argc);
    if (a.size() == 6 && a[0] == "init") {
      model::Config cfg;
      cfg.n_layer = std::stoi(a[1]);
      cfg.n_head = std::stoi(a[2]);
      cfg.head_dim = std::stoi(a[3]);
      model::Model<float> m(cfg);
      m.init(std::stoull(a[4]));
      model::save_checkpoint(a[5], cfg, 0, m.params);
      return 0;
    }
    if (a.size() == 7 && a[0] == "grad") {
      if (a[1] == "f32") grad<float>(a[2], a[3], std::stoi(a[4]), std::stoi(a[5]), a[6]);
      else grad<double>(a[2], a[3], std::stoi(a[4]), std::stoi(a[5]), a[6]);
      return 0;
    }
    std::fprintf(stderr, "usage: model_grad init LAYERS HEADS HEAD_DIM SEED OUT | "
                         "model_grad grad f32|f64 CHECKPOINT TOKENS B n OUT\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "model_grad: %s\n", e.what());
    return 1;
  }
}
