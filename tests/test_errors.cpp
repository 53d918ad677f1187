// Bad input -> sus::Error whose message starts with "sus::<function>:", names the argument in
// quotes and, for shapes, prints both the actual and the expected shape.
//
// Every public entry point is driven from one table of operands stored in a single arena, so a
// case can give an operand a wrong shape, a non-finite entry, or make an output share memory
// with an input. Each case names the bug it guards against.
#include <catch2/catch.hpp>

#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "test_util.hpp"

namespace {

using sus::index_t;
using sus_test::M;
using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;

static_assert(std::is_base_of<std::invalid_argument, sus::Error>::value,
              "sus::Error must derive from std::invalid_argument");

using sus_test::error_message;

template <class T>
bool all_finite(const Eigen::Map<M<T>>& m) {
  return m.allFinite();
}

// ---------------------------------------------------------------------------------------------
// Operands: every matrix argument lives in one arena (with slack around each), addressed by
// offset, so a case can re-point an output into an input's memory.
// ---------------------------------------------------------------------------------------------
enum Arg : unsigned { Q, K, V, O, dO, W, dQ, dK, dV, kArgs };
constexpr const char* kArgName[kArgs] = {"Q", "K", "V", "O", "dO", "W", "dQ", "dK", "dV"};
constexpr unsigned bit(Arg a) { return 1u << a; }
constexpr unsigned kMaskBit = 1u << kArgs;  // the Csr 'mask' argument

template <class T>
struct Operands {
  static constexpr index_t kPad = 64;  // > any operand's size: overlap offsets stay in bounds
  struct Slot {
    index_t off = 0, rows = 0, cols = 0;
  };
  std::vector<T> arena;
  Slot slot[kArgs];
  sus::Csr<T> mask;
  sus::AttentionOptions options;

  // A valid problem: n_q = 3, n_k = 5, d = 4, d_v = 2 (all different, so every shape is unique).
  explicit Operands(index_t n_q = 3, index_t n_k = 5, index_t d = 4, index_t d_v = 2, bool causal = false) {
    sus_test::Problem<T> p(n_q, n_k, d, d_v, causal, 7);
    set(Q, p.Q);
    set(K, p.K);
    set(V, p.V);
    set(O, p.O);
    set(dO, p.dO);
    set(W, p.W);
    set(dQ, M<T>::Zero(n_q, d));
    set(dK, M<T>::Zero(n_k, d));
    set(dV, M<T>::Zero(n_k, d_v));
    options.causal = causal;
    sus::SamplerOptions so;
    so.c = 2;
    so.seed = 11;
    mask = sus::sample_mask(p.W, so);
  }

