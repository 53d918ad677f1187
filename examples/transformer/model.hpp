// model — a small byte-level decoder-only transformer, llm.c style, with its attention
// computed by sus: forward and backward written out by hand, AdamW, checkpoints.
//
//   x_0     = wte[token]                                     [B·n, C]   (no position table: RoPE)
//   block l (pre-LayerNorm), for l = 0 … L−1:
//     a     = LN1(x_l)                                       [B·n, C]
//     qkv   = a·W_qkv + b_qkv, RoPE on q and k               [B·n, 3C]
//     o     = causal attention per (sequence, head) by sus   [B·n, C]
//     m     = x_l + o·W_o + b_o                              [B·n, C]
//     f     = LN2(m)·W_fc + b_fc                             [B·n, 4C]
//     x_l+1 = m + GELU(f)·W_proj + b_proj                    [B·n, C]
//   logits  = LN_f(x_L)·wteᵀ (head tied to the embedding)    [B·n, 256]
//   loss    = mean over the B·n positions of −log softmax(logits)[target]
//
// C = n_head·head_dim. Matrices are row-major and multiply from the right (y = x·W, W: in x out).
// The attention backward is exact (sus::attention_backward_dense on the W recorded by
// sus::DenseWeights) or SUS (sus::attention_backward_sparse on a CSR mask, recorded by
// sus::SusMask in the forward, or drawn later from the recorded W — the same draw as
// sus::sample_mask — by sample_masks). Mask seeds are a hash of (base seed, stream, layer,
// sequence, head): a fresh, reproducible seed for every head of every sequence, layer and
// training step (stream = step).
//
// Threads (OpenMP, optional): attention runs one task per (sequence, head); GEMMs and row-wise
// loops are split into fixed blocks. Results are bitwise the same for any thread count.
// Templated on the scalar: float for training, double for the gradient check.
#pragma once

#include <sus/sus.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <fstream>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace model {

using sus::index_t;
constexpr double kPi = 3.14159265358979323846;
template <class T>
using Mat = sus::Matrix<T>;
template <class T>
using MapMat = Eigen::Map<Mat<T>>;
template <class T>
using VecT = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// ---------------------------------------------------------------------------------------------
// Configuration and parameter layout

/// Shape of the model. Real configurations use head_dim = 64; the tests use smaller ones.
struct Config {
  int vocab = 256;     ///< byte tokens
  int n_layer = 4;     ///< transformer blocks
  int n_head = 4;      ///< attention heads per block
  int head_dim = 64;   ///< per-head width (even: RoPE rotates pairs)
  int max_seq = 8192;  ///< longest sequence the model accepts (RoPE itself has no limit)

  int d_model() const { return n_head * head_dim; }

  void validate() const {
    auto bad = [](const std::string& what) { throw std::invalid_argument("model::Config: " + what); };
    if (vocab < 1 || vocab > 256) bad("vocab = " + std::to_string(vocab) + " must be in [1, 256] (bytes)");
    if (n_layer < 1) bad("n_layer = " + std::to_string(n_layer) + " must be >= 1");
    if (n_head < 1) bad("n_head = " + std::to_string(n_head) + " must be >= 1");
    if (head_dim < 2 || head_dim % 2 != 0) bad("head_dim = " + std::to_string(head_dim) + " must be even and >= 2");
    if (max_seq < 1) bad("max_seq = " + std::to_string(max_seq) + " must be >= 1");
  }

  bool operator==(const Config& o) const {
    return vocab == o.vocab && n_layer == o.n_layer && n_head == o.n_head && head_dim == o.head_dim &&
           max_seq == o.max_seq;
  }
  bool operator!=(const Config& o) const { return !(*this == o); }

  std::string describe() const {
    return std::to_string(n_layer) + " layers x " + std::to_string(n_head) + " heads x head dim " +
           std::to_string(head_dim) + " (d_model " + std::to_string(d_model()) + "), vocab " + std::to_string(vocab) +
           ", max_seq " + std::to_string(max_seq);
  }
};

/// One named tensor in the flat parameter buffer.
struct Tensor {
  std::string name;
  index_t rows, cols;  ///< vectors are 1 x cols
  index_t offset;      ///< into the flat buffer
  bool matrix;         ///< a weight matrix: gets weight decay (vectors — biases, LayerNorm — do not)
  index_t size() const { return rows * cols; }
};

/// Where every tensor lives in the flat buffer (the same layout for parameters, gradients
/// and optimizer moments).
struct Layout {
  struct Block {
    int ln1_g, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_g, ln2_b, w_fc, b_fc, w_proj, b_proj;
  };
  std::vector<Tensor> tensors;
  std::vector<Block> blocks;
  int wte = -1, lnf_g = -1, lnf_b = -1;
  index_t size = 0;

  explicit Layout(const Config& cfg) {
    const index_t C = cfg.d_model(), V = cfg.vocab;
    wte = add("wte", V, C, true);
    for (int l = 0; l < cfg.n_layer; ++l) {
      const std::string p = "h" + std::to_string(l) + ".";
      Block b{};
      b.ln1_g = add(p + "ln1.g", 1, C, false);
      b.ln1_b = add(p + "ln1.b", 1, C, false);
      b.w_qkv = add(p + "attn.w_qkv", C, 3 * C, true);
      b.b_qkv = add(p + "attn.b_qkv", 1, 3 * C, false);
      b.w_o = add(p + "attn.w_o", C, C, true);
      b.b_o = add(p + "attn.b_o", 1, C, false);
      b.ln2_g = add(p + "ln2.g", 1, C, false);
      b.ln2_b = add(p + "ln2.b", 1, C, false);
      b.w_fc = add(p + "mlp.w_fc", C, 4 * C, true);
      b.b_fc = add(p + "mlp.b_fc", 1, 4 * C, false);
      b.w_proj = add(p + "mlp.w_proj", 4 * C, C, true);
      b.b_proj = add(p + "mlp.b_proj", 1, C, false);
      blocks.push_back(b);
    }
    lnf_g = add("lnf.g", 1, C, false);
    lnf_b = add("lnf.b", 1, C, false);
  }

