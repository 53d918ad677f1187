// sus_torch — the op sus::attention: multi-head attention whose backward is SUS (sampled,
// unbiased, O(n·c·d)) or exact, over PyTorch CPU tensors read in place.
//
//   q: [B, S_q, H_q, D]  k: [B, S_k, H_kv, D]  v: [B, S_k, H_kv, D_v]  -> out: [B, S_q, H_q, D_v]
//   (layout "bshd"; "bhsd" swaps the S and H dimensions; varlen: [total, H, D] with cu_seqlens)
//
// Each tensor becomes a sus::HeadsView over its own storage (data_ptr, sizes, strides, and the
// storage's extent), so views of a fused qkv projection and transposes are never copied; the
// library checks bounds and self-overlap. The autograd kernel is a torch::autograd::Function
// whose context holds the sus::AttentionState (log-sum-exp, and the SUS masks or dense W).
// The CPU kernel (reached without autograd, e.g. under torch.inference_mode) saves nothing.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <sus/sus.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

using sus::index_t;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kFn = "sus_torch.attention";

// ---- What the last calls handed to the library (tests read it through sus::_last_call) ----
// Lets a test prove that q, k, v reached the library in place (the pointers equal the
// tensors' data_ptr) and that the op ran with the thread count torch asked for.
struct LastCall {
  std::int64_t forward_threads = 0, backward_threads = 0;
  std::int64_t forward_ptrs[3] = {0, 0, 0};   // q, k, v
  std::int64_t backward_ptrs[5] = {0, 0, 0, 0, 0};  // q, k, v, out, grad_out
  std::int64_t seed = 0;
};
std::mutex last_call_mutex;
LastCall last_call;

// Mask and attention statistics for the variance protocol (examples/torch/variance.py),
// collected while `on`: the kept entries, rows and visible (i, j) pairs of every SUS forward,
// and per dense-weights forward (one per attention layer, in call order) the sum over rows of
// each head's attention spread exp(entropy of the row of W).
struct Stats {
  bool on = false;
  double nnz = 0, rows = 0, pairs = 0;
  std::vector<std::vector<double>> spread;  // per call: [heads, rows per head, Σ spread of head 0, ...]
};
Stats stats;

// ---- Options: sampler keys mirror sus::SamplerOptions ----

// One row per SamplerOptions field that Python may set by name ("c=32,budget=paper"); an
// option the library adds later is one more row here and a keyword in sus_torch.attention.
struct SamplerField {
  const char* name;
  const char* values;  // for the error message
  std::function<bool(sus::SamplerOptions&, const std::string&)> set;  // false: bad value
};

bool parse_int(const std::string& s, long long lo, long long hi, long long& out) {
  try {
    std::size_t used = 0;
    out = std::stoll(s, &used);
    return used == s.size() && out >= lo && out <= hi;
  } catch (const std::exception&) {
    return false;
  }
}

const std::vector<SamplerField>& sampler_fields() {
  static const std::vector<SamplerField> fields = {
      {"c", "an integer >= 1",
       [](sus::SamplerOptions& o, const std::string& v) {
         long long c = 0;
         if (!parse_int(v, 1, 1LL << 30, c)) return false;
         o.c = static_cast<int>(c);
         return true;
       }},
      {"budget", "'paper' or 'waterfill'",
       [](sus::SamplerOptions& o, const std::string& v) {
         if (v == "paper") o.budget = sus::Budget::paper;
         else if (v == "waterfill") o.budget = sus::Budget::waterfill;
         else return false;
         return true;
       }},
      {"draw", "'systematic' or 'independent'",
       [](sus::SamplerOptions& o, const std::string& v) {
         if (v == "systematic") o.draw = sus::Draw::systematic;
         else if (v == "independent") o.draw = sus::Draw::independent;
         else return false;
         return true;
       }},
  };
  return fields;
}

