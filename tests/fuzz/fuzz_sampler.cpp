// Fuzz target (c): weight rows (NaN, ±inf, negatives, denormals, sums near 1, softmax-like,
// sparse, one-hot) x Budget x Draw x c -> sample_mask, RowSampler, inclusion_probabilities.
//
// Invariants:
//   - every rejection is a sus::Error, and only inputs outside the contract are rejected:
//     c < 1, a bad enum, or a row that is not finite, >= 0 and summing to 1 (within
//     row_sum_tolerance) or 0; rows clearly inside the contract are accepted, rows clearly
//     outside it rejected;
//   - the mask is a valid n_q x n_k Csr; a systematic row keeps <= c entries;
//   - only entries with W_ij > 0 are kept, as finite values W/q >= W (and <= max(W, 1/c)
//     up to rounding, for normal W);
//   - a row's draw is a pure function of (options, row, w): RowSampler repeats it bit for bit;
//   - inclusion_probabilities: q in [0, 1], q = 0 where w = 0, Σq <= min(c, #{w > 0}).
//
// Input: [flags] [c] [seed: 8] [rows] [cols: 2] then per row [generator] [parameters...].
#include "fuzz_common.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace {

using namespace sus_fuzz;

// One row of weights from the input: raw values, an all-zero row, or a normalised row of a
// shape the sampler must handle, then possibly one entry or the row's sum disturbed.
template <class T>
void decode_row(Reader& r, T* w, index_t n) {
  const std::uint8_t g = r.byte();
  std::vector<double> x(static_cast<std::size_t>(n), 0.0);
  bool normalise = true;
  switch (g % 8) {
    case 0:  // raw values (mostly in [−3.5, 3.5): rejected unless they happen to sum to 1)
      for (index_t j = 0; j < n; ++j) w[j] = r.value<T>();
      normalise = false;
      break;
    case 1:  // all zero: a fully masked row
      for (index_t j = 0; j < n; ++j) w[j] = T(0);
      normalise = false;
      break;
    case 2: {  // softmax of logits read from the input, temperature from one byte
      const double temp = 0.25 * (1 + r.small(63));
      for (index_t j = 0; j < n; ++j) x[j] = std::exp((static_cast<int>(r.byte()) - 128) / 16.0 * temp);
      break;
    }
    case 3: {  // k non-zero weights at input-chosen positions, the rest zero
      const index_t k = 1 + r.small(40);
      for (index_t t = 0; t < k && n > 0; ++t) {
        const index_t at = r.small(std::min<index_t>(n - 1, 65535));
        x[at] += 1 + r.small(15);
      }
      break;
    }
    case 4: {  // denormals everywhere but a few normal weights (waterfill's water level)
      const index_t k = 1 + r.small(3);
      for (index_t t = 0; t < k && n > 0; ++t) x[r.small(std::min<index_t>(n - 1, 65535))] += 1;
      break;
    }
    case 5:  // uniform
      for (index_t j = 0; j < n; ++j) x[j] = 1;
      break;
    case 6:  // one-hot
      if (n > 0) x[r.small(std::min<index_t>(n - 1, 65535))] = 1;
      break;
    default: {  // geometric decay from an input-chosen ratio
      const double ratio = 0.5 + r.small(255) / 512.0;
      double v = 1;
      for (index_t j = 0; j < n; ++j, v *= ratio) x[j] = v;
      break;
    }
  }
  if (normalise) {
    double sum = 0;
    for (double v : x) sum += v;
    for (index_t j = 0; j < n; ++j) w[j] = sum > 0 ? static_cast<T>(x[j] / sum) : T(0);
    if (g % 8 == 4)
      for (index_t j = 0; j < n; ++j)
        if (w[j] == T(0)) w[j] = std::numeric_limits<T>::denorm_min() * static_cast<T>(1 + r.small(3));
  }
  // Disturbance: one entry set to a decoded value (specials included), or the row scaled by
  // 1 + δ around the row-sum tolerance.
  const std::uint8_t p = r.byte();
  if (n > 0 && p % 4 == 1) {
    const index_t at = r.small(std::min<index_t>(n - 1, 65535));
    w[at] = r.value<T>();
  }
  if (p % 4 == 2) {
    const double tol = sus::row_sum_tolerance<T>();
    const double deltas[] = {tol / 2, -tol / 2, tol * 2, -tol * 2, 1e-7, -1e-7, tol * 0.999, tol * 1.001};
    const double f = 1 + deltas[r.byte() % 8];
    for (index_t j = 0; j < n; ++j) w[j] = static_cast<T>(w[j] * f);
  }
}

// Where a row stands against sample_mask's contract, with a margin around the row-sum
// tolerance (the library sums in double, in its own order).
enum class RowClass { valid, invalid, borderline };

template <class T>
RowClass classify(const T* w, index_t n) {
  long double sum = 0;
  for (index_t j = 0; j < n; ++j) {
    if (!(w[j] >= T(0)) || !std::isfinite(static_cast<double>(w[j]))) return RowClass::invalid;
    sum += w[j];
  }
  if (sum == 0) return RowClass::valid;
  const long double off = std::fabs(sum - 1), tol = sus::row_sum_tolerance<T>();
  if (off <= tol * (1 - 1e-3L)) return RowClass::valid;
  if (off > tol * (1 + 1e-3L)) return RowClass::invalid;
  return RowClass::borderline;
}