 private:
  int add(const std::string& name, index_t rows, index_t cols, bool matrix) {
    tensors.push_back({name, rows, cols, size, matrix});
    size += rows * cols;
    return static_cast<int>(tensors.size()) - 1;
  }
};

// ---------------------------------------------------------------------------------------------
// Seeds, threads, clocks

/// Wall-clock seconds since t0 (steady clock).
inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// The sampler seed of one head: a hash of (base, stream, layer, sequence, head). Distinct
/// tuples give unrelated seeds (a collision has probability ~2⁻⁶⁴ per pair).
inline std::uint64_t mask_seed(std::uint64_t base, std::uint64_t stream, int layer, int sequence, int head) {
  std::uint64_t h = splitmix64(base);
  for (std::uint64_t v : {stream, std::uint64_t(layer), std::uint64_t(sequence), std::uint64_t(head)})
    h = splitmix64(h ^ v);
  return h;
}

/// for i in [0, count): f(i), on OpenMP threads when built with OpenMP and `parallel` (pass
/// false for work too small to pay for waking threads). Every f(i) writes its own outputs, so
/// results do not depend on the thread count. The first exception thrown by any f(i) is
/// rethrown on the calling thread.
template <class F>
void parallel_for(index_t count, F&& f, bool parallel = true) {
#ifdef _OPENMP
  std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) if (parallel && count > 1)
  for (index_t i = 0; i < count; ++i) {
    try {
      f(i);
    } catch (...) {
#pragma omp critical(model_parallel_for_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
#else
  (void)parallel;
  for (index_t i = 0; i < count; ++i) f(i);
#endif
}

/// Below this many flops (or element operations) a loop runs serially: waking threads costs
/// more than it saves (and far more when the cores are shared with other processes).
constexpr double kMinParallelWork = 1 << 22;

/// f(r0, r1) over blocks [r0, r1) of `rows` rows; blocks in parallel when `work` (the loop's
/// total flops) is at least kMinParallelWork.
template <class F>
void parallel_rows(index_t rows, F&& f, double work, index_t block = 256) {
  parallel_for((rows + block - 1) / block, [&](index_t blk) { f(blk * block, std::min(rows, (blk + 1) * block)); },
               work >= kMinParallelWork);
}

// GEMMs split into fixed blocks (independent of the thread count, so the bits are too).
// Y, dW are written through const references to Eigen expressions (Maps, Blocks), the
// idiom Eigen documents for functions writing into expressions.

/// Y = X·W, or Y += X·W when accumulate: blocks of 256 rows of X and Y.   X: m x k, W: k x n
template <class DY, class DX, class DW>
void gemm_rows(const Eigen::MatrixBase<DY>& Y_, const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DW>& W,
               bool accumulate) {
  auto& Y = const_cast<Eigen::MatrixBase<DY>&>(Y_);
  const double flops = 2.0 * double(X.rows()) * double(X.cols()) * double(W.cols());
  parallel_rows(X.rows(), [&](index_t r0, index_t r1) {
    if (accumulate) Y.middleRows(r0, r1 - r0).noalias() += X.middleRows(r0, r1 - r0) * W;
    else Y.middleRows(r0, r1 - r0).noalias() = X.middleRows(r0, r1 - r0) * W;
  }, flops);
}

/// dW += Xᵀ·dY (a weight gradient: the sum over all rows of the batch), split along the longer
/// side of dW in blocks of 128.   X: m x k, dY: m x n, dW: k x n
template <class DW, class DX, class DY>
void gemm_tn(const Eigen::MatrixBase<DW>& dW_, const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DY>& dY) {
  auto& dW = const_cast<Eigen::MatrixBase<DW>&>(dW_);
  constexpr index_t kBlock = 128;
  const double flops = 2.0 * double(X.rows()) * double(dW.rows()) * double(dW.cols());
  if (dW.rows() >= dW.cols()) {
    parallel_rows(dW.rows(), [&](index_t i0, index_t i1) {
      dW.middleRows(i0, i1 - i0).noalias() += X.middleCols(i0, i1 - i0).transpose() * dY;
    }, flops, kBlock);
  } else {
    parallel_rows(dW.cols(), [&](index_t j0, index_t j1) {
      dW.middleCols(j0, j1 - j0).noalias() += X.transpose() * dY.middleCols(j0, j1 - j0);
    }, flops, kBlock);
  }
}

/// Threads for the model's OpenMP loops (≤ 0: OpenMP's default). Eigen itself stays serial:
/// the model splits its GEMMs into fixed blocks scheduled dynamically (gemm_rows, gemm_tn),
/// which keeps results independent of the thread count and copes with cores shared with
/// other processes far better than Eigen's statically partitioned, spin-waiting parallel GEMM.
inline void set_threads(int threads) {
#ifdef _OPENMP
  if (threads > 0) omp_set_num_threads(threads);
#else
  (void)threads;
#endif
  Eigen::setNbThreads(1);
}

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ---------------------------------------------------------------------------------------------
// The model

/// What the forward records of each attention head for the backward.
enum class Record {
  none,           ///< nothing (evaluation)
  dense_weights,  ///< W (n x n per head): for Backward::dense, or masks drawn later by sample_masks
  sus_mask,       ///< the SUS mask, sampled row by row inside the forward: for Backward::sparse
};

/// Which attention backward the model's backward uses.
enum class Backward {
  dense,   ///< exact: sus::attention_backward_dense on the recorded W
  sparse,  ///< SUS: sus::attention_backward_sparse on the masks
};

struct ForwardOptions {
  Record record = Record::dense_weights;
  /// Record::sus_mask only: c, budget, draw; `sampler.seed` is the base seed of mask_seed.
  sus::SamplerOptions sampler;
  /// Record::sus_mask only: the stream of mask_seed (the training step).
  std::uint64_t stream = 0;
};

template <class T>
class Model {
 public:
  static constexpr double kLayerNormEps = 1e-5;
  static constexpr double kRopeBase = 10000.0;

  explicit Model(const Config& cfg) : cfg_((cfg.validate(), cfg)), layout_(cfg) {
    params.assign(static_cast<std::size_t>(layout_.size), T(0));
    grads.assign(params.size(), T(0));
  }

  const Config& config() const { return cfg_; }
  const Layout& layout() const { return layout_; }
  index_t num_params() const { return layout_.size; }

  /// Flat parameters and gradients (layout()).
  std::vector<T> params, grads;

  /// Wall-clock seconds spent in the attention calls (all layers, sequences and heads, SUS
  /// sampling in the forward included), accumulated over every forward() and backward() since
  /// construction; callers take differences. Everything else in a step (embeddings, LayerNorm,
  /// the QKV/output/MLP GEMMs, RoPE, the loss) is the step time minus these.
  struct AttentionSeconds {
    double forward = 0, backward = 0;
  } attention_seconds;

  /// GPT-2 initialisation: matrices N(0, 0.02²), the residual projections (w_o, w_proj) scaled
  /// by 1/√(2L); LayerNorm gains 1; biases 0.
  void init(std::uint64_t seed) {
    std::mt19937_64 gen(seed);
    const double residual_scale = 1.0 / std::sqrt(2.0 * cfg_.n_layer);
    for (const Tensor& t : layout_.tensors) {
      T* p = params.data() + t.offset;
      const bool gain = t.name.size() >= 2 && t.name.compare(t.name.size() - 2, 2, ".g") == 0;
      if (t.matrix) {
        const bool residual = t.name.find("w_o") != std::string::npos || t.name.find("w_proj") != std::string::npos;
        std::normal_distribution<double> dist(0.0, 0.02 * (residual ? residual_scale : 1.0));
        for (index_t i = 0; i < t.size(); ++i) p[i] = static_cast<T>(dist(gen));
      } else {
        std::fill(p, p + t.size(), gain ? T(1) : T(0));
      }
    }
  }

  /// View of tensor `id` of a flat buffer laid out like params.
  MapMat<T> view(std::vector<T>& buffer, int id) const {
    const Tensor& t = layout_.tensors[static_cast<std::size_t>(id)];
    return MapMat<T>(buffer.data() + t.offset, t.rows, t.cols);
  }

  /// Forward over B sequences of n tokens. inputs, targets: B·n byte tokens, row-major [B, n]
  /// (targets[b·n + t] is the token after inputs[b·n + t]). Returns the mean cross-entropy
  /// in nats, and keeps what backward() needs.
  double forward(const std::vector<int>& inputs, const std::vector<int>& targets, int B, int n,
                 const ForwardOptions& options = {}) {
    check_batch(inputs, targets, B, n);
    allocate(B, n);
    record_ = options.record;
    has_masks_ = options.record == Record::sus_mask;
    const index_t BT = index_t(B) * n, C = cfg_.d_model(), H = cfg_.n_head, hd = cfg_.head_dim;
    targets_ = targets;
    inputs_ = inputs;

    // x_0 = wte[token]
    const MapMat<T> wte = P(layout_.wte);
    for (index_t r = 0; r < BT; ++r) a_.x[0].row(r) = wte.row(inputs[static_cast<std::size_t>(r)]);

    for (int l = 0; l < cfg_.n_layer; ++l) {
      const Layout::Block& w = layout_.blocks[static_cast<std::size_t>(l)];
      LayerActs& A = a_.layer[static_cast<std::size_t>(l)];
      // a = LN1(x_l)
      layernorm_forward(a_.x[l], P(w.ln1_g), P(w.ln1_b), A.ln1, A.ln1_mean, A.ln1_rstd);
      // qkv = a·W_qkv + b_qkv
      gemm_rows(A.qkv, A.ln1, P(w.w_qkv), false);
      A.qkv.rowwise() += P(w.b_qkv).row(0);
      // q, k = RoPE(q), RoPE(k), position t = row mod n
      rope(A.qkv, 0, 2 * C, n, +1);
      // o = softmax(s·q·kᵀ, causal)·v per (sequence b, head h), recorded for the backward
      const auto t_attention = std::chrono::steady_clock::now();
      parallel_for(index_t(B) * H, [&](index_t task) {
        const int b = int(task / H), h = int(task % H);
        const sus::ConstMatrixRef<T> Q(A.qkv.block(index_t(b) * n, h * hd, n, hd));
        const sus::ConstMatrixRef<T> K(A.qkv.block(index_t(b) * n, C + h * hd, n, hd));
        const sus::ConstMatrixRef<T> Vv(A.qkv.block(index_t(b) * n, 2 * C + h * hd, n, hd));
        sus::MatrixRef<T> O(A.att.block(index_t(b) * n, h * hd, n, hd));
        const std::size_t idx = head_index(l, b, h);
        if (options.record == Record::dense_weights) {
          sus::attention_forward(Q, K, Vv, O, dense_[idx], attention_options());
        } else if (options.record == Record::sus_mask) {
          sus::SamplerOptions so = options.sampler;
          so.seed = mask_seed(options.sampler.seed, options.stream, l, b, h);
          sus::SusMask<T> recorder(so);
          sus::attention_forward(Q, K, Vv, O, recorder, attention_options());
          masks_[idx] = std::move(recorder.mask);
        } else {
          sus::attention_forward(Q, K, Vv, O, sus::NoRecord{}, attention_options());
        }
      }, heads_in_parallel(n));
      attention_seconds.forward += seconds_since(t_attention);
      // m = x_l + o·W_o + b_o
      A.mid = a_.x[l];
      gemm_rows(A.mid, A.att, P(w.w_o), true);
      A.mid.rowwise() += P(w.b_o).row(0);
      // f = LN2(m)·W_fc + b_fc,  g = GELU(f)
      layernorm_forward(A.mid, P(w.ln2_g), P(w.ln2_b), A.ln2, A.ln2_mean, A.ln2_rstd);
      gemm_rows(A.fc, A.ln2, P(w.w_fc), false);
      A.fc.rowwise() += P(w.b_fc).row(0);
      gelu_forward(A.fc, A.fc_gelu);
      // x_l+1 = m + g·W_proj + b_proj
      a_.x[l + 1] = A.mid;
      gemm_rows(a_.x[l + 1], A.fc_gelu, P(w.w_proj), true);
      a_.x[l + 1].rowwise() += P(w.b_proj).row(0);
    }
    // logits = LN_f(x_L)·wteᵀ, probs = softmax(logits)
    layernorm_forward(a_.x[cfg_.n_layer], P(layout_.lnf_g), P(layout_.lnf_b), a_.lnf, a_.lnf_mean, a_.lnf_rstd);
    gemm_rows(a_.probs, a_.lnf, wte.transpose(), false);
    // loss = mean −log probs[target]
    double loss = 0;
    for (index_t r = 0; r < BT; ++r) {
      auto row = a_.probs.row(r).array();
      const T m = row.maxCoeff();
      row = (row - m).exp();
      const T sum = row.sum();
      row /= sum;
      loss -= std::log(static_cast<double>(row(targets[static_cast<std::size_t>(r)])));
    }
    forwarded_ = true;
    return loss / static_cast<double>(BT);
  }

  /// Draws fresh SUS masks for every head from the W recorded by the last forward
  /// (Record::dense_weights), seeded by mask_seed(sampler.seed, stream, layer, sequence, head).
  /// Row i is sampled over its causal part W_i,0..i with sus::RowSampler, exactly as SusMask
  /// does inside the forward: the mask equals sus::sample_mask(W, options) bit for bit (the
  /// library guarantees that zeros appended to a row do not change its draw), at half the
  /// cost and without re-checking weights the library itself recorded.
  void sample_masks(const sus::SamplerOptions& sampler, std::uint64_t stream) {
    if (!forwarded_ || record_ != Record::dense_weights)
      throw std::logic_error("model::Model::sample_masks needs a forward with Record::dense_weights");
    const int L = cfg_.n_layer, H = cfg_.n_head;
    parallel_for(index_t(L) * B_ * H, [&](index_t task) {
      const int l = int(task / (index_t(B_) * H)), b = int(task / H % B_), h = int(task % H);
      sus::SamplerOptions so = sampler;
      so.seed = mask_seed(sampler.seed, stream, l, b, h);
      const std::size_t idx = head_index(l, b, h);
      const Mat<T>& W = dense_[idx].W;
      sus::RowSampler<T> row_sampler(so);
      sus::Csr<T> mask(W.rows(), W.cols());
      for (index_t i = 0; i < W.rows(); ++i) {
        row_sampler.sample(i, W.row(i).data(), i + 1, mask.col_indices, mask.values);
        mask.row_offsets[static_cast<std::size_t>(i + 1)] = mask.nnz();
      }
      masks_[idx] = std::move(mask);
    }, heads_in_parallel(n_));
    has_masks_ = true;
  }

  /// Gradient of the last forward's loss into `grads` (overwritten). Backward::dense needs a
  /// forward with Record::dense_weights; Backward::sparse needs masks (Record::sus_mask, or
  /// sample_masks after Record::dense_weights).
  void backward(Backward mode) {
    if (!forwarded_) throw std::logic_error("model::Model::backward called before forward");
    if (mode == Backward::dense && record_ != Record::dense_weights)
      throw std::logic_error("model::Model::backward(dense) needs a forward with Record::dense_weights");
    if (mode == Backward::sparse && !has_masks_)
      throw std::logic_error(
          "model::Model::backward(sparse) needs masks: forward with Record::sus_mask, or call sample_masks");
    const int B = B_, n = n_;
    const index_t BT = index_t(B) * n, C = cfg_.d_model(), H = cfg_.n_head, hd = cfg_.head_dim;
    std::fill(grads.begin(), grads.end(), T(0));
    Scratch& s = s_;
    if (keep_attention_grads) saved_datt_.resize(static_cast<std::size_t>(cfg_.n_layer));

    // Reverse order; each step quotes the forward line it differentiates.
    // 4. loss = mean −log softmax(logits)[target]  ->  dlogits = (probs − onehot(target)) / (B·n)
    s.dlogits = a_.probs;
    for (index_t r = 0; r < BT; ++r) s.dlogits(r, targets_[static_cast<std::size_t>(r)]) -= T(1);
    s.dlogits *= T(1) / static_cast<T>(BT);
    // 3. logits = lnf·wteᵀ  ->  dwte += dlogitsᵀ·lnf,  dlnf = dlogits·wte
    gemm_tn(G(layout_.wte), s.dlogits, a_.lnf);
    gemm_rows(s.dln, s.dlogits, P(layout_.wte), false);
    // lnf = LN_f(x_L)  ->  dx = LN_f'(dlnf)
    s.dx.setZero();
    layernorm_backward(s.dln, a_.x[cfg_.n_layer], a_.lnf_mean, a_.lnf_rstd, P(layout_.lnf_g), s.dx, G(layout_.lnf_g),
                       G(layout_.lnf_b));

    // 2. blocks, last to first; s.dx holds dL/dx_{l+1} on entry, dL/dx_l on exit.
    for (int l = cfg_.n_layer - 1; l >= 0; --l) {
      const Layout::Block& w = layout_.blocks[static_cast<std::size_t>(l)];
      LayerActs& A = a_.layer[static_cast<std::size_t>(l)];
      // x_l+1 = m + g·W_proj + b_proj  ->  dW_proj = gᵀ·dx, db_proj = Σ dx, dg = dx·W_projᵀ, dm = dx
      gemm_tn(G(w.w_proj), A.fc_gelu, s.dx);
      G(w.b_proj).row(0) += s.dx.colwise().sum();
      gemm_rows(s.dfc, s.dx, P(w.w_proj).transpose(), false);
      // g = GELU(f)  ->  df = dg ∘ GELU'(f)
      gelu_backward(A.fc, s.dfc);
      // f = LN2(m)·W_fc + b_fc  ->  dW_fc = LN2(m)ᵀ·df, db_fc = Σ df, dLN2 = df·W_fcᵀ
      gemm_tn(G(w.w_fc), A.ln2, s.dfc);
      G(w.b_fc).row(0) += s.dfc.colwise().sum();
      gemm_rows(s.dln, s.dfc, P(w.w_fc).transpose(), false);
      // LN2(m)  ->  dm += LN2'(dLN2)   (s.dx now holds dm)
      layernorm_backward(s.dln, A.mid, A.ln2_mean, A.ln2_rstd, P(w.ln2_g), s.dx, G(w.ln2_g), G(w.ln2_b));
      // m = x_l + o·W_o + b_o  ->  dW_o = oᵀ·dm, db_o = Σ dm, do = dm·W_oᵀ, dx_l = dm
      gemm_tn(G(w.w_o), A.att, s.dx);
      G(w.b_o).row(0) += s.dx.colwise().sum();
      gemm_rows(s.datt, s.dx, P(w.w_o).transpose(), false);
      if (keep_attention_grads) saved_datt_[static_cast<std::size_t>(l)] = s.datt;
      // o = attention(q, k, v) per (sequence, head)  ->  dq, dk, dv (dense or SUS). dq, dk, dv are
      // separate buffers: the library rejects outputs whose address ranges interleave.
      const auto t_attention = std::chrono::steady_clock::now();
      const std::vector<index_t> order = backward_order(mode, l);
      parallel_for(index_t(B) * H, [&](index_t t) {
        const index_t task = order[static_cast<std::size_t>(t)];
        const int b = int(task / H), h = int(task % H);
        const index_t r0 = index_t(b) * n;
        const sus::ConstMatrixRef<T> Q(A.qkv.block(r0, h * hd, n, hd));
        const sus::ConstMatrixRef<T> K(A.qkv.block(r0, C + h * hd, n, hd));
        const sus::ConstMatrixRef<T> Vv(A.qkv.block(r0, 2 * C + h * hd, n, hd));
        const sus::ConstMatrixRef<T> O(A.att.block(r0, h * hd, n, hd));
        const sus::ConstMatrixRef<T> dO(s.datt.block(r0, h * hd, n, hd));
        sus::MatrixRef<T> dQ(s.dq.block(r0, h * hd, n, hd));
        sus::MatrixRef<T> dK(s.dk.block(r0, h * hd, n, hd));
        sus::MatrixRef<T> dV(s.dv.block(r0, h * hd, n, hd));
        const std::size_t idx = head_index(l, b, h);
        if (mode == Backward::dense)
          sus::attention_backward_dense(Q, K, Vv, O, dO, sus::ConstMatrixRef<T>(dense_[idx].W), dQ, dK, dV,
                                        attention_options());
        else
          sus::attention_backward_sparse(Q, K, Vv, O, dO, masks_[idx], dQ, dK, dV, attention_options());
      }, heads_in_parallel(n));
      attention_seconds.backward += seconds_since(t_attention);
      // q, k = RoPE(q), RoPE(k)  ->  dq, dk = RoPE⁻¹(dq), RoPE⁻¹(dk) (the rotation's transpose)
      rope(s.dq, 0, C, n, -1);
      rope(s.dk, 0, C, n, -1);
      // qkv = LN1(x_l)·W_qkv + b_qkv  ->  dW_qkv = LN1ᵀ·[dq dk dv], db_qkv = Σ [dq dk dv],
      //                                   dLN1 = dq·W_qᵀ + dk·W_kᵀ + dv·W_vᵀ
      MapMat<T> dW_qkv = G(w.w_qkv), db_qkv = G(w.b_qkv);
      const MapMat<T> W_qkv = P(w.w_qkv);
      const Mat<T>* dparts[3] = {&s.dq, &s.dk, &s.dv};
      for (int part = 0; part < 3; ++part) {
        gemm_tn(dW_qkv.middleCols(part * C, C), A.ln1, *dparts[part]);
        db_qkv.row(0).segment(part * C, C) += dparts[part]->colwise().sum();
        gemm_rows(s.dln, *dparts[part], W_qkv.middleCols(part * C, C).transpose(), part > 0);
      }
      // LN1(x_l)  ->  dx_l = dm + LN1'(dLN1)
      layernorm_backward(s.dln, a_.x[l], A.ln1_mean, A.ln1_rstd, P(w.ln1_g), s.dx, G(w.ln1_g), G(w.ln1_b));
    }
    // 1. x_0 = wte[token]  ->  dwte[token] += dx_0 (in order: deterministic)
    MapMat<T> dwte = G(layout_.wte);
    for (index_t r = 0; r < BT; ++r) dwte.row(inputs_[static_cast<std::size_t>(r)]) += s.dx.row(r);
  }

  // --- recorded state of the last forward (index with layer, sequence in the batch, head) ---
  int batch() const { return B_; }
  int seq_len() const { return n_; }
  /// W of one head (Record::dense_weights): n x n, causal.
  const Mat<T>& weights(int layer, int sequence, int head) const { return dense_[head_index(layer, sequence, head)].W; }
  /// Set before backward() to keep every layer's dL/d(attention output) for attention_head().
  bool keep_attention_grads = false;
  /// One head's attention operands from the last forward (Q and K after RoPE) and, when the
  /// backward ran with keep_attention_grads, its dO: copies, n x head_dim each.
  struct AttentionHead {
    Mat<T> Q, K, V, O, dO;
  };
  AttentionHead attention_head(int layer, int sequence, int head) const {
    if (!forwarded_) throw std::logic_error("model::Model::attention_head needs a forward");
    const LayerActs& A = a_.layer[static_cast<std::size_t>(layer)];
    const index_t r0 = index_t(sequence) * n_, C = cfg_.d_model(), hd = cfg_.head_dim, c0 = index_t(head) * hd;
    AttentionHead h{A.qkv.block(r0, c0, n_, hd), A.qkv.block(r0, C + c0, n_, hd), A.qkv.block(r0, 2 * C + c0, n_, hd),
                    A.att.block(r0, c0, n_, hd), Mat<T>()};
    if (static_cast<std::size_t>(layer) < saved_datt_.size() && saved_datt_[static_cast<std::size_t>(layer)].rows() > 0)
      h.dO = saved_datt_[static_cast<std::size_t>(layer)].block(r0, c0, n_, hd);
    return h;
  }
  /// The SUS mask of one head (after Record::sus_mask or sample_masks). Writable: a test can
  /// perturb it to check that a biased backward is detected.
  sus::Csr<T>& mask(int layer, int sequence, int head) { return masks_[head_index(layer, sequence, head)]; }

  static sus::AttentionOptions attention_options() {
    sus::AttentionOptions o;
    o.causal = true;  // scale 1/√head_dim
    return o;
  }

 private:
  struct LayerActs {
    Mat<T> ln1, qkv, att, mid, ln2, fc, fc_gelu;
    VecT<T> ln1_mean, ln1_rstd, ln2_mean, ln2_rstd;
  };
  struct Acts {
    std::vector<Mat<T>> x;  // residual stream x_0 … x_L, [B·n, C] each
    std::vector<LayerActs> layer;
    Mat<T> lnf, probs;
    VecT<T> lnf_mean, lnf_rstd;
  };
  struct Scratch {
    Mat<T> dlogits, dx, dln, dfc, datt, dq, dk, dv;
    Mat<T> xhat, dxhat;  // layernorm_backward
  };

  MapMat<T> P(int id) { return view(params, id); }
  // Heads of n ≥ 128 tokens (≥ ~4 Mflop each) are worth a thread each; smaller ones run serially.
  static bool heads_in_parallel(int n) { return n >= 128; }
  /// The order in which layer l's (sequence, head) tasks are handed to the threads in the
  /// backward (task = b·H + h). A dense head costs the same as any other; a SUS head costs in
  /// proportion to its mask's nnz, which varies between heads (from about c·n/4 to c·n in a
  /// trained model), so the SUS heads go largest first: with dynamic scheduling that is the
  /// longest-processing-time rule, which keeps one thread from being left with a large head at
  /// the end. Each task writes its own outputs, so the order does not change the gradients.
  std::vector<index_t> backward_order(Backward mode, int l) const {
    const index_t tasks = index_t(B_) * cfg_.n_head;
    std::vector<index_t> order(static_cast<std::size_t>(tasks));
    for (index_t t = 0; t < tasks; ++t) order[static_cast<std::size_t>(t)] = t;
    if (mode == Backward::sparse) {
      auto nnz = [&](index_t t) { return masks_[head_index(l, int(t / cfg_.n_head), int(t % cfg_.n_head))].nnz(); };
      std::stable_sort(order.begin(), order.end(), [&](index_t x, index_t y) { return nnz(x) > nnz(y); });
    }
    return order;
  }
  MapMat<T> G(int id) { return view(grads, id); }

  std::size_t head_index(int layer, int sequence, int head) const {
    return (static_cast<std::size_t>(layer) * static_cast<std::size_t>(B_) + static_cast<std::size_t>(sequence)) *
               static_cast<std::size_t>(cfg_.n_head) +
           static_cast<std::size_t>(head);
  }

  void check_batch(const std::vector<int>& inputs, const std::vector<int>& targets, int B, int n) const {
    const std::string fn = "model::Model::forward: ";
    if (B < 1 || n < 1) throw std::invalid_argument(fn + "B and n must be >= 1");
    if (n > cfg_.max_seq)
      throw std::invalid_argument(fn + "n = " + std::to_string(n) + " exceeds max_seq = " + std::to_string(cfg_.max_seq));
    const std::size_t want = static_cast<std::size_t>(B) * static_cast<std::size_t>(n);
    if (inputs.size() != want || targets.size() != want)
      throw std::invalid_argument(fn + "inputs and targets need B·n = " + std::to_string(want) + " tokens, got " +
                                  std::to_string(inputs.size()) + " and " + std::to_string(targets.size()));
    for (std::size_t i = 0; i < want; ++i)
      if (inputs[i] < 0 || inputs[i] >= cfg_.vocab || targets[i] < 0 || targets[i] >= cfg_.vocab)
        throw std::invalid_argument(fn + "token " + std::to_string(i) + " out of range [0, " +
                                    std::to_string(cfg_.vocab) + ")");
  }

  void allocate(int B, int n) {
    if (B == B_ && n == n_) return;
    B_ = B;
    n_ = n;
    const index_t BT = index_t(B) * n, C = cfg_.d_model();
    a_.x.assign(static_cast<std::size_t>(cfg_.n_layer + 1), Mat<T>(BT, C));
    a_.layer.resize(static_cast<std::size_t>(cfg_.n_layer));
    for (LayerActs& A : a_.layer) {
      A.ln1.resize(BT, C);
      A.qkv.resize(BT, 3 * C);
      A.att.resize(BT, C);
      A.mid.resize(BT, C);
      A.ln2.resize(BT, C);
      A.fc.resize(BT, 4 * C);
      A.fc_gelu.resize(BT, 4 * C);
      for (VecT<T>* v : {&A.ln1_mean, &A.ln1_rstd, &A.ln2_mean, &A.ln2_rstd}) v->resize(BT);
    }
    a_.lnf.resize(BT, C);
    a_.probs.resize(BT, cfg_.vocab);
    a_.lnf_mean.resize(BT);
    a_.lnf_rstd.resize(BT);
    for (Mat<T>* m : {&s_.dx, &s_.dln, &s_.datt, &s_.dq, &s_.dk, &s_.dv}) m->resize(BT, C);
    s_.dfc.resize(BT, 4 * C);
    s_.dlogits.resize(BT, cfg_.vocab);
    const std::size_t heads = static_cast<std::size_t>(cfg_.n_layer) * static_cast<std::size_t>(B) *
                              static_cast<std::size_t>(cfg_.n_head);
    dense_.assign(heads, sus::DenseWeights<T>{});
    masks_.assign(heads, sus::Csr<T>{});
    // RoPE angles t·θ_i, θ_i = base^(−2i/head_dim), in double then rounded to T.
    const index_t half = cfg_.head_dim / 2;
    rope_cos_.resize(n, half);
    rope_sin_.resize(n, half);
    for (index_t t = 0; t < n; ++t)
      for (index_t i = 0; i < half; ++i) {
        const double angle = double(t) * std::pow(kRopeBase, -2.0 * double(i) / double(cfg_.head_dim));
        rope_cos_(t, i) = static_cast<T>(std::cos(angle));
        rope_sin_(t, i) = static_cast<T>(std::sin(angle));
      }
  }

  // y = (x − mean)·rstd ∘ g + b per row, rstd = 1/√(var + eps).   x, y: rows x C; g, b: 1 x C
  static void layernorm_forward(const Mat<T>& x, const MapMat<T>& g, const MapMat<T>& b, Mat<T>& y, VecT<T>& mean,
                                VecT<T>& rstd) {
    const index_t C = x.cols();
    mean = x.rowwise().sum() / static_cast<T>(C);
    y = x.colwise() - mean;  // centred
    rstd = ((y.array().square().rowwise().sum() / static_cast<T>(C)) + static_cast<T>(kLayerNormEps)).rsqrt().matrix();
    y.array().colwise() *= rstd.array();
    y.array().rowwise() *= g.row(0).array();
    y.rowwise() += b.row(0);
  }

  // The backward of layernorm_forward: with x̂ = (x − mean)·rstd and dx̂ = dy ∘ g,
  //   dx += rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂ ∘ x̂)),  dg += Σ_rows dy ∘ x̂,  db += Σ_rows dy.
  void layernorm_backward(const Mat<T>& dy, const Mat<T>& x, const VecT<T>& mean, const VecT<T>& rstd,
                          const MapMat<T>& g, Mat<T>& dx, MapMat<T> dg, MapMat<T> db) {
    const index_t C = x.cols();
    Mat<T>& xhat = s_.xhat;
    xhat = x.colwise() - mean;
    xhat.array().colwise() *= rstd.array();
    dg.row(0) += (dy.array() * xhat.array()).colwise().sum().matrix();
    db.row(0) += dy.colwise().sum();
    Mat<T>& dxhat = s_.dxhat;
    dxhat.resize(dy.rows(), dy.cols());
    dxhat.array() = dy.array().rowwise() * g.row(0).array();
    const VecT<T> mean_d = dxhat.rowwise().sum() / static_cast<T>(C);
    const VecT<T> mean_dx = (dxhat.array() * xhat.array()).rowwise().sum().matrix() / static_cast<T>(C);
    dxhat.colwise() -= mean_d;
    dxhat.array() -= xhat.array().colwise() * mean_dx.array();
    dxhat.array().colwise() *= rstd.array();
    dx += dxhat;
  }

  // GELU, tanh form: g = ½f(1 + tanh u), u = √(2/π)(f + 0.044715 f³). Row by row.
  static void gelu_forward(const Mat<T>& f, Mat<T>& g) {
    const T k = static_cast<T>(std::sqrt(2.0 / kPi)), a = static_cast<T>(0.044715);
    parallel_rows(f.rows(), [&](index_t r0, index_t r1) {
      const auto x = f.middleRows(r0, r1 - r0).array();
      g.middleRows(r0, r1 - r0).array() = T(0.5) * x * (T(1) + (k * (x + a * x.cube())).tanh());
    }, 20.0 * double(f.size()));
  }

  // dg -> df in place: GELU'(f) = ½(1 + tanh u) + ½f(1 − tanh² u)·√(2/π)(1 + 3·0.044715 f²).
  static void gelu_backward(const Mat<T>& f, Mat<T>& d) {
    const T k = static_cast<T>(std::sqrt(2.0 / kPi)), a = static_cast<T>(0.044715);
    parallel_rows(f.rows(), [&](index_t r0, index_t r1) {
      for (index_t r = r0; r < r1; ++r) {
        const auto x = f.row(r).array();
        const Eigen::Array<T, 1, Eigen::Dynamic> th = (k * (x + a * x.cube())).tanh();
        d.row(r).array() *=
            T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th.square()) * k * (T(1) + T(3) * a * x.square());
      }
    }, 30.0 * double(f.size()));
  }

  // Rotates each head's pairs (2i, 2i+1) of columns [c0, c1) of m by the angle of position
  // t = row mod n: direction +1 is RoPE, −1 its inverse (= transpose, for the backward).
  void rope(Mat<T>& m, index_t c0, index_t c1, int n, int direction) const {
    const index_t hd = cfg_.head_dim, half = hd / 2;
    const T sign = static_cast<T>(direction);
    parallel_rows(m.rows(), [&](index_t r0, index_t r1) {
      for (index_t r = r0; r < r1; ++r) {
        const index_t t = r % n;
        T* row = m.row(r).data();
        const T* cs = rope_cos_.row(t).data();
        const T* sn = rope_sin_.row(t).data();
        for (index_t c = c0; c < c1; c += hd)
          for (index_t i = 0; i < half; ++i) {
            const T x0 = row[c + 2 * i], x1 = row[c + 2 * i + 1], co = cs[i], si = sign * sn[i];
            row[c + 2 * i] = x0 * co - x1 * si;
            row[c + 2 * i + 1] = x0 * si + x1 * co;
          }
      }
    }, 3.0 * double(m.rows()) * double(c1 - c0));
  }

  Config cfg_;
  Layout layout_;
  int B_ = 0, n_ = 0;
  Acts a_;
  Scratch s_;
  std::vector<Mat<T>> saved_datt_;  // keep_attention_grads: dO of every layer
  Mat<T> rope_cos_, rope_sin_;
  std::vector<int> inputs_, targets_;
  std::vector<sus::DenseWeights<T>> dense_;
  std::vector<sus::Csr<T>> masks_;
  Record record_ = Record::none;
  bool forwarded_ = false, has_masks_ = false;
};