// "key=value,key=value" -> SamplerOptions (defaults for keys not given).
sus::SamplerOptions parse_sampler(const std::string& spec) {
  sus::SamplerOptions o;
  std::stringstream items(spec);
  std::string item;
  while (std::getline(items, item, ',')) {
    if (item.empty()) continue;
    const auto eq = item.find('=');
    TORCH_CHECK_VALUE(eq != std::string::npos, kFn, ": sampler option '", item, "' is not key=value");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    const SamplerField* field = nullptr;
    std::string known;
    for (const SamplerField& f : sampler_fields()) {
      if (key == f.name) field = &f;
      known += known.empty() ? f.name : std::string(", ") + f.name;
    }
    TORCH_CHECK_VALUE(field != nullptr, kFn, ": unknown sampler option '", key, "' (known: ", known, ")");
    TORCH_CHECK_VALUE(field->set(o, value), kFn, ": argument '", key, "' = ", value, " must be ", field->values);
  }
  return o;
}

// The library's messages name its own arguments (Q, K, V, mask, options.cu_seqlens_q); say
// them as sus_torch.attention's keywords.
std::string python_names(std::string msg) {
  const std::pair<const char*, const char*> names[] = {
      {"'Q'", "'q'"},
      {"'K'", "'k'"},
      {"'V'", "'v'"},
      {"'mask'", "'attn_mask'"},
      {"'options.cu_seqlens_q'", "'cu_seqlens_q'"},  // quoted in some messages, bare in others
      {"'options.cu_seqlens_k'", "'cu_seqlens_k'"},
      {"options.cu_seqlens_q", "'cu_seqlens_q'"},
      {"options.cu_seqlens_k", "'cu_seqlens_k'"},
      {"state.sampler.c", "'c'"},
      {"options.scale", "'scale'"}};
  for (const auto& [from, to] : names)
    for (std::size_t at = msg.find(from); at != std::string::npos; at = msg.find(from, at + std::strlen(to)))
      msg.replace(at, std::strlen(from), to);
  return msg;
}

// Everything the op takes besides q, k, v.
struct Config {
  c10::optional<at::Tensor> attn_mask;
  std::vector<index_t> cu_seqlens_q, cu_seqlens_k;
  bool varlen = false;
  bool causal = false;
  sus::CausalAlignment alignment = sus::CausalAlignment::top_left;
  c10::optional<double> scale;
  bool dense_backward = false;
  sus::SamplerOptions sampler;
  bool bhsd = false;
};

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

std::vector<index_t> offsets(const c10::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return {};
  const at::Tensor& c = *t;
  TORCH_CHECK_VALUE(c.device().is_cpu(), kFn, ": argument '", name, "' must be a CPU tensor, got ", c.device());
  TORCH_CHECK_TYPE(c.scalar_type() == at::kInt || c.scalar_type() == at::kLong, kFn, ": argument '", name,
                   "' must be int32 or int64, got ", c.scalar_type());
  TORCH_CHECK_VALUE(c.dim() == 1 && c.numel() >= 2, kFn, ": argument '", name,
                    "' must be 1-D with B + 1 >= 2 offsets, got shape ", shape_of(c));
  const at::Tensor l = c.to(at::kLong).contiguous();
  const std::int64_t* p = l.data_ptr<std::int64_t>();
  return std::vector<index_t>(p, p + l.numel());
}

Config make_config(const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& cu_seqlens_q,
                   const c10::optional<at::Tensor>& cu_seqlens_k, bool causal, const std::string& alignment,
                   c10::optional<double> scale, const std::string& backward, const std::string& sampler,
                   const std::string& layout) {
  Config cfg;
  cfg.attn_mask = attn_mask;
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), kFn,
                    ": set both 'cu_seqlens_q' and 'cu_seqlens_k' or neither");
  cfg.cu_seqlens_q = offsets(cu_seqlens_q, "cu_seqlens_q");
  cfg.cu_seqlens_k = offsets(cu_seqlens_k, "cu_seqlens_k");
  cfg.varlen = cu_seqlens_q.has_value();
  cfg.causal = causal;
  if (alignment == "top_left") cfg.alignment = sus::CausalAlignment::top_left;
  else if (alignment == "bottom_right") cfg.alignment = sus::CausalAlignment::bottom_right;
  else TORCH_CHECK_VALUE(false, kFn, ": argument 'alignment' = '", alignment, "' must be 'top_left' or 'bottom_right'");
  cfg.scale = scale;
  if (backward == "dense") cfg.dense_backward = true;
  else TORCH_CHECK_VALUE(backward == "sus", kFn, ": argument 'backward' = '", backward, "' must be 'sus' or 'dense'");
  cfg.sampler = parse_sampler(sampler);
  if (layout == "bhsd") cfg.bhsd = true;
  else TORCH_CHECK_VALUE(layout == "bshd", kFn, ": argument 'layout' = '", layout, "' must be 'bshd' or 'bhsd'");
  TORCH_CHECK_VALUE(!(cfg.varlen && cfg.bhsd), kFn,
                    ": layout='bhsd' is not available with cu_seqlens (varlen tensors are [total, H, D])");
  return cfg;
}

