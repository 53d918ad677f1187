// sus — the CSR mask: the sampled, rescaled attention weights W̃ that the sparse backward consumes.
#pragma once

#include <Eigen/SparseCore>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "error.hpp"
#include "types.hpp"

namespace sus {

/// Compressed sparse rows with 64-bit offsets and indices.
///
/// For a SUS mask, row i holds the kept keys j of query i (sorted ascending) and
/// values[p] = W̃_ij = W_ij / q_ij, the unbiased rescaled weight.
///
///   row_offsets: rows + 1 entries, row_offsets[0] = 0, non-decreasing, row_offsets[rows] = nnz
///   col_indices: nnz entries, strictly increasing within a row, each in [0, cols)
///   values:      nnz entries, finite
template <class T>
struct Csr {
  using Scalar = T;
  /// Zero-copy Eigen view type (Eigen's CSR with 64-bit storage index).
  using EigenView = Eigen::Map<const Eigen::SparseMatrix<T, Eigen::RowMajor, index_t>>;

  index_t rows = 0;
  index_t cols = 0;
  std::vector<index_t> row_offsets = std::vector<index_t>(1, 0);
  std::vector<index_t> col_indices;
  std::vector<T> values;

  Csr() = default;
  /// An empty (all-zero) rows x cols matrix.
  Csr(index_t rows_, index_t cols_) : rows(rows_), cols(cols_), row_offsets(offsets_for(rows_, cols_), 0) {}

  index_t nnz() const { return static_cast<index_t>(col_indices.size()); }
  index_t row_nnz(index_t i) const { return row_offsets[i + 1] - row_offsets[i]; }
  index_t max_row_nnz() const {
    index_t m = 0;
    for (index_t i = 0; i < rows; ++i) m = std::max(m, row_nnz(i));
    return m;
  }

  /// Checks every invariant above (and, when max_per_row >= 0, that no row holds more
  /// than max_per_row entries). Throws sus::Error naming the broken invariant. O(rows + nnz).
  /// Returns the largest |value| (0 if there is none), found in the same pass.
  double validate(index_t max_per_row = -1) const {
    const char* fn = "Csr::validate";
    const std::string shp = detail::shape(rows, cols);
    if (rows < 0 || cols < 0) detail::fail(fn, "negative shape ", shp);
    if (row_offsets.empty() || static_cast<index_t>(row_offsets.size() - 1) != rows)
      detail::fail(fn, "row_offsets has ", row_offsets.size(), " entries, expected rows + 1 = ",
                   static_cast<std::uint64_t>(rows) + 1, " for a ", shp, " matrix");
    if (row_offsets[0] != 0) detail::fail(fn, "row_offsets[0] = ", row_offsets[0], ", expected 0 (", shp, ")");
    if (col_indices.size() != values.size())
      detail::fail(fn, "col_indices has ", col_indices.size(), " entries but values has ", values.size(), " (", shp, ")");
    if (row_offsets[rows] != nnz())
      detail::fail(fn, "row_offsets[rows] = ", row_offsets[rows], " but there are ", nnz(), " entries (", shp, ")");
    // Offsets first: entries are read only once every row's range is known to be in bounds.
    for (index_t i = 0; i < rows; ++i) {
      const index_t b = row_offsets[i], e = row_offsets[i + 1];
      if (e < b) detail::fail(fn, "row_offsets decreases at row ", i, " (", b, " > ", e, ") in a ", shp, " matrix");
      if (e > nnz())
        detail::fail(fn, "row_offsets[", i + 1, "] = ", e, " exceeds the ", nnz(), " entries (", shp, ")");
      if (max_per_row >= 0 && e - b > max_per_row)
        detail::fail(fn, "row ", i, " holds ", e - b, " entries, more than the promised ", max_per_row, " (", shp, ")");
    }
    // Entries: branch-free passes say whether any is bad (every sparse backward validates its
    // mask, so they are on the hot path); only then the scan below finds and names it. A row
    // is good iff its columns strictly increase, its first is >= 0 and its last < cols. One
    // vector pass over the whole array counts the steps that do not increase, p - 1 -> p;
    // the steps from one row's last entry to the next non-empty row's first are then taken
    // out again, one per non-empty row after the first entry. detail::all_finite checks the
    // values.
    const index_t* c = col_indices.data();
    index_t not_increasing = 0;
    for (index_t p = 1; p < nnz(); ++p) not_increasing += c[p] <= c[p - 1];
    bool bad = false;
    for (index_t i = 0; i < rows; ++i) {
      const index_t b = row_offsets[i], e = row_offsets[i + 1];
      if (b == e) continue;
      bad |= (c[b] < 0) | (c[e - 1] >= cols);
      if (b > 0) not_increasing -= c[b] <= c[b - 1];
    }
    const double largest = detail::max_abs(Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>(values.data(), nnz()));
    if (!bad && not_increasing == 0 && std::isfinite(largest)) return largest;
    for (index_t i = 0; i < rows; ++i) {
      const index_t b = row_offsets[i], e = row_offsets[i + 1];
      for (index_t p = b; p < e; ++p) {
        const index_t j = col_indices[p];
        if (j < 0 || j >= cols)
          detail::fail(fn, "col_indices[", p, "] = ", j, " in row ", i, " is out of range [0, ", cols, ") (", shp, ")");
        if (p > b && j <= col_indices[p - 1])
          detail::fail(fn, "col_indices in row ", i, " are not strictly increasing (", col_indices[p - 1], " then ", j,
                       ") (", shp, ")");
        if (!std::isfinite(static_cast<double>(values[p])))
          detail::fail(fn, "values[", p, "] (row ", i, ", col ", j, ") is not finite (", shp, ")");
      }
    }
    return largest;  // not reached: the scan finds what the passes saw
  }