// ---------------------------------------------------------------------------------------------
// Optimizer and schedule

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.1;  ///< decoupled, on weight matrices only (Tensor::matrix)
  double clip = 1.0;          ///< global gradient-norm clip (≤ 0: off)
};

/// AdamW over a flat buffer (Loshchilov & Hutter), with global grad-norm clipping.
template <class T>
class AdamW {
 public:
  AdamW(const Layout& layout, const AdamWOptions& options)
      : opt_(options), m_(static_cast<std::size_t>(layout.size), 0.0f), v_(m_.size(), 0.0f), decay_(m_.size(), 0) {
    for (const Tensor& t : layout.tensors)
      if (t.matrix) std::fill(decay_.begin() + t.offset, decay_.begin() + t.offset + t.size(), std::uint8_t(1));
  }

  /// One update with learning rate lr. Returns the gradient norm before clipping.
  double step(std::vector<T>& params, const std::vector<T>& grads, double lr) {
    double norm2 = 0;
    for (T g : grads) norm2 += double(g) * double(g);
    const double norm = std::sqrt(norm2);
    const double scale = opt_.clip > 0 && norm > opt_.clip ? opt_.clip / norm : 1.0;
    ++t_;
    const double c1 = 1.0 - std::pow(opt_.beta1, double(t_)), c2 = 1.0 - std::pow(opt_.beta2, double(t_));
    const index_t size = static_cast<index_t>(params.size());
    parallel_for((size + kChunk - 1) / kChunk, [&](index_t chunk) {
      const index_t end = std::min(size, (chunk + 1) * kChunk);
      for (index_t i = chunk * kChunk; i < end; ++i) {
        const double g = double(grads[static_cast<std::size_t>(i)]) * scale;
        double m = m_[static_cast<std::size_t>(i)], v = v_[static_cast<std::size_t>(i)];
        m = opt_.beta1 * m + (1 - opt_.beta1) * g;
        v = opt_.beta2 * v + (1 - opt_.beta2) * g * g;
        m_[static_cast<std::size_t>(i)] = static_cast<float>(m);
        v_[static_cast<std::size_t>(i)] = static_cast<float>(v);
        double p = double(params[static_cast<std::size_t>(i)]);
        if (decay_[static_cast<std::size_t>(i)]) p -= lr * opt_.weight_decay * p;
        p -= lr * (m / c1) / (std::sqrt(v / c2) + opt_.eps);
        params[static_cast<std::size_t>(i)] = static_cast<T>(p);
      }
    });
    return norm;
  }