template <class T>
void run(Reader& r, std::uint8_t flags) {
  sus::SamplerOptions opt;
  opt.budget = flags & 2 ? sus::Budget::waterfill : sus::Budget::paper;
  opt.draw = flags & 4 ? sus::Draw::systematic : sus::Draw::independent;
  const bool bad_enum = (flags >> 3) == 31;
  if (bad_enum) {  // out-of-range enumerators (valid values of the underlying int)
    if (flags & 2) opt.budget = static_cast<sus::Budget>(2 + r.small(100));
    else opt.draw = static_cast<sus::Draw>(2 + r.small(100));
  }
  const std::uint8_t cb = r.byte();
  opt.c = cb < 0xF0 ? 1 + cb % 64 : static_cast<int>(r.wide(0));
  opt.seed = r.bits(8);
  const index_t n_q = 1 + r.small(7), n_k = r.small(700);
  sus::Matrix<T> W(n_q, n_k);
  for (index_t i = 0; i < n_q; ++i) decode_row<T>(r, W.row(i).data(), n_k);

  const bool options_ok = opt.c >= 1 && !bad_enum;
  bool any_invalid = false, all_valid = true;
  for (index_t i = 0; i < n_q; ++i) {
    const RowClass rc = classify<T>(W.row(i).data(), n_k);
    any_invalid |= rc == RowClass::invalid;
    all_valid &= rc == RowClass::valid;
  }

  sus::Csr<T> mask;
  try {
    mask = sus::sample_mask(W, opt);
  } catch (const sus::Error& e) {
    FUZZ_CHECK(!(options_ok && all_valid), "sample_mask rejected options and weights inside its contract: ", e.what());
    return;
  }
  FUZZ_CHECK(options_ok, "sample_mask accepted c = ", opt.c, ", budget ", static_cast<int>(opt.budget), ", draw ",
             static_cast<int>(opt.draw));
  FUZZ_CHECK(!any_invalid, "sample_mask accepted a weight row outside its contract (non-finite, negative, or not "
                           "summing to 1 or 0)");

  FUZZ_CHECK(mask.rows == n_q && mask.cols == n_k, "mask shape ", mask.rows, "x", mask.cols, ", expected ", n_q, "x",
             n_k);
  try {
    mask.validate(opt.draw == sus::Draw::systematic ? opt.c : -1);
  } catch (const sus::Error& e) {
    FUZZ_CHECK(false, "sample_mask returned an invalid mask (", sus::to_string(opt.budget), "/",
               sus::to_string(opt.draw), ", c = ", opt.c, "): ", e.what());
  }
  const double inv_c = 1.0 / opt.c;
  for (index_t i = 0; i < n_q; ++i)
    for (index_t p = mask.row_offsets[i]; p < mask.row_offsets[i + 1]; ++p) {
      const index_t j = mask.col_indices[p];
      const T w = W(i, j), v = mask.values[p];
      FUZZ_CHECK(w > T(0), "kept entry (", i, ", ", j, ") has weight ", w, " (", sus::to_string(opt.budget), "/",
                 sus::to_string(opt.draw), ", c = ", opt.c, ", row keeps ", mask.row_nnz(i), ")");
      FUZZ_CHECK(std::isfinite(static_cast<double>(v)) && v >= w, "kept value W/q = ", v, " at (", i, ", ", j,
                 ") for W = ", w);
      if (w >= std::numeric_limits<T>::min())
        FUZZ_CHECK(v <= std::max<double>(w, inv_c) * 1.01, "kept value W/q = ", v, " at (", i, ", ", j,
                   ") exceeds max(W, 1/c) = ", std::max<double>(w, inv_c), " (", sus::to_string(opt.budget), ")");
    }

  // The draw of a row depends only on (options, row, w).
  const index_t i = r.small(n_q - 1);
  sus::RowSampler<T> again(opt);
  std::vector<index_t> cols;
  std::vector<T> vals;
  again.sample(i, W.row(i).data(), n_k, cols, vals);
  const index_t b = mask.row_offsets[i];
  FUZZ_CHECK(static_cast<index_t>(cols.size()) == mask.row_nnz(i), "RowSampler kept ", cols.size(), " entries of row ",
             i, ", sample_mask ", mask.row_nnz(i));
  for (std::size_t k = 0; k < cols.size(); ++k)
    FUZZ_CHECK(cols[k] == mask.col_indices[b + k] && std::memcmp(&vals[k], &mask.values[b + k], sizeof(T)) == 0,
               "RowSampler and sample_mask differ in row ", i, " at kept entry ", k);

  // Inclusion probabilities of that row.
  std::vector<T> q(static_cast<std::size_t>(n_k));
  const double total = sus::inclusion_probabilities(W.row(i).data(), n_k, opt.c, opt.budget, q.data());
  index_t support = 0;
  long double sum_q = 0;
  for (index_t j = 0; j < n_k; ++j) {
    const T w = W(i, j);
    support += w > T(0);
    FUZZ_CHECK(q[j] >= T(0) && q[j] <= T(1), "q[", j, "] = ", q[j], " for w = ", w, " (", sus::to_string(opt.budget),
               ", c = ", opt.c, ")");
    FUZZ_CHECK(w > T(0) || q[j] == T(0), "q[", j, "] = ", q[j], " for w = ", w, " (", sus::to_string(opt.budget),
               ", c = ", opt.c, ")");
    sum_q += q[j];
  }
  const long double cap = std::min<long double>(opt.c, support);
  FUZZ_CHECK(sum_q <= cap * (1 + 1e-5L), "Σq = ", static_cast<double>(sum_q), " exceeds min(c, support) = ",
             static_cast<double>(cap), " (", sus::to_string(opt.budget), ")");
  FUZZ_CHECK(std::fabs(total - static_cast<double>(sum_q)) <= 1e-9 * (1 + total), "inclusion_probabilities returned ",
             total, " but its q sum to ", static_cast<double>(sum_q));
}

}  // namespace

SUS_FUZZ_ENTRY_POINT(run)