  void set(Arg a, const M<T>& m) {
    const index_t off = static_cast<index_t>(arena.size()) + kPad;
    arena.resize(static_cast<std::size_t>(off + m.size() + kPad), T(0));
    std::copy(m.data(), m.data() + m.size(), arena.data() + off);
    slot[a] = {off, m.rows(), m.cols()};
  }
  // Re-point output `out` at `in`'s memory shifted by `delta` elements (same shape as before).
  void alias(Arg out, Arg in, index_t delta) { slot[out].off = slot[in].off + delta; }
  index_t size(Arg a) const { return slot[a].rows * slot[a].cols; }
  Eigen::Map<M<T>> map(Arg a) { return {arena.data() + slot[a].off, slot[a].rows, slot[a].cols}; }
  M<T> get(Arg a) { return map(a); }
};

// The attention entry points, each with the arguments it takes.
template <class T>
struct Entry {
  const char* fn;  // message prefix, e.g. "sus::attention_forward:"
  unsigned args;   // bits of the arguments it reads or writes
  unsigned outs;   // bits of its outputs
  std::function<void(Operands<T>&)> call;
};

template <class T>
std::vector<Entry<T>> attention_entries() {
  const unsigned fwd = bit(Q) | bit(K) | bit(V) | bit(O);
  const unsigned bwd = bit(Q) | bit(K) | bit(V) | bit(O) | bit(dO) | bit(dQ) | bit(dK) | bit(dV);
  const unsigned bwd_out = bit(dQ) | bit(dK) | bit(dV);
  return {
      {"sus::attention_forward:", fwd, bit(O),
       [](Operands<T>& o) {
         sus::attention_forward(o.map(Q), o.map(K), o.map(V), o.map(O), sus::NoRecord{}, o.options);
       }},
      {"sus::reference::attention_forward:", fwd, bit(O),
       [](Operands<T>& o) {
         sus::reference::attention_forward<T>(o.map(Q), o.map(K), o.map(V), o.map(O), sus::NoRecord{}, o.options);
       }},
      {"sus::attention_backward_sparse:", bwd | kMaskBit, bwd_out,
       [](Operands<T>& o) {
         sus::attention_backward_sparse(o.map(Q), o.map(K), o.map(V), o.map(O), o.map(dO), o.mask, o.map(dQ),
                                        o.map(dK), o.map(dV), o.options);
       }},
      {"sus::reference::attention_backward_sparse:", bwd | kMaskBit, bwd_out,
       [](Operands<T>& o) {
         sus::reference::attention_backward_sparse<T>(o.map(Q), o.map(K), o.map(V), o.map(O), o.map(dO), o.mask,
                                                      o.map(dQ), o.map(dK), o.map(dV), o.options);
       }},
      {"sus::attention_backward_dense:", bwd | bit(W), bwd_out,
       [](Operands<T>& o) {
         sus::attention_backward_dense(o.map(Q), o.map(K), o.map(V), o.map(O), o.map(dO), o.map(W), o.map(dQ),
                                       o.map(dK), o.map(dV), o.options);
       }},
      {"sus::reference::attention_backward_dense:", bwd | bit(W), bwd_out,
       [](Operands<T>& o) {
         sus::reference::attention_backward_dense<T>(o.map(Q), o.map(K), o.map(V), o.map(O), o.map(dO), o.map(W),
                                                     o.map(dQ), o.map(dK), o.map(dV), o.options);
       }},
  };
}

// After an accepted call: every output is finite.
template <class T>
void check_outputs_finite(Operands<T>& o, const Entry<T>& e) {
  for (unsigned a = 0; a < kArgs; ++a)
    if (e.outs & bit(static_cast<Arg>(a))) {
      INFO("output '" << kArgName[a] << "' of " << e.fn);
      CHECK(all_finite<T>(o.map(static_cast<Arg>(a))));
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST_CASE("errors: sus::Error is a std::invalid_argument and messages start with sus::<function>", "[errors]") {
  Operands<float> o;
  o.set(K, sus_test::random_matrix<float>(5, 3, 1));  // d mismatch
  auto call = [&] {
    sus::attention_forward(o.map(Q), o.map(K), o.map(V), o.map(O), sus::NoRecord{}, o.options);
  };
  REQUIRE_THROWS_AS(call(), sus::Error);
  REQUIRE_THROWS_AS(call(), std::invalid_argument);
  REQUIRE_THROWS_MATCHES(call(), sus::Error,
                         Catch::Matchers::Predicate<sus::Error>(
                             [](const sus::Error& e) { return std::string(e.what()).rfind("sus::attention_forward: ", 0) == 0; },
                             "message starts with 'sus::attention_forward: '"));
  REQUIRE_THROWS_WITH(call(), StartsWith("sus::attention_forward: ") && Contains("'K'") && Contains("5x3") &&
                                  Contains("5x4"));
}

// ---------------------------------------------------------------------------------------------
// Wrong shapes. Base problem: Q 3x4, K 5x4, V 5x2, O 3x2, dO 3x2, W 3x5, dQ 3x4, dK 5x4, dV 5x2,
// mask 3x5. The message must name the argument and print both shapes.
// ---------------------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("errors: every wrongly shaped operand is named with its actual and expected shape", "[errors]",
                   float, double) {
  using T = TestType;
  struct ShapeCase {
    const char* bug;  // what a missing check would let through
    unsigned arg;     // the operand replaced (an Arg bit or kMaskBit)
    index_t rows, cols;
    const char* named;     // the argument the message must name
    const char* actual;    // shape printed as actual
    const char* expected;  // shape printed as expected
  };
  const ShapeCase cases[] = {
      {"K with d = 3 against Q with d = 4: GEMM over mismatched inner dims", bit(K), 5, 3, "'K'", "5x3", "5x4"},
      {"Q with d = 3 against K with d = 4 (reported on K)", bit(Q), 3, 3, "'K'", "5x4", "5x3"},
      {"V with 6 rows for 5 keys: reads past K", bit(V), 6, 2, "'V'", "6x2", "5x2"},
      {"V with d_v = 3 against O with d_v = 2 (reported on O)", bit(V), 5, 3, "'O'", "3x2", "3x3"},
      {"O with too many columns: writes past the buffer", bit(O), 3, 3, "'O'", "3x3", "3x2"},
      {"O with too few rows", bit(O), 2, 2, "'O'", "2x2", "3x2"},
      {"dO with an extra row", bit(dO), 4, 2, "'dO'", "4x2", "3x2"},
      {"dQ shaped like dK", bit(dQ), 5, 4, "'dQ'", "5x4", "3x4"},
      {"dQ with d_v columns instead of d", bit(dQ), 3, 2, "'dQ'", "3x2", "3x4"},
      {"dK shaped like dQ", bit(dK), 3, 4, "'dK'", "3x4", "5x4"},
      {"dV with d columns instead of d_v", bit(dV), 5, 4, "'dV'", "5x4", "5x2"},
      {"W transposed (n_k x n_q)", bit(W), 5, 3, "'W'", "5x3", "3x5"},
      {"W with a missing column", bit(W), 3, 4, "'W'", "3x4", "3x5"},
      {"mask with an extra row", kMaskBit, 4, 5, "'mask'", "4x5", "3x5"},
      {"mask with an extra column: index out of K's rows", kMaskBit, 3, 6, "'mask'", "3x6", "3x5"},
      {"mask transposed", kMaskBit, 5, 3, "'mask'", "5x3", "3x5"},
  };
  for (const auto& e : attention_entries<T>()) {
    for (const auto& c : cases) {
      if (!(e.args & c.arg)) continue;
      // Q/K cases only reach the entry through K's check: skip entries without that operand.
      Operands<T> o;
      if (c.arg == kMaskBit) o.mask = sus::Csr<T>(c.rows, c.cols);
      else
        for (unsigned a = 0; a < kArgs; ++a)
          if (c.arg == bit(static_cast<Arg>(a))) o.set(static_cast<Arg>(a), sus_test::random_matrix<T>(c.rows, c.cols, 3));
      INFO(e.fn << " / case: " << c.bug);
      const std::string msg = error_message([&] { e.call(o); });
      CHECK_THAT(msg, StartsWith(e.fn) && Contains(c.named) && Contains(c.actual) && Contains(c.expected));
    }
  }
}

TEMPLATE_TEST_CASE("errors: d < 1 and d_v < 1 are rejected naming 'Q' / 'V'", "[errors]", float, double) {
  using T = TestType;
  for (const auto& e : attention_entries<T>()) {
    {  // d = 0: the default scale 1/sqrt(d) would be inf
      Operands<T> o;
      o.set(Q, M<T>(3, 0));
      o.set(K, M<T>(5, 0));
      o.set(dQ, M<T>(3, 0));
      o.set(dK, M<T>(5, 0));
      INFO(e.fn << " / d = 0");
      CHECK_THAT(error_message([&] { e.call(o); }), StartsWith(e.fn) && Contains("'Q'") && Contains("3x0"));
    }
    {  // d_v = 0
      Operands<T> o;
      o.set(V, M<T>(5, 0));
      o.set(O, M<T>(3, 0));
      o.set(dO, M<T>(3, 0));
      o.set(dV, M<T>(5, 0));
      INFO(e.fn << " / d_v = 0");
      CHECK_THAT(error_message([&] { e.call(o); }), StartsWith(e.fn) && Contains("'V'") && Contains("5x0"));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// NaN / +Inf / -Inf in each input: the kernels would silently propagate them.
// O is an input of the backwards only (the forward overwrites it, so garbage there is fine).
// ---------------------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("errors: NaN and Inf in Q, K, V, O, dO are rejected naming the argument", "[errors]", float,
                   double) {
  using T = TestType;
  const T bad[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                   -std::numeric_limits<T>::infinity()};
  const Arg inputs[] = {Q, K, V, O, dO};
  for (const auto& e : attention_entries<T>()) {
    for (Arg a : inputs) {
      if (!(e.args & bit(a))) continue;
      for (T x : bad) {
        Operands<T> o;
        o.map(a)(1, 1) = x;
        INFO(e.fn << " / " << kArgName[a] << "(1, 1) = " << x);
        if (e.outs & bit(a)) {  // forward's O is an output: garbage in it is overwritten
          REQUIRE_NOTHROW(e.call(o));
          check_outputs_finite(o, e);
          continue;
        }
        const std::string quoted = std::string("'") + kArgName[a] + "'";
        CHECK_THAT(error_message([&] { e.call(o); }),
                   StartsWith(e.fn) && Contains(quoted) && Contains("non-finite") && Contains("(1, 1)"));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Options.
// ---------------------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("errors: options.scale NaN/inf is rejected", "[errors]", float,
                   double) {
  using T = TestType;
  const double bad_scales[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                               -std::numeric_limits<double>::infinity()};
  for (const auto& e : attention_entries<T>()) {
    for (double s : bad_scales) {  // bug: W = softmax(NaN) everywhere, or 0·inf
      Operands<T> o;
      o.options.scale = s;
      INFO(e.fn << " / options.scale = " << s);
      CHECK_THAT(error_message([&] { e.call(o); }), StartsWith(e.fn) && Contains("options.scale"));
    }
  }
}

TEMPLATE_TEST_CASE("errors: sampler budget c < 1 is rejected naming c", "[errors]", float, double) {
  using T = TestType;
  const M<T> Wv = Operands<T>().get(W);
  struct SamplerEntry {
    const char* fn;
    std::function<void(const sus::SamplerOptions&)> call;
  };
  const SamplerEntry entries[] = {
      {"sus::sample_mask:", [&](const sus::SamplerOptions& so) { sus::sample_mask(Wv, so); }},
      {"sus::reference::sample_mask:", [&](const sus::SamplerOptions& so) { sus::reference::sample_mask<T>(Wv, so); }},
      {"sus::RowSampler:", [](const sus::SamplerOptions& so) { sus::RowSampler<T> r(so); }},
      {"sus::RowSampler:", [](const sus::SamplerOptions& so) { sus::SusMask<T> r(so); }},  // via the recorder
  };
  for (const auto& e : entries) {
    for (int c : {0, -1, std::numeric_limits<int>::min()}) {  // bug: q = min(1, c·W) <= 0, nothing kept
      sus::SamplerOptions so;
      so.c = c;
      INFO(e.fn << " / c = " << c);
      CHECK_THAT(error_message([&] { e.call(so); }),
                 StartsWith(e.fn) && Contains("options.c = " + std::to_string(c)));
    }
    {  // bug: an out-of-range enum falls through to one of the branches
      sus::SamplerOptions so;
      so.budget = static_cast<sus::Budget>(7);
      INFO(e.fn << " / budget = 7");
      CHECK_THAT(error_message([&] { e.call(so); }), StartsWith(e.fn) && Contains("options.budget"));
      so = {};
      so.draw = static_cast<sus::Draw>(7);
      INFO(e.fn << " / draw = 7");
      CHECK_THAT(error_message([&] { e.call(so); }), StartsWith(e.fn) && Contains("options.draw"));
    }
  }
  // inclusion_probabilities takes c directly.
  const T w[3] = {T(0.5), T(0.25), T(0.25)};
  T q[3];
  for (auto budget : {sus::Budget::paper, sus::Budget::waterfill})
    for (int c : {0, -1}) {
      INFO("inclusion_probabilities / budget " << sus::to_string(budget) << " / c = " << c);
      CHECK_THAT(error_message([&] { sus::inclusion_probabilities(w, 3, c, budget, q); }),
                 StartsWith("sus::inclusion_probabilities:") && Contains("c = " + std::to_string(c)));
    }
  for (auto budget : {sus::Budget::paper, sus::Budget::waterfill}) {  // c = 1 is the smallest valid budget
    INFO("inclusion_probabilities / budget " << sus::to_string(budget) << " / c = 1");
    double total = 0;
    REQUIRE_NOTHROW(total = sus::inclusion_probabilities(w, 3, 1, budget, q));
    CHECK(total == Approx(1.0).epsilon(1e-6));
  }
}

// ---------------------------------------------------------------------------------------------
// Invalid Csr masks handed to the sparse backward. Base mask 3x5:
//   row 0: cols {0, 1}, row 1: cols {2}, row 2: cols {3, 4}; offsets {0, 2, 3, 5}.
// ---------------------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("errors: an invalid Csr mask is rejected naming 'mask'", "[errors]", float, double) {
  using T = TestType;
  using Csr = sus::Csr<T>;
  auto base = [] {
    Csr m(3, 5);
    m.row_offsets = {0, 2, 3, 5};
    m.col_indices = {0, 1, 2, 3, 4};
    m.values = {T(1), T(0.5), T(2), T(1), T(1)};
    return m;
  };
  REQUIRE_NOTHROW(base().validate());
  struct CsrCase {
    const char* bug;
    std::function<void(Csr&)> corrupt;
    const char* detail;  // a word the message must contain besides 'mask'
  };
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  const CsrCase cases[] = {
      {"row_offsets one entry short: reads row_offsets[rows] out of bounds",
       [](Csr& m) { m.row_offsets.pop_back(); }, "row_offsets"},
      {"row_offsets empty", [](Csr& m) { m.row_offsets.clear(); }, "row_offsets"},
      {"row_offsets[0] != 0: entries before row 0 ignored", [](Csr& m) { m.row_offsets = {1, 2, 3, 5}; },
       "row_offsets[0]"},
      {"row_offsets decreasing", [](Csr& m) { m.row_offsets = {0, 3, 2, 5}; }, "decreases"},
      {"row_offsets overshoot nnz then decrease: validate must bound offsets before reading entries",
       [](Csr& m) { m.row_offsets = {0, 6, 2, 5}; }, "row_offsets"},
      {"row_offsets[rows] != nnz", [](Csr& m) { m.row_offsets = {0, 2, 3, 4}; }, "row_offsets[rows]"},
      {"values shorter than col_indices", [](Csr& m) { m.values.pop_back(); }, "values"},
      {"column index == n_k: reads past K, V", [](Csr& m) { m.col_indices[4] = 5; }, "out of range"},
      {"negative column index", [](Csr& m) { m.col_indices[0] = -1; }, "out of range"},
      {"duplicate column in a row: counted twice", [](Csr& m) { m.col_indices[1] = 0; }, "strictly increasing"},
      {"unsorted row: breaks the transposed SpMM order", [](Csr& m) { std::swap(m.col_indices[3], m.col_indices[4]); },
       "strictly increasing"},
      {"NaN value", [nan](Csr& m) { m.values[2] = nan; }, "not finite"},
      {"Inf value", [inf](Csr& m) { m.values[2] = inf; }, "not finite"},
  };
  for (const auto& e : attention_entries<T>()) {
    if (!(e.args & kMaskBit)) continue;
    for (const auto& c : cases) {
      Operands<T> o;
      o.mask = base();
      c.corrupt(o.mask);
      INFO(e.fn << " / case: " << c.bug);
      CHECK_THAT(error_message([&] { e.call(o); }), StartsWith(e.fn) && Contains("'mask'") && Contains(c.detail));
    }
  }
}

TEMPLATE_TEST_CASE("errors: a mask or W with an entry above the diagonal is rejected when causal", "[errors]", float,
                   double) {
  using T = TestType;
  for (const auto& e : attention_entries<T>()) {
    if (!(e.args & (kMaskBit | bit(W)))) continue;
    // bug: the backward would silently use a key the forward never let the query see.
    Operands<T> o(4, 4, 3, 2, /*causal=*/true);
    if (e.args & kMaskBit) {  // mask sampled from the causal W, plus entry (1, 3)
      M<T> dense = o.mask.to_dense();
      dense(1, 3) = T(0.5);
      sus::Csr<T> m(4, 4);
      for (index_t i = 0; i < 4; ++i) {
        for (index_t j = 0; j < 4; ++j)
          if (dense(i, j) != T(0)) {
            m.col_indices.push_back(j);
            m.values.push_back(dense(i, j));
          }
        m.row_offsets[static_cast<std::size_t>(i + 1)] = m.nnz();
      }
      REQUIRE_NOTHROW(m.validate());
      o.mask = m;
    } else {  // W of the non-causal forward (rows sum to 1, but dense above the diagonal)
      o.set(W, sus_test::Problem<T>(4, 4, 3, 2, false, 7).W);
    }
    const char* named = (e.args & kMaskBit) ? "'mask'" : "'W'";
    INFO(e.fn << " / " << named << " above the diagonal with options.causal");
    CHECK_THAT(error_message([&] { e.call(o); }), StartsWith(e.fn) && Contains(named) && Contains("diagonal"));
  }
}

// ---------------------------------------------------------------------------------------------
// W: recorded softmax weights. Entry points taking W: sample_mask, reference::sample_mask,
// attention_backward_dense, reference::attention_backward_dense. Row 1 of the 3x5 W is
// replaced by the row below. Tolerance: |Σ_j W_ij − 1| <= sus::row_sum_tolerance<T>()
// (1e-4 float, 1e-9 double), or the row is all zero (fully masked).
// ---------------------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("errors: W must be finite, >= 0, rows summing to 1 within tolerance or all zero", "[errors]",
                   float, double) {
  using T = TestType;
  const double tol = sus::row_sum_tolerance<T>();
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  struct WCase {
    const char* bug;
    std::vector<T> row;  // row 1 of W (5 entries)
    bool accepted;
    const char* detail;  // besides 'W', what the message must contain
  };
  // Rows [a, b, 0, 0, 0] with b = 1 − a + δ: Σ = 1 + δ up to one rounding of b.
  auto row_with_sum = [](double delta) {
    return std::vector<T>{T(0.25), static_cast<T>(0.75 + delta), T(0), T(0), T(0)};
  };
  const WCase cases[] = {
      {"negative entry (row still sums to 1): q = min(1, c·W) < 0", {T(1.25), T(-0.25), T(0), T(0), T(0)}, false,
       ">= 0"},
      {"NaN entry", {T(0.5), nan, T(0.5), T(0), T(0)}, false, "finite"},
      {"+Inf entry", {T(0.5), inf, T(0), T(0), T(0)}, false, "finite"},
      {"row sums to 0.5: not softmax weights, estimator biased", {T(0.25), T(0.25), T(0), T(0), T(0)}, false,
       "sums to"},
      {"row sums to 2", {T(1), T(1), T(0), T(0), T(0)}, false, "sums to"},
      {"row sums to 1 + 2·tol (just outside)", row_with_sum(2 * tol), false, "sums to"},
      {"row sums to 1 − 2·tol (just outside)", row_with_sum(-2 * tol), false, "sums to"},
      {"row sums to 1 + tol/2 (inside: rounding of a real softmax)", row_with_sum(tol / 2), true, ""},
      {"row sums to 1 − tol/2 (inside)", row_with_sum(-tol / 2), true, ""},
      {"row sums to 1 within 1e-6 (float) / 1e-12 (double)",
       row_with_sum(std::is_same<T, float>::value ? 1e-6 : 1e-12), true, ""},
      {"all-zero row: a fully masked query", {T(0), T(0), T(0), T(0), T(0)}, true, ""},
      {"one-hot row", {T(0), T(0), T(0), T(1), T(0)}, true, ""},
  };
  struct WEntry {
    const char* fn;
    std::function<void(Operands<T>&)> call;
  };
  sus::SamplerOptions so;
  so.c = 2;
  const WEntry entries[] = {
      {"sus::sample_mask:", [so](Operands<T>& o) { sus::sample_mask(o.map(W), so).validate(); }},
      {"sus::reference::sample_mask:",
       [so](Operands<T>& o) { sus::reference::sample_mask<T>(o.map(W), so).validate(); }},
      {"sus::attention_backward_dense:", attention_entries<T>()[4].call},
      {"sus::reference::attention_backward_dense:", attention_entries<T>()[5].call},
  };
  for (const auto& e : entries) {
    for (const auto& c : cases) {
      Operands<T> o;
      double sum = 0;
      for (index_t j = 0; j < 5; ++j) {
        o.map(W)(1, j) = c.row[static_cast<std::size_t>(j)];
        sum += static_cast<double>(c.row[static_cast<std::size_t>(j)]);
      }
      INFO(e.fn << " / case: " << c.bug << " / row sum − 1 = " << (sum - 1) << " (tol " << tol << ")");
      if (c.accepted) {
        CHECK_NOTHROW(e.call(o));
        for (Arg a : {dQ, dK, dV}) CHECK(o.map(a).allFinite());
      } else {
        CHECK_THAT(error_message([&] { e.call(o); }), StartsWith(e.fn) && Contains("'W'") && Contains(c.detail));
      }
    }
  }
}

// The W check's one-pass fast path (detail::row_sum_min: vector code in blocks of 16 where AVX is
// there, then a scalar tail) must see a bad entry wherever it sits in a long row: in every lane
// of a block, in the tail, in rows shorter than a block. Row 1 of a 2 x n W is uniform (1/n)
// with entry k replaced by NaN, +inf, −inf or −1/n (entry k + 1 raised by 2/n, so the row still
// sums to 1 and only the minimum can catch it); the message must name entry (1, k).
TEMPLATE_TEST_CASE("errors: a bad W entry is found at every position of rows of any length", "[errors]", float,
                   double) {
  using T = TestType;
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  sus::SamplerOptions so;
  so.c = 2;
  for (index_t n : {2, 15, 16, 17, 33, 50}) {
    sus::Matrix<T> W = sus::Matrix<T>::Constant(2, n, T(1) / T(n));
    CHECK_NOTHROW(sus::sample_mask(W, so));
    double sum = 0;
    T lowest = 0;
    sus::detail::row_sum_min(W.row(1).data(), n, sum, lowest);
    CHECK(std::abs(sum - 1.0) < 1e-6);
    CHECK(lowest == T(0));
    for (index_t k = 0; k + 1 < n; ++k) {
      for (int kind = 0; kind < 4; ++kind) {
        sus::Matrix<T> bad = W;
        const T value[] = {nan, inf, -inf, -T(1) / T(n)};
        bad(1, k) = value[kind];
        if (kind == 3) bad(1, k + 1) = T(3) / T(n);
        INFO("n = " << n << ", entry " << k << " = " << bad(1, k));
        CHECK_THAT(error_message([&] { sus::sample_mask(bad, so); }),
                   Contains("'W'") && Contains("entry (1, " + std::to_string(k) + ")"));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Outputs sharing memory with inputs or with each other: the kernels write while reading.
// delta: offset of the output's first element from the input's first element (elements).
// Adjacent (touching, not overlapping) buffers must be accepted: no off-by-one in the check.
// ---------------------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("errors: outputs overlapping inputs or each other are rejected", "[errors]", float, double) {
  using T = TestType;
  struct OverlapCase {
    const char* bug;
    Arg out, in;
    // delta = in_mul·size(in) + out_mul·size(out) + add
    int in_mul, out_mul, add;
    bool overlaps;
  };
  const OverlapCase cases[] = {
      {"O is Q's memory (forward reads Q while writing O)", O, Q, 0, 0, 0, true},
      {"O is K's memory", O, K, 0, 0, 0, true},
      {"O is V's memory", O, V, 0, 0, 0, true},
      {"O shares Q's last element", O, Q, 1, 0, -1, true},
      {"O shares Q's first element (O before Q)", O, Q, 0, -1, 1, true},
      {"O right after Q (adjacent, disjoint)", O, Q, 1, 0, 0, false},
      {"O right before Q (adjacent, disjoint)", O, Q, 0, -1, 0, false},
      {"dQ is Q's memory (in-place gradient)", dQ, Q, 0, 0, 0, true},
      {"dK is K's memory", dK, K, 0, 0, 0, true},
      {"dV is V's memory", dV, V, 0, 0, 0, true},
      {"dQ is O's memory", dQ, O, 0, 0, 0, true},
      {"dV is dO's memory", dV, dO, 0, 0, 0, true},
      {"dK is dV's memory (dK == dV)", dK, dV, 0, 0, 0, true},
      {"dQ overlaps the tail of dK", dQ, dK, 1, 0, -3, true},
      {"dQ right after dK (adjacent, disjoint)", dQ, dK, 1, 0, 0, false},
      {"dV shares dO's last element", dV, dO, 1, 0, -1, true},
      {"dV right after dO (adjacent, disjoint)", dV, dO, 1, 0, 0, false},
      {"dV is W's memory (dense backward zeroes dV, then reads W)", dV, W, 0, 0, 0, true},
      {"dQ is W's memory", dQ, W, 0, 0, 0, true},
  };
  for (const auto& e : attention_entries<T>()) {
    for (const auto& c : cases) {
      if (!(e.outs & bit(c.out)) || !(e.args & bit(c.in))) continue;
      Operands<T> o;
      const index_t delta = c.in_mul * o.size(c.in) + c.out_mul * o.size(c.out) + c.add;
      o.alias(c.out, c.in, delta);
      INFO(e.fn << " / case: " << c.bug << " / delta = " << delta);
      if (c.overlaps) {
        const std::string msg = error_message([&] { e.call(o); });
        CHECK_THAT(msg, StartsWith(e.fn) && Contains("overlaps") && Contains(std::string("'") + kArgName[c.out] + "'") &&
                            Contains(std::string("'") + kArgName[c.in] + "'"));
      } else {
        CHECK_NOTHROW(e.call(o));
        check_outputs_finite(o, e);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Finite Q, K whose scores overflow: the forward must throw or return finite weights — never a
// silent NaN. A NaN score arises inside the GEMM from (+inf) + (−inf) or inf·0.
// ---------------------------------------------------------------------------------------------
TEST_CASE("errors: finite inputs whose scores overflow never give silent NaN", "[errors]") {
  using T = float;
  const T big = T(1e30);
  struct OverflowCase {
    const char* bug;
    M<T> Q, K;
    std::optional<double> scale;
  };
  auto mat = [](index_t r, index_t c, std::initializer_list<T> v) {
    M<T> m(r, c);
    std::copy(v.begin(), v.end(), m.data());
    return m;
  };
  const OverflowCase cases[] = {
      {"score +inf in the only row entry that matters", mat(1, 1, {big}), mat(2, 1, {big, T(0)}), {}},
      {"score NaN (inf − inf) at key 0", mat(1, 2, {big, big}), mat(2, 2, {big, -big, 0, 0}), {}},
      {"score NaN (inf − inf) at key 1: maxCoeff skips a NaN that is not first", mat(1, 2, {big, big}),
       mat(2, 2, {0, 0, big, -big}), {}},
      {"score NaN (inf − inf) at key 2 of 3", mat(1, 2, {big, big}), mat(3, 2, {0, 0, 1, 1, big, -big}), {}},
  };
  for (const auto& c : cases) {
    const index_t n_k = c.K.rows();
    const M<T> V = M<T>::Ones(n_k, 1);
    sus::AttentionOptions opt;
    opt.scale = c.scale;
    for (int ref = 0; ref < 2; ++ref) {
      M<T> O = M<T>::Zero(1, 1);
      sus::DenseWeights<T> rec;
      const char* fn = ref ? "sus::reference::attention_forward:" : "sus::attention_forward:";
      INFO(fn << " / case: " << c.bug);
      const std::string msg = error_message([&] {
        if (ref) sus::reference::attention_forward<T>(c.Q, c.K, V, O, rec, opt);
        else sus::attention_forward(c.Q, c.K, V, O, rec, opt);
      });
      if (msg == "<no exception>") {
        CAPTURE(O(0, 0));
        CHECK(O.allFinite());
        CHECK(rec.W.allFinite());
      } else {
        CHECK_THAT(msg, StartsWith(fn) && Contains("overflow"));
      }
    }
  }
}

TEST_CASE("errors: Csr with a negative shape is rejected", "[errors]") {
  CHECK_THAT(error_message([] { sus::Csr<float> m(-1, 3); }), StartsWith("sus::Csr:") && Contains("-1x3"));
  CHECK_THAT(error_message([] { sus::Csr<double> m(2, -4); }), StartsWith("sus::Csr:") && Contains("2x-4"));
}