 private:
  static constexpr index_t kChunk = 1 << 16;
  AdamWOptions opt_;
  std::vector<float> m_, v_;
  std::vector<std::uint8_t> decay_;
  std::int64_t t_ = 0;
};

/// Linear warmup over `warmup` steps to lr_max, then cosine decay to final_fraction·lr_max at
/// step `total`.
inline double learning_rate(std::int64_t step, std::int64_t total, std::int64_t warmup, double lr_max,
                            double final_fraction = 0.1) {
  if (step < warmup) return lr_max * double(step + 1) / double(warmup);
  const double progress = total > warmup ? std::min(1.0, double(step - warmup) / double(total - warmup)) : 1.0;
  const double lr_min = final_fraction * lr_max;
  return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + std::cos(kPi * progress));
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
//
// Binary, little-endian:
//   char[8]  magic "SUSXFMR\0"
//   u32      version (kCheckpointVersion)
//   u32      0x01020304 (byte-order check)
//   i32 x 5  vocab, n_layer, n_head, head_dim, max_seq
//   u64      training step
//   u64      parameter count (must equal Layout(config).size)
//   f32 x count  parameters in Layout order
// The version changes whenever the layout, the meaning of the config or the model's fixed
// constants (LayerNorm eps, RoPE base, GELU form) change.