sus::MultiHeadOptions multihead_options(const Config& cfg) {
  sus::MultiHeadOptions o;
  if (cfg.scale.has_value()) o.scale = *cfg.scale;
  o.causal = cfg.causal;
  o.alignment = cfg.alignment;
  o.cu_seqlens_q = cfg.cu_seqlens_q;
  o.cu_seqlens_k = cfg.cu_seqlens_k;
  o.num_threads = at::get_num_threads();  // torch.set_num_threads governs the library's team too
  return o;
}

// q, k, v: CPU, float32/float64, one dtype, 4-D (3-D with cu_seqlens), unit stride on the last dim.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Config& cfg) {
  const char* names[] = {"q", "k", "v"};
  const at::Tensor* ts[] = {&q, &k, &v};
  for (int x = 0; x < 3; ++x) {
    const at::Tensor& t = *ts[x];
    TORCH_CHECK_VALUE(t.defined(), kFn, ": argument '", names[x], "' is undefined");
    TORCH_CHECK_VALUE(t.device().is_cpu(), kFn, ": argument '", names[x], "' is on ", t.device(),
                      "; sus_torch runs on CPU tensors only");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, kFn, ": argument '", names[x],
                     "' has dtype ", t.scalar_type(), "; sus_torch supports float32 and float64");
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), kFn, ": argument '", names[x], "' has dtype ",
                     t.scalar_type(), " but 'q' has ", q.scalar_type(), "; pass one dtype");
    TORCH_CHECK_VALUE(!t.is_sparse() && t.layout() == at::kStrided, kFn, ": argument '", names[x],
                      "' must be a dense strided tensor");
    const int64_t want = cfg.varlen ? 3 : 4;
    TORCH_CHECK_VALUE(t.dim() == want, kFn, ": argument '", names[x], "' has shape ", shape_of(t), " (", t.dim(),
                      "-D), expected ",
                      cfg.varlen ? "3-D [total, H, D] (with cu_seqlens)"
                                 : (cfg.bhsd ? "4-D [B, H, S, D] (layout='bhsd')" : "4-D [B, S, H, D] (layout='bshd')"));
    TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, kFn, ": argument '", names[x], "' has stride ",
                      t.stride(-1), " along its last (head) dimension, shape ", shape_of(t), ", strides ", t.strides(),
                      "; sus reads heads in place and needs unit stride there (call .contiguous())");
  }
}

// The [B, S, H, D] view of a 4-D (or varlen 3-D) tensor's own storage.
template <class T>
sus::HeadsView<T> heads_view(const at::Tensor& t, const Config& cfg) {
  const at::Tensor t4 = cfg.varlen ? t.unsqueeze(0) : t;  // [1, total, H, D]: a view, no copy
  const int s = cfg.bhsd ? 2 : 1, h = cfg.bhsd ? 1 : 2;
  const index_t extent =
      static_cast<index_t>(t.storage().nbytes() / t.element_size()) - static_cast<index_t>(t.storage_offset());
  return sus::HeadsView<T>(static_cast<T*>(t.data_ptr()), t4.size(0), t4.size(s), t4.size(h), t4.size(3),
                           t4.stride(0), t4.stride(s), t4.stride(h), extent);
}

// A tensor shaped like the op's [B, S, H, D] (or [B, H, S, D], or [total, H, D]) result.
at::Tensor empty_heads(index_t B, index_t S, index_t H, index_t D, const Config& cfg, const at::TensorOptions& to) {
  if (cfg.varlen) return at::empty({S, H, D}, to);
  return cfg.bhsd ? at::empty({B, H, S, D}, to) : at::empty({B, S, H, D}, to);
}

