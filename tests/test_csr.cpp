// Tests of the CSR mask type (include/sus/csr.hpp) and the sparse primitives of the SUS
// backward (include/sus/sparse.hpp).
//
// Test cases (each names its target):
//   csr: validate accepts valid matrices ......... Csr::validate on valid input incl. empty rows, 0 x n, n x 0
//   csr: validate names each broken invariant ..... Csr::validate throws sus::Error with a message naming it
//   csr: transpose ................................ Csr::transpose vs to_dense().transpose(), involution, sorted
//   csr: zero-copy Eigen view ..................... Csr::view == to_dense, pointers are the Csr's own arrays
//   sparse: sddmm, spmm, spmm_transposed .......... vs dense Eigen products in double; overwrite/accumulate;
//                                                   empty rows/columns; strided output blocks; float/double
//
// Everything here is deterministic (fixed seeds): no false failures.
#include <catch2/catch.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using sus::Csr;
using sus::index_t;
template <class T>
using Mat = sus::Matrix<T>;

// 4 x 6 matrix with an empty row:
//   row 0: (0,1) = 0.5, (0,4) = 2      row 1: empty
//   row 2: (2,0) = -1, (2,2) = 3, (2,5) = 0.25      row 3: (3,3) = 7
template <class T>
Csr<T> small_csr() {
  Csr<T> m(4, 6);
  m.row_offsets = {0, 2, 2, 5, 6};
  m.col_indices = {1, 4, 0, 2, 5, 3};
  m.values = {T(0.5), T(2), T(-1), T(3), T(0.25), T(7)};
  return m;
}

// Random rows x cols pattern with the given density; rows in `empty_rows` and columns in
// `empty_cols` hold no entry. Values uniform in [-1, 1].
template <class T>
Csr<T> random_csr(index_t rows, index_t cols, double density, std::uint64_t seed, const std::vector<index_t>& empty_rows = {},
                  const std::vector<index_t>& empty_cols = {}) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> u(0, 1);
  Csr<T> m(rows, cols);
  auto in = [](const std::vector<index_t>& v, index_t x) { return std::find(v.begin(), v.end(), x) != v.end(); };
  for (index_t i = 0; i < rows; ++i) {
    for (index_t j = 0; j < cols; ++j) {
      const bool take = u(gen) < density;
      const double value = 2 * u(gen) - 1;
      if (take && !in(empty_rows, i) && !in(empty_cols, j)) {
        m.col_indices.push_back(j);
        m.values.push_back(static_cast<T>(value));
      }
    }
    m.row_offsets[static_cast<std::size_t>(i + 1)] = m.nnz();
  }
  return m;
}

template <class T>
bool same_csr(const Csr<T>& a, const Csr<T>& b) {
  return a.rows == b.rows && a.cols == b.cols && a.row_offsets == b.row_offsets && a.col_indices == b.col_indices &&
         a.values == b.values;
}

// The random patterns of the transpose and kernel tests: (name, rows, cols, density, seed,
// empty rows, empty cols).
struct PatternCase {
  const char* name;
  index_t rows, cols;
  double density;
  std::uint64_t seed;
  std::vector<index_t> empty_rows, empty_cols;
};