constexpr std::uint32_t kCheckpointVersion = 1;
constexpr char kCheckpointMagic[8] = {'S', 'U', 'S', 'X', 'F', 'M', 'R', '\0'};

struct Checkpoint {
  Config config;
  std::uint64_t step = 0;
  std::vector<float> params;
};

template <class T>
void save_checkpoint(const std::string& path, const Config& cfg, std::uint64_t step, const std::vector<T>& params) {
  if (static_cast<index_t>(params.size()) != Layout(cfg).size)
    throw std::invalid_argument("model::save_checkpoint: parameter count does not match the config");
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("model::save_checkpoint: cannot open " + path + " for writing");
  auto put = [&](const auto& v) { out.write(reinterpret_cast<const char*>(&v), sizeof(v)); };
  out.write(kCheckpointMagic, sizeof(kCheckpointMagic));
  put(kCheckpointVersion);
  put(std::uint32_t{0x01020304});
  for (std::int32_t v : {cfg.vocab, cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.max_seq}) put(v);
  put(std::uint64_t{step});
  put(std::uint64_t{params.size()});
  std::vector<float> f(params.begin(), params.end());
  out.write(reinterpret_cast<const char*>(f.data()), static_cast<std::streamsize>(f.size() * sizeof(float)));
  if (!out) throw std::runtime_error("model::save_checkpoint: write to " + path + " failed");
}