// attn_mask: bool (true: attend) or additive in q's dtype, broadcastable to [B, H_q, S_q, S_k]
// (fewer dims are padded on the left, as torch broadcasting does). Read in place when its last
// dim has unit stride; `keep_alive` holds any expanded copy until the forward returns.
template <class T>
sus::HeadsMask<T> heads_mask(const Config& cfg, at::ScalarType dtype, at::Tensor& keep_alive) {
  sus::HeadsMask<T> m;
  if (!cfg.attn_mask.has_value()) return m;
  at::Tensor a = *cfg.attn_mask;
  TORCH_CHECK_VALUE(a.device().is_cpu(), kFn, ": argument 'attn_mask' is on ", a.device(), "; expected CPU");
  TORCH_CHECK_TYPE(a.scalar_type() == at::kBool || a.scalar_type() == dtype, kFn, ": argument 'attn_mask' has dtype ",
                   a.scalar_type(), "; expected bool (true: attend) or ", dtype, " (additive, like q)");
  TORCH_CHECK_VALUE(!a.requires_grad(), kFn,
                    ": argument 'attn_mask' requires grad; sus_torch does not differentiate the mask (detach it)");
  TORCH_CHECK_VALUE(a.dim() >= 1 && a.dim() <= 4, kFn, ": argument 'attn_mask' has shape ", shape_of(a),
                    "; expected 1 to 4 dims broadcastable to [B, H_q, S_q, S_k]");
  while (a.dim() < 4) a = a.unsqueeze(0);
  if (a.size(3) == 1) a = a.expand({a.size(0), a.size(1), a.size(2), -1});  // shapes are checked by the library
  if (a.size(3) > 1 && a.stride(3) != 1) a = a.contiguous();
  keep_alive = a;
  if (a.scalar_type() == at::kBool) m.keep = a.data_ptr<bool>();
  else m.add = static_cast<const T*>(a.data_ptr());
  m.batch = a.size(0), m.heads = a.size(1), m.rows = a.size(2), m.cols = a.size(3);
  m.stride_batch = a.stride(0), m.stride_head = a.stride(1), m.stride_row = a.stride(2);
  return m;
}

// The saved state, kept in the autograd context as a capsule.
struct Saved : torch::CustomClassHolder {
  sus::AttentionState<float> f;
  sus::AttentionState<double> d;
  Config cfg;
  sus::MultiHeadOptions options;
};

template <class T>
sus::AttentionState<T>& state_of(Saved& s);
template <>
sus::AttentionState<float>& state_of<float>(Saved& s) { return s.f; }
template <>
sus::AttentionState<double>& state_of<double>(Saved& s) { return s.d; }

// Runs a library call; its sus::Error becomes a ValueError with the library's message.
template <class F>
void call_library(F&& f) {
  try {
    f();
  } catch (const sus::Error& e) {
    TORCH_CHECK_VALUE(false, kFn, ": ", python_names(e.what()));
  }
}

// Keys visible to query i of an n_q x n_k sequence under the causal options (attn_mask aside).
index_t visible_keys(index_t i, index_t n_q, index_t n_k, const sus::MultiHeadOptions& o) {
  if (!o.causal) return n_k;
  const index_t last = o.alignment == sus::CausalAlignment::top_left ? i : i + n_k - n_q;
  return std::min(n_k, std::max<index_t>(0, last + 1));
}

template <class T>
void collect_stats(const sus::AttentionState<T>& state, const sus::MultiHeadOptions& o) {
  const index_t H = state.heads;
  if (state.save == sus::SaveForBackward::sus_mask) {
    for (index_t b = 0; b < state.sequences; ++b)
      for (index_t h = 0; h < H; ++h) {
        const sus::Csr<T>& m = state.masks[static_cast<std::size_t>(state.at(b, h))];
        stats.nnz += static_cast<double>(m.nnz());
        stats.rows += static_cast<double>(m.rows);
        for (index_t i = 0; i < m.rows; ++i) stats.pairs += static_cast<double>(visible_keys(i, m.rows, m.cols, o));
      }
  } else if (state.save == sus::SaveForBackward::dense_weights) {
    std::vector<double> rec(static_cast<std::size_t>(2 + H), 0.0);
    rec[0] = static_cast<double>(H);
    for (index_t b = 0; b < state.sequences; ++b)
      for (index_t h = 0; h < H; ++h) {
        const sus::Matrix<T>& W = state.weights[static_cast<std::size_t>(state.at(b, h))];
        if (h == 0) rec[1] += static_cast<double>(W.rows());
        for (index_t i = 0; i < W.rows(); ++i) {
          double entropy = 0;
          for (index_t j = 0; j < W.cols(); ++j) {
            const double w = static_cast<double>(W(i, j));
            if (w > 0) entropy -= w * std::log(w);
          }
          rec[static_cast<std::size_t>(2 + h)] += std::exp(entropy);
        }
      }
    stats.spread.push_back(std::move(rec));
  }
}