  /// Zero-copy Eigen sparse view (valid while this Csr is alive and unchanged).
  EigenView view() const {
    return EigenView(rows, cols, nnz(), row_offsets.data(), col_indices.data(), values.data());
  }

  /// The transpose (cols x rows), columns sorted within each row. O(rows + cols + nnz).
  Csr transpose() const;

  /// The same matrix with values converted to U.
  template <class U>
  Csr<U> cast() const {
    Csr<U> out;
    out.rows = rows;
    out.cols = cols;
    out.row_offsets = row_offsets;
    out.col_indices = col_indices;
    out.values.assign(values.begin(), values.end());
    return out;
  }

  /// Dense copy (for small matrices and tests).
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> to_dense() const {
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> d =
        Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>::Zero(rows, cols);
    for (index_t i = 0; i < rows; ++i)
      for (index_t p = row_offsets[i]; p < row_offsets[i + 1]; ++p) d(i, col_indices[p]) = values[p];
    return d;
  }

 private:
  // rows + 1 offsets; checks the shape first (rows + 1 must not overflow, nor the allocation).
  static std::size_t offsets_for(index_t rows_, index_t cols_) {
    if (rows_ < 0 || cols_ < 0) detail::fail("Csr", "negative shape ", detail::shape(rows_, cols_));
    if (static_cast<std::uint64_t>(rows_) >= std::vector<index_t>().max_size())
      detail::fail("Csr", "shape ", detail::shape(rows_, cols_), " has more rows than a vector of offsets can hold");
    return static_cast<std::size_t>(rows_) + 1;
  }
};

namespace detail {

// Structure of the transpose of a CSR pattern, plus the permutation that maps each
// transposed entry back to its position in the original:
//   t_offsets: cols + 1 entries; t_rows: nnz entries (original row indices, ascending
//   within each column); perm: nnz entries, original position of transposed entry p.
// Counting sort by column: stable, so rows stay ascending within a column. O(rows + cols + nnz).
struct Transposed {
  std::vector<index_t> t_offsets;
  std::vector<index_t> t_rows;
  std::vector<index_t> perm;
};

inline void transpose_pattern(index_t rows, index_t cols, const index_t* row_offsets, const index_t* col_indices,
                              Transposed& out) {
  const index_t nnz = row_offsets[rows];
  out.t_offsets.assign(static_cast<std::size_t>(cols + 1), 0);
  out.t_rows.resize(static_cast<std::size_t>(nnz));
  out.perm.resize(static_cast<std::size_t>(nnz));
  for (index_t p = 0; p < nnz; ++p) ++out.t_offsets[col_indices[p] + 1];
  for (index_t j = 0; j < cols; ++j) out.t_offsets[j + 1] += out.t_offsets[j];
  std::vector<index_t> next(out.t_offsets.begin(), out.t_offsets.end() - 1);
  for (index_t i = 0; i < rows; ++i) {
    for (index_t p = row_offsets[i]; p < row_offsets[i + 1]; ++p) {
      const index_t q = next[col_indices[p]]++;
      out.t_rows[q] = i;
      out.perm[q] = p;
    }
  }
}

}  // namespace detail

template <class T>
Csr<T> Csr<T>::transpose() const {
  detail::Transposed tp;
  detail::transpose_pattern(rows, cols, row_offsets.data(), col_indices.data(), tp);
  Csr<T> t;
  t.rows = cols;
  t.cols = rows;
  t.row_offsets = std::move(tp.t_offsets);
  t.col_indices = std::move(tp.t_rows);
  t.values.resize(values.size());
  for (std::size_t q = 0; q < tp.perm.size(); ++q) t.values[q] = values[tp.perm[q]];
  return t;
}

}  // namespace sus