/// Reads a checkpoint; throws std::runtime_error naming the file and what is wrong (not a
/// checkpoint, another version, another byte order, a bad config, truncated or trailing data).
inline Checkpoint load_checkpoint(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("model::load_checkpoint: cannot open " + path);
  auto fail = [&](const std::string& why) -> void {
    throw std::runtime_error("model::load_checkpoint: " + path + ": " + why);
  };
  auto get = [&](auto& v) {
    in.read(reinterpret_cast<char*>(&v), sizeof(v));
    if (!in) fail("truncated header");
  };
  char magic[8] = {};
  in.read(magic, sizeof(magic));
  if (!in || std::memcmp(magic, kCheckpointMagic, sizeof(magic)) != 0) fail("not a sus transformer checkpoint (bad magic)");
  std::uint32_t version = 0, order = 0;
  get(version);
  if (version != kCheckpointVersion)
    fail("checkpoint version " + std::to_string(version) + ", this build reads version " +
         std::to_string(kCheckpointVersion) + " (retrain, or use the matching build)");
  get(order);
  if (order != 0x01020304u) fail("written on a machine with another byte order");
  Checkpoint ck;
  std::int32_t fields[5];
  for (auto& f : fields) get(f);
  ck.config = Config{fields[0], fields[1], fields[2], fields[3], fields[4]};
  try {
    ck.config.validate();
  } catch (const std::invalid_argument& e) {
    fail(std::string("bad config in header: ") + e.what());
  }
  std::uint64_t count = 0;
  get(ck.step);
  get(count);
  const index_t expected = Layout(ck.config).size;
  if (count != static_cast<std::uint64_t>(expected))
    fail("holds " + std::to_string(count) + " parameters, but its config (" + ck.config.describe() + ") has " +
         std::to_string(expected));
  ck.params.resize(count);
  in.read(reinterpret_cast<char*>(ck.params.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (!in) fail("truncated: fewer than the " + std::to_string(count) + " parameters its header announces");
  if (in.peek() != std::char_traits<char>::eof()) fail("trailing bytes after the parameters");
  return ck;
}

/// Loads a checkpoint's parameters into `model`; its config must equal the model's.
template <class T>
void load_into(Model<T>& model, const Checkpoint& ck) {
  if (ck.config != model.config())
    throw std::runtime_error("model::load_into: checkpoint config (" + ck.config.describe() +
                             ") differs from the model's (" + model.config().describe() + ")");
  std::transform(ck.params.begin(), ck.params.end(), model.params.begin(), [](float v) { return static_cast<T>(v); });
}

}  // namespace model