template <class T>
at::Tensor forward_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Config& cfg,
                         sus::SaveForBackward save, std::uint64_t seed, Saved& saved) {
  const sus::HeadsView<const T> Q = heads_view<T>(q, cfg), K = heads_view<T>(k, cfg), V = heads_view<T>(v, cfg);
  at::Tensor out = empty_heads(Q.batch, Q.seq, Q.heads, V.dim, cfg, q.options());
  const sus::HeadsView<T> O = heads_view<T>(out, cfg);
  at::Tensor mask_alive;
  const sus::HeadsMask<T> mask = heads_mask<T>(cfg, q.scalar_type(), mask_alive);
  saved.cfg = cfg;
  saved.options = multihead_options(cfg);
  sus::AttentionState<T>& state = state_of<T>(saved);
  state.save = save;
  state.sampler = cfg.sampler;
  state.sampler.seed = seed;
  call_library([&] { sus::multihead_attention_forward(Q, K, V, O, state, saved.options, mask); });
  {
    std::lock_guard<std::mutex> lock(last_call_mutex);
    if (stats.on) collect_stats(state, saved.options);
    last_call.forward_threads = saved.options.num_threads;
    last_call.forward_ptrs[0] = reinterpret_cast<std::int64_t>(Q.data);
    last_call.forward_ptrs[1] = reinterpret_cast<std::int64_t>(K.data);
    last_call.forward_ptrs[2] = reinterpret_cast<std::int64_t>(V.data);
    last_call.seed = static_cast<std::int64_t>(seed);
  }
  return out;
}

at::Tensor forward_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Config& cfg,
                       sus::SaveForBackward save, std::uint64_t seed, Saved& saved) {
  check_inputs(q, k, v, cfg);
  if (q.scalar_type() == at::kFloat) return forward_typed<float>(q, k, v, cfg, save, seed, saved);
  return forward_typed<double>(q, k, v, cfg, save, seed, saved);
}

// The mask seed: `seed` if given, else one draw from the generator (torch's default CPU
// generator unless one is passed), so torch.manual_seed reproduces a run and every call gets
// fresh masks. `stream` (the rank, under torch.distributed) is mixed in so that processes
// seeded alike still draw different masks.
std::uint64_t mask_seed(c10::optional<int64_t> seed, const c10::optional<at::Generator>& generator, int64_t stream) {
  std::uint64_t s = 0;
  if (seed.has_value()) {
    s = static_cast<std::uint64_t>(*seed);
  } else {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    s = gen->random64();
  }
  return stream == 0 ? s : sus::head_seed(s, stream, -1);
}

// ---- Autograd ----

// grad_out as the library reads it: unit stride on the last dim and no repeated elements
// (autograd hands expanded, stride-0 gradients, e.g. from out.sum()); else a contiguous copy.
at::Tensor readable_grad(const at::Tensor& g) {
  if (g.stride(-1) == 1 && g.is_non_overlapping_and_dense()) return g;
  return g.contiguous();
}