std::vector<PatternCase> pattern_cases() {
  return {
      {"1 x 1 full", 1, 1, 1.0, 1, {}, {}},
      {"0 x 5", 0, 5, 0.5, 2, {}, {}},
      {"5 x 0", 5, 0, 0.5, 3, {}, {}},
      {"all empty 6 x 4", 6, 4, 0.0, 4, {}, {}},
      {"7 x 13, empty rows and cols", 7, 13, 0.4, 5, {0, 3, 6}, {0, 5, 12}},
      {"40 x 30 sparse, empty rows and cols", 40, 30, 0.1, 6, {1, 2, 39}, {7, 29}},
      {"25 x 60 dense-ish", 25, 60, 0.7, 7, {}, {}},
      {"64 x 3 tall", 64, 3, 0.5, 8, {10}, {1}},
  };
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// validate(): valid matrices pass.
// ---------------------------------------------------------------------------------------------
TEST_CASE("csr: validate accepts valid matrices", "[csr]") {
  // target: a general matrix with an empty row
  CHECK_NOTHROW(small_csr<double>().validate());
  CHECK_NOTHROW(small_csr<float>().validate());
  // target: max_per_row exactly met (row 2 holds 3)
  CHECK_NOTHROW(small_csr<double>().validate(3));
  // target: empty shapes and all-empty rows (max_per_row = 0 allowed)
  CHECK_NOTHROW(Csr<double>().validate(0));          // 0 x 0
  CHECK_NOTHROW(Csr<double>(0, 5).validate(0));      // 0 x n
  CHECK_NOTHROW(Csr<double>(5, 0).validate(0));      // n x 0
  CHECK_NOTHROW(Csr<float>(3, 4).validate(0));       // all rows empty
  // target: the extreme columns 0 and cols − 1, and the largest finite values
  Csr<double> m(2, 3);
  m.row_offsets = {0, 2, 3};
  m.col_indices = {0, 2, 2};
  m.values = {std::numeric_limits<double>::max(), -std::numeric_limits<double>::max(), 0.0};
  CHECK_NOTHROW(m.validate());
  // target: random patterns from the kernel tests
  for (const auto& pc : pattern_cases()) {
    INFO(pc.name);
    CHECK_NOTHROW(random_csr<double>(pc.rows, pc.cols, pc.density, pc.seed, pc.empty_rows, pc.empty_cols).validate());
  }
}

// ---------------------------------------------------------------------------------------------
// validate(): each broken invariant throws sus::Error whose message names it.
// ---------------------------------------------------------------------------------------------
TEST_CASE("csr: validate names each broken invariant", "[csr][errors]") {
  using Catch::Contains;
  struct Case {
    const char* target;
    std::function<void(Csr<double>&)> damage;
    index_t max_per_row;
    std::string message;  // a piece the message must contain
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<Case> cases = {
      {"row_offsets too short", [](Csr<double>& m) { m.row_offsets.pop_back(); }, -1,
       "row_offsets has 4 entries, expected rows + 1 = 5"},
      {"row_offsets too long", [](Csr<double>& m) { m.row_offsets.push_back(6); }, -1,
       "row_offsets has 6 entries, expected rows + 1 = 5"},
      {"row_offsets[0] != 0", [](Csr<double>& m) { m.row_offsets[0] = 1; }, -1, "row_offsets[0] = 1"},
      {"decreasing row_offsets", [](Csr<double>& m) { m.row_offsets = {0, 2, 1, 5, 6}; }, -1,
       "row_offsets decreases at row 1"},
      {"last offset < nnz", [](Csr<double>& m) { m.row_offsets[4] = 5; }, -1, "row_offsets[rows] = 5 but there are 6"},
      {"last offset > nnz", [](Csr<double>& m) { m.row_offsets[4] = 7; }, -1, "row_offsets[rows] = 7 but there are 6"},
      {"column == cols", [](Csr<double>& m) { m.col_indices[4] = 6; }, -1, "col_indices[4] = 6 in row 2 is out of range"},
      {"column >> cols", [](Csr<double>& m) { m.col_indices[5] = 1000; }, -1, "out of range [0, 6)"},
      {"negative column", [](Csr<double>& m) { m.col_indices[0] = -1; }, -1, "col_indices[0] = -1 in row 0 is out of range"},
      {"unsorted columns", [](Csr<double>& m) { m.col_indices[2] = 3; }, -1,  // row 2: 3, 2, 5
       "col_indices in row 2 are not strictly increasing"},
      {"duplicate column", [](Csr<double>& m) { m.col_indices[3] = 0; }, -1,  // row 2: 0, 0, 5
       "col_indices in row 2 are not strictly increasing"},
      {"NaN value", [nan](Csr<double>& m) { m.values[3] = nan; }, -1, "values[3] (row 2, col 2) is not finite"},
      {"+inf value", [inf](Csr<double>& m) { m.values[0] = inf; }, -1, "values[0] (row 0, col 1) is not finite"},
      {"-inf value", [inf](Csr<double>& m) { m.values[5] = -inf; }, -1, "values[5] (row 3, col 3) is not finite"},
      {"more values than columns", [](Csr<double>& m) { m.values.push_back(1); }, -1,
       "col_indices has 6 entries but values has 7"},
      {"fewer values than columns", [](Csr<double>& m) { m.values.pop_back(); }, -1,
       "col_indices has 6 entries but values has 5"},
      {"max_per_row exceeded", [](Csr<double>&) {}, 2, "row 2 holds 3 entries, more than the promised 2"},
      {"max_per_row = 0 with entries", [](Csr<double>&) {}, 0, "row 0 holds 2 entries, more than the promised 0"},
      {"negative rows", [](Csr<double>& m) { m.rows = -1; }, -1, "negative shape"},
      {"negative cols", [](Csr<double>& m) { m.cols = -2; }, -1, "negative shape"},
      // An inner offset beyond nnz with every column read before it still valid: validate must
      // report the offsets, not read col_indices past its end. The vectors are shrunk from a
      // larger size so that the out-of-range read (if any) stays inside the allocation (no crash)
      // and sees a stale, non-increasing column 0.
      {"inner offset > nnz",
       [](Csr<double>& m) {
         m.rows = 2, m.cols = 5;
         m.row_offsets = {0, 3, 2};
         m.col_indices = {0, 1, 0};
         m.values = {1, 1, 1};
         m.col_indices.pop_back();
         m.values.pop_back();
       },
       -1, "row_offsets"},
  };
  for (const Case& c : cases) {
    INFO("target: " << c.target);
    Csr<double> m = small_csr<double>();
    REQUIRE_NOTHROW(m.validate(3));
    c.damage(m);
    CHECK_THROWS_AS(m.validate(c.max_per_row), sus::Error);
    CHECK_THROWS_WITH(m.validate(c.max_per_row), Contains(c.message) && Contains("Csr::validate"));
  }
  // target: the constructor rejects a negative shape
  CHECK_THROWS_WITH(Csr<float>(-1, 3), Contains("negative shape"));
  CHECK_THROWS_WITH(Csr<float>(3, -1), Contains("negative shape"));
}

// ---------------------------------------------------------------------------------------------
// transpose(): exact (values are moved, not computed), so compared with ==.
// ---------------------------------------------------------------------------------------------
template <class T>
void check_transpose() {
  for (const auto& pc : pattern_cases()) {
    INFO(pc.name);
    const Csr<T> m = random_csr<T>(pc.rows, pc.cols, pc.density, pc.seed, pc.empty_rows, pc.empty_cols);
    const Csr<T> t = m.transpose();
    CHECK(t.rows == m.cols);
    CHECK(t.cols == m.rows);
    CHECK(t.nnz() == m.nnz());
    // sorted (strictly increasing) columns in every row, and every other invariant
    CHECK_NOTHROW(t.validate());
    const Mat<T> want = m.to_dense().transpose();
    const Mat<T> got = t.to_dense();
    REQUIRE(got.rows() == want.rows());
    REQUIRE(got.cols() == want.cols());
    CHECK(got == want);
    // transpose of the transpose is the original, array for array
    CHECK(same_csr(t.transpose(), m));
  }
}

TEST_CASE("csr: transpose", "[csr]") {
  SECTION("double") { check_transpose<double>(); }
  SECTION("float") { check_transpose<float>(); }
  SECTION("hand-computed") {
    // target: the small matrix by hand: transpose is 6 x 4 with rows
    //   0: (0,2)=-1   1: (1,0)=0.5   2: (2,2)=3   3: (3,3)=7   4: (4,0)=2   5: (5,2)=0.25
    const Csr<double> t = small_csr<double>().transpose();
    CHECK(t.row_offsets == std::vector<index_t>({0, 1, 2, 3, 4, 5, 6}));
    CHECK(t.col_indices == std::vector<index_t>({2, 0, 2, 3, 0, 2}));
    CHECK(t.values == std::vector<double>({-1, 0.5, 3, 7, 2, 0.25}));
  }
}

// ---------------------------------------------------------------------------------------------
// view(): a zero-copy Eigen::Map over the Csr's own arrays.
// ---------------------------------------------------------------------------------------------
template <class T>
void check_view() {
  std::vector<PatternCase> cases = pattern_cases();
  for (const auto& pc : cases) {
    INFO(pc.name);
    const Csr<T> m = random_csr<T>(pc.rows, pc.cols, pc.density, pc.seed, pc.empty_rows, pc.empty_cols);
    const auto v = m.view();
    CHECK(v.rows() == m.rows);
    CHECK(v.cols() == m.cols);
    CHECK(v.nonZeros() == m.nnz());
    CHECK(v.isCompressed());
    // zero-copy: the map points at the Csr's vectors
    CHECK(v.outerIndexPtr() == m.row_offsets.data());
    CHECK(v.innerIndexPtr() == m.col_indices.data());
    CHECK(v.valuePtr() == m.values.data());
    // same matrix, through Eigen's own sparse -> dense conversion
    const Mat<T> dense = Mat<T>(v.toDense());
    REQUIRE(dense.rows() == m.rows);
    REQUIRE(dense.cols() == m.cols);
    CHECK(dense == m.to_dense());
    // and usable in an Eigen product (sparse x dense), exact up to summation order
    if (m.rows > 0 && m.cols > 0) {
      const Mat<T> X = sus_test::random_matrix<T>(m.cols, 3, pc.seed + 100);
      const Mat<T> viaview = v * X;
      const Mat<T> viadense = m.to_dense() * X;
      const double err = sus_test::max_rel_error(viaview, viadense);
      INFO("max relative difference: " << err);
      CHECK(err <= (std::is_same<T, float>::value ? 1e-5 : 1e-12));
    }
  }
}

TEST_CASE("csr: zero-copy Eigen view", "[csr]") {
  SECTION("double") { check_view<double>(); }
  SECTION("float") { check_view<float>(); }
}

// ---------------------------------------------------------------------------------------------
// sus::sparse kernels vs dense products computed in double from the same T inputs.
// Tolerance: norm-wise relative (max |diff| / max |reference|) 1e-5 for float, 1e-12 for double.
// The pattern's own `values` are set to 1e6 so a kernel that reads them instead of its
// `values` argument fails; overwrite-mode outputs start as NaN so a kernel that scales the old
// content by 0 instead of overwriting it fails; each output is a column block of a larger matrix
// whose other columns must stay untouched (outer stride honoured).
// ---------------------------------------------------------------------------------------------
template <class T>
void check_sparse_kernels() {
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (const auto& pc : pattern_cases())
    for (index_t k : {1, 5, 16}) {
      INFO(pc.name << ", k = " << k);
      const Csr<T> m = random_csr<T>(pc.rows, pc.cols, pc.density, pc.seed, pc.empty_rows, pc.empty_cols);
      Csr<T> pattern = m;
      std::fill(pattern.values.begin(), pattern.values.end(), T(1e6));
      const Mat<double> Md = m.to_dense().template cast<double>();
      const T alpha = T(-0.75);

      // --- SDDMM: out[p] = A_i · B_j ---
      {
        const Mat<T> A = sus_test::random_matrix<T>(m.rows, k, pc.seed + 1);
        const Mat<T> B = sus_test::random_matrix<T>(m.cols, k, pc.seed + 2);
        std::vector<T> out(static_cast<std::size_t>(m.nnz()), nan);
        sus::sparse::sddmm(pattern, A, B, out.data());
        const Mat<double> full = A.template cast<double>() * B.template cast<double>().transpose();
        double err = 0, scale = 1e-30;
        for (index_t i = 0; i < m.rows; ++i)
          for (index_t p = m.row_offsets[i]; p < m.row_offsets[i + 1]; ++p) {
            const double want = full(i, m.col_indices[p]);
            const double d = std::abs(static_cast<double>(out[p]) - want);
            if (!(d <= err)) err = d;  // a NaN (entry not written) propagates and fails below
            scale = std::max(scale, std::abs(want));
          }
        INFO("sddmm: max |out − A Bᵀ| / max |A Bᵀ| = " << err / scale);
        CHECK(err / scale <= tol);
      }

      // --- SpMM: C = α M B, and C += α M B ---
      {
        const Mat<T> B = sus_test::random_matrix<T>(m.cols, k, pc.seed + 3);
        const Mat<double> want = double(alpha) * Md * B.template cast<double>();
        Mat<T> big = Mat<T>::Constant(m.rows, k + 4, T(42));  // output = columns [2, 2 + k)
        big.middleCols(2, k).setConstant(nan);
        sus::sparse::spmm(pattern, m.values.data(), B, big.middleCols(2, k), alpha, false);
        const Mat<T> got = big.middleCols(2, k);
        for (index_t i : pc.empty_rows) {  // an empty row of M: an exactly zero row of C
          CAPTURE(i);
          CHECK((got.row(i).array() == T(0)).all());
        }
        if (m.rows > 0) {
          const double err = sus_test::max_rel_error(got, want);
          INFO("spmm overwrite: relative error " << err << ", all finite " << got.allFinite());
          CHECK(got.allFinite());
          CHECK(err <= tol);
          // accumulate onto a known C0
          const Mat<T> C0 = sus_test::random_matrix<T>(m.rows, k, pc.seed + 4);
          big.middleCols(2, k) = C0;
          sus::sparse::spmm(pattern, m.values.data(), B, big.middleCols(2, k), alpha, true);
          const Mat<double> want_acc = C0.template cast<double>() + want;
          const double err_acc = sus_test::max_rel_error(Mat<T>(big.middleCols(2, k)), want_acc);
          INFO("spmm accumulate: relative error " << err_acc);
          CHECK(err_acc <= tol);
        }
        CHECK((big.leftCols(2).array() == T(42)).all());
        CHECK((big.rightCols(2).array() == T(42)).all());
      }

      // --- transposed SpMM: C = α Mᵀ B, and C += α Mᵀ B ---
      {
        const sus::sparse::TransposedPattern tp(pattern);
        CHECK(tp.rows == m.cols);
        CHECK(tp.cols == m.rows);
        const Mat<T> B = sus_test::random_matrix<T>(m.rows, k, pc.seed + 5);
        const Mat<double> want = double(alpha) * Md.transpose() * B.template cast<double>();
        Mat<T> big = Mat<T>::Constant(m.cols, k + 3, T(42));  // output = columns [1, 1 + k)
        big.middleCols(1, k).setConstant(nan);
        sus::sparse::spmm_transposed(tp, m.values.data(), B, big.middleCols(1, k), alpha, false);
        const Mat<T> got = big.middleCols(1, k);
        for (index_t j : pc.empty_cols) {  // an empty column of M: an exactly zero row of C
          CAPTURE(j);
          CHECK((got.row(j).array() == T(0)).all());
        }
        if (m.cols > 0) {
          const double err = sus_test::max_rel_error(got, want);
          INFO("spmm_transposed overwrite: relative error " << err << ", all finite " << got.allFinite());
          CHECK(got.allFinite());
          CHECK(err <= tol);
          const Mat<T> C0 = sus_test::random_matrix<T>(m.cols, k, pc.seed + 6);
          big.middleCols(1, k) = C0;
          sus::sparse::spmm_transposed(tp, m.values.data(), B, big.middleCols(1, k), alpha, true);
          const Mat<double> want_acc = C0.template cast<double>() + want;
          const double err_acc = sus_test::max_rel_error(Mat<T>(big.middleCols(1, k)), want_acc);
          INFO("spmm_transposed accumulate: relative error " << err_acc);
          CHECK(err_acc <= tol);
        }
        CHECK((big.leftCols(1).array() == T(42)).all());
        CHECK((big.rightCols(2).array() == T(42)).all());
        // deterministic: a second call gives the same bits
        Mat<T> again = Mat<T>::Zero(m.cols, k), again2 = Mat<T>::Zero(m.cols, k);
        sus::sparse::spmm_transposed(tp, m.values.data(), B, again, alpha, false);
        sus::sparse::spmm_transposed(tp, m.values.data(), B, again2, alpha, false);
        CHECK(again == again2);
      }
    }
}

TEST_CASE("sparse: sddmm spmm spmm_transposed against dense products", "[csr][sparse]") {
  SECTION("double") { check_sparse_kernels<double>(); }
  SECTION("float") { check_sparse_kernels<float>(); }
}
