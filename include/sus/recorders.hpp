// sus — recorders: what the forward keeps of each finished row of W = softmax(s·Q·Kᵀ).
//
// A recorder is any object with
//   void begin(index_t n_q, index_t n_k);                       // once, before any row
//   void record(index_t i, const T* w, index_t len, T lse);     // row i of W: w[0, len) — every
//                                                               // W_ij with j ≥ len is exactly 0;
//                                                               // lse = log Σ_j exp(S_ij) (−∞ if the
//                                                               // row is fully masked)
//   void end();                                                 // once, after the last row
// Rows may be recorded in any order (each exactly once); w is only valid during the call.
#pragma once

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "csr.hpp"
#include "sampler.hpp"
#include "types.hpp"

namespace sus {

/// Records nothing (plain inference).
struct NoRecord {
  void begin(index_t, index_t) {}
  template <class T>
  void record(index_t, const T*, index_t, T) {}
  void end() {}
};

/// Keeps the dense weights W (n_q x n_k): attention maps, or the input of the dense backward.
template <class T>
struct DenseWeights {
  Matrix<T> W;
  void begin(index_t n_q, index_t n_k) { W.resize(n_q, n_k); }
  void record(index_t i, const T* w, index_t len, T) {
    std::copy(w, w + len, W.row(i).data());
    std::fill(W.row(i).data() + len, W.row(i).data() + W.cols(), T(0));
  }
  void end() {}
};

/// Keeps one log-sum-exp per row (n_q entries): enough to recompute any W_ij later.
template <class T>
struct LogSumExp {
  Vector<T> lse;
  void begin(index_t n_q, index_t) { lse.resize(n_q); }
  void record(index_t i, const T*, index_t, T value) { lse[i] = value; }
  void end() {}
};

/// Samples each row into the SUS mask as soon as the forward finishes it, so no n_q x n_k
/// buffer is ever kept. The mask equals sample_mask(W, options) bit for bit.
template <class T>
class SusMask {
 public:
  explicit SusMask(const SamplerOptions& options) : sampler_(options) {}

  /// The sampled mask; valid after the forward returned.
  Csr<T> mask;

  void begin(index_t n_q, index_t n_k) {
    staged_cols_.clear();
    staged_vals_.clear();
    // About c entries per row (at most c for the systematic draw): reserving them up front
    // saves the reallocations (and their copies) of growing by doubling.
    const auto expected = static_cast<std::size_t>(n_q) * static_cast<std::size_t>(
                                                              std::min<index_t>(sampler_.options().c, n_k));
    staged_cols_.reserve(expected);
    staged_vals_.reserve(expected);
    start_.assign(static_cast<std::size_t>(n_q), -1);
    count_.assign(static_cast<std::size_t>(n_q), 0);
    in_order_ = true;
    next_row_ = 0;
    mask = Csr<T>(n_q, n_k);
  }
  void record(index_t i, const T* w, index_t len, T) {
    in_order_ = in_order_ && i == next_row_;
    next_row_ = i + 1;
    start_[i] = static_cast<index_t>(staged_cols_.size());
    count_[i] = sampler_.sample(i, w, len, staged_cols_, staged_vals_);
  }
  void end() {
    const index_t n_q = mask.rows;
    for (index_t i = 0; i < n_q; ++i) mask.row_offsets[i + 1] = mask.row_offsets[i] + count_[i];
    if (in_order_) {  // rows arrived in order: the staging buffers are the CSR arrays
      mask.col_indices = std::move(staged_cols_);
      mask.values = std::move(staged_vals_);
    } else {
      mask.col_indices.resize(staged_cols_.size());
      mask.values.resize(staged_vals_.size());
      for (index_t i = 0; i < n_q; ++i) {
        std::copy_n(staged_cols_.begin() + start_[i], count_[i], mask.col_indices.begin() + mask.row_offsets[i]);
        std::copy_n(staged_vals_.begin() + start_[i], count_[i], mask.values.begin() + mask.row_offsets[i]);
      }
    }
    staged_cols_ = {};
    staged_vals_ = {};
  }

 private:
  RowSampler<T> sampler_;
  std::vector<index_t> staged_cols_;
  std::vector<T> staged_vals_;
  std::vector<index_t> start_, count_;
  bool in_order_ = true;
  index_t next_row_ = 0;
};

/// Several recorders at once: recorders(lse, mask) hands every row to each of them.
template <class... R>
class Recorders {
 public:
  explicit Recorders(R&... r) : all_(r...) {}
  void begin(index_t n_q, index_t n_k) {
    std::apply([&](auto&... r) { (r.begin(n_q, n_k), ...); }, all_);
  }
  template <class T>
  void record(index_t i, const T* w, index_t len, T lse) {
    std::apply([&](auto&... r) { (r.record(i, w, len, lse), ...); }, all_);
  }
  void end() {
    std::apply([&](auto&... r) { (r.end(), ...); }, all_);
  }

 private:
  std::tuple<R&...> all_;
};

template <class... R>
Recorders<R...> recorders(R&... r) {
  return Recorders<R...>(r...);
}

}  // namespace sus