template <class T>
variable_list backward_typed(Saved& saved, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& out, const at::Tensor& grad_out) {
  const Config& cfg = saved.cfg;
  const sus::HeadsView<const T> Q = heads_view<T>(q, cfg), K = heads_view<T>(k, cfg), V = heads_view<T>(v, cfg),
                                O = heads_view<T>(out, cfg), dO = heads_view<T>(grad_out, cfg);
  at::Tensor dq = empty_heads(Q.batch, Q.seq, Q.heads, Q.dim, cfg, q.options());
  at::Tensor dk = empty_heads(K.batch, K.seq, K.heads, K.dim, cfg, k.options());
  at::Tensor dv = empty_heads(V.batch, V.seq, V.heads, V.dim, cfg, v.options());
  sus::MultiHeadOptions options = saved.options;
  options.num_threads = at::get_num_threads();
  call_library([&] {
    sus::multihead_attention_backward(Q, K, V, O, dO, state_of<T>(saved), heads_view<T>(dq, cfg),
                                      heads_view<T>(dk, cfg), heads_view<T>(dv, cfg), options);
  });
  {
    std::lock_guard<std::mutex> lock(last_call_mutex);
    last_call.backward_threads = options.num_threads;
    const void* ptrs[] = {Q.data, K.data, V.data, O.data, dO.data};
    for (int x = 0; x < 5; ++x) last_call.backward_ptrs[x] = reinterpret_cast<std::int64_t>(ptrs[x]);
  }
  return {dq, dk, dv};
}

struct SusAttention : torch::autograd::Function<SusAttention> {
  // needs_grad: grad mode was on and an input requires grad (decided by the caller: apply
  // turns grad mode off around forward). Otherwise only the log-sum-exp is kept.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const Config& cfg, std::uint64_t seed, bool needs_grad) {
    const sus::SaveForBackward save = !needs_grad          ? sus::SaveForBackward::lse_only
                                      : cfg.dense_backward ? sus::SaveForBackward::dense_weights
                                                           : sus::SaveForBackward::sus_mask;
    auto saved = c10::make_intrusive<Saved>();
    at::Tensor out = forward_any(q, k, v, cfg, save, seed, *saved);
    if (needs_grad) {
      ctx->save_for_backward({q, k, v, out});
      ctx->saved_data["state"] = c10::IValue::make_capsule(saved);
    }
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list t = ctx->get_saved_variables();
    auto saved = c10::static_intrusive_pointer_cast<Saved>(ctx->saved_data["state"].toCapsule());
    const at::Tensor grad_out = readable_grad(grads[0]);
    variable_list g = t[0].scalar_type() == at::kFloat ? backward_typed<float>(*saved, t[0], t[1], t[2], t[3], grad_out)
                                                       : backward_typed<double>(*saved, t[0], t[1], t[2], t[3], grad_out);
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The schema's arguments after q, k, v.
#define SUS_ATTENTION_PARAMS                                                                                         \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const c10::optional<at::Tensor>&attn_mask,        \
      const c10::optional<at::Tensor>&cu_seqlens_q, const c10::optional<at::Tensor>&cu_seqlens_k, bool causal,      \
      c10::string_view alignment, c10::optional<double> scale, c10::string_view backward, c10::string_view sampler, \
      c10::optional<int64_t> seed, const c10::optional<at::Generator>&generator, int64_t stream,                    \
      c10::string_view layout

Config config_of(const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& cu_seqlens_q,
                 const c10::optional<at::Tensor>& cu_seqlens_k, bool causal, c10::string_view alignment,
                 c10::optional<double> scale, c10::string_view backward, c10::string_view sampler,
                 c10::string_view layout) {
  return make_config(attn_mask, cu_seqlens_q, cu_seqlens_k, causal, std::string(alignment), scale,
                     std::string(backward), std::string(sampler), std::string(layout));
}

at::Tensor attention_autograd(SUS_ATTENTION_PARAMS) {
  const Config cfg = config_of(attn_mask, cu_seqlens_q, cu_seqlens_k, causal, alignment, scale, backward, sampler, layout);
  const bool needs_grad =
      at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  return SusAttention::apply(q, k, v, cfg, mask_seed(seed, generator, stream), needs_grad)[0];
}

// Without autograd (inference mode): the forward alone, saving only the log-sum-exp.
at::Tensor attention_cpu(SUS_ATTENTION_PARAMS) {
  const Config cfg = config_of(attn_mask, cu_seqlens_q, cu_seqlens_k, causal, alignment, scale, backward, sampler, layout);
  Saved saved;
  return forward_any(q, k, v, cfg, sus::SaveForBackward::lse_only, mask_seed(seed, generator, stream), saved);
}

// [forward threads, backward threads, forward q, k, v pointers, backward q, k, v, out, grad_out
// pointers, seed]: what the last calls handed to the library.
std::vector<int64_t> last_call_info() {
  std::lock_guard<std::mutex> lock(last_call_mutex);
  std::vector<int64_t> r = {last_call.forward_threads, last_call.backward_threads};
  r.insert(r.end(), std::begin(last_call.forward_ptrs), std::end(last_call.forward_ptrs));
  r.insert(r.end(), std::begin(last_call.backward_ptrs), std::end(last_call.backward_ptrs));
  r.push_back(last_call.seed);
  return r;
}

// The same forward + backward as the op, called from C++ the way a C++ user of the library
// would (caller-owned buffers allocated once, no autograd, no Python): the reference for the
// binding's overhead (bench/torch_bench.py). q, k, v, grad_out: contiguous [B, S, H, D] float32.
// Returns the wall seconds of each repetition.
std::vector<double> time_library(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& grad_out, bool causal, c10::string_view backward,
                                 c10::string_view sampler, int64_t seed, int64_t repetitions) {
  const Config cfg = make_config(c10::nullopt, c10::nullopt, c10::nullopt, causal, "top_left", c10::nullopt,
                                 std::string(backward), std::string(sampler), "bshd");
  check_inputs(q, k, v, cfg);
  const at::Tensor* all[] = {&q, &k, &v, &grad_out};
  for (const at::Tensor* t : all)
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous(), "sus::_time_library: float32 contiguous");
  const sus::HeadsView<const float> Q = heads_view<float>(q, cfg), K = heads_view<float>(k, cfg),
                                    V = heads_view<float>(v, cfg), dO = heads_view<float>(grad_out, cfg);
  at::Tensor out = at::empty_like(grad_out), dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const sus::MultiHeadOptions options = multihead_options(cfg);
  sus::AttentionState<float> state;
  state.save = cfg.dense_backward ? sus::SaveForBackward::dense_weights : sus::SaveForBackward::sus_mask;
  state.sampler = cfg.sampler;
  std::vector<double> seconds;
  for (int64_t r = 0; r < repetitions; ++r) {
    state.sampler.seed = static_cast<std::uint64_t>(seed + r);
    const auto t0 = std::chrono::steady_clock::now();
    call_library([&] {
      sus::multihead_attention_forward(Q, K, V, heads_view<float>(out, cfg), state, options);
      sus::multihead_attention_backward(Q, K, V, sus::HeadsView<const float>(heads_view<float>(out, cfg)), dO, state,
                                        heads_view<float>(dq, cfg), heads_view<float>(dk, cfg),
                                        heads_view<float>(dv, cfg), options);
    });
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return seconds;
}

// Starts (on = true: cleared) or stops collecting Stats; returns what was collected:
// [nnz, rows, pairs, calls, then per dense-weights call: heads, rows, Σ spread per head].
std::vector<double> take_stats(bool on) {
  std::lock_guard<std::mutex> lock(last_call_mutex);
  std::vector<double> r = {stats.nnz, stats.rows, stats.pairs, static_cast<double>(stats.spread.size())};
  for (const auto& rec : stats.spread) r.insert(r.end(), rec.begin(), rec.end());
  stats = Stats();
  stats.on = on;
  return r;
}

int64_t openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;  // built without OpenMP: the library runs on one thread
#endif
}

}  // namespace

TORCH_LIBRARY(sus, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, bool causal=False, str alignment=\"top_left\", float? scale=None, "
      "str backward=\"sus\", str sampler=\"\", int? seed=None, Generator? generator=None, int stream=0, "
      "str layout=\"bshd\") -> Tensor");
  m.def("_last_call() -> int[]", &last_call_info);
  m.def("_openmp_max_threads() -> int", &openmp_max_threads);
  m.def("_take_stats(bool on) -> float[]", &take_stats);
  m.def("_time_library(Tensor q, Tensor k, Tensor v, Tensor grad_out, bool causal, str backward, str sampler, "
        "int seed, int repetitions) -> float[]",
        &time_library);
}

TORCH_LIBRARY_IMPL(sus, Autograd, m) { m.impl("attention", &attention_autograd); }
TORCH_LIBRARY_IMPL(sus, CPU, m) { m.impl("attention", &attention_cpu); }
