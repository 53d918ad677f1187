// Shared pieces of the sus fuzz targets: a byte reader that decodes any input, invariant
// checks that abort with a message, and output buffers with sentinel guard regions.
//
// Input format (the seed generator tests/fuzz/make_corpus.py writes the same): bytes are read
// front to back, little-endian; past the end every read gives 0, so every input decodes. The
// targets read one field per statement (in `a[i] = f()` C++17 evaluates f() first).
#pragma once

#include <sus/sus.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace sus_fuzz {

using sus::index_t;

[[noreturn]] inline void violated(const char* file, int line, const char* cond, const std::string& msg) {
  std::fprintf(stderr, "\n==sus_fuzz== INVARIANT VIOLATED at %s:%d: %s\n==sus_fuzz== %s\n", file, line, cond,
               msg.c_str());
  std::abort();
}

}  // namespace sus_fuzz

// An invariant of the library; on failure prints the message pieces and aborts (a finding).
#define FUZZ_CHECK(cond, ...)                                                                 \
  do {                                                                                        \
    if (!(cond)) ::sus_fuzz::violated(__FILE__, __LINE__, #cond, ::sus::detail::concat(__VA_ARGS__)); \
  } while (0)

namespace sus_fuzz {

class Reader {
 public:
  Reader(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}

  bool exhausted() const { return p_ == end_; }
  std::uint8_t byte() { return p_ < end_ ? *p_++ : 0; }
  bool flag() { return byte() & 1; }
  // `bytes` bytes as an unsigned little-endian integer.
  std::uint64_t bits(int bytes) {
    std::uint64_t v = 0;
    for (int k = 0; k < bytes; ++k) v |= std::uint64_t{byte()} << (8 * k);
    return v;
  }
  // 0..max from one byte (two bytes when max > 255).
  index_t small(index_t max) {
    const std::uint64_t v = max > 255 ? bits(2) : byte();
    return static_cast<index_t>(v % static_cast<std::uint64_t>(max + 1));
  }
  // A size or stride: 0..max_small from one byte below 0xF0; 0xF0.. pick an edge value
  // (negative, near 2^31, 2^32, 2^62, 2^63 − 1), 0xFF reads 8 raw bytes.
  index_t wide(index_t max_small) {
    const std::uint8_t b = byte();
    if (b < 0xF0) return b % (max_small + 1);
    constexpr index_t kMax = std::numeric_limits<index_t>::max();
    const index_t edges[] = {-1, kMax, index_t{1} << 62, index_t{1} << 32, index_t{1} << 31, (index_t{1} << 31) - 1,
                             std::numeric_limits<index_t>::min(), index_t{1} << 61, kMax / 2 + 1, index_t{3} << 61,
                             index_t{1} << 40, index_t{1} << 20, (index_t{1} << 32) + 1, kMax - 1, -2};
    if (b == 0xFF) return static_cast<index_t>(bits(8));
    return edges[b - 0xF0];
  }
  // A value: mostly a multiple of 1/32 in [−3.5, 3.5); 0xE0.. pick a special (NaN, ±inf,
  // max, lowest, denormals, −0, huge, tiny), 0xFF reads sizeof(T) raw bytes.
  // A matrix element: value<T>() while the input lasts, then moderate values from a fixed
  // pseudo-random sequence (so that short inputs still give varied, finite matrices).
  template <class T>
  T element() {
    if (p_ < end_) return value<T>();
    lcg_ = lcg_ * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<T>((static_cast<int>((lcg_ >> 40) % 225) - 112) / 32.0);
  }
  template <class T>
  T value() {
    const std::uint8_t b = byte();
    if (b < 0xE0) return static_cast<T>((static_cast<int>(b) - 112) / 32.0);
    using L = std::numeric_limits<T>;
    switch (b - 0xE0) {
      case 0: return L::quiet_NaN();
      case 1: return L::infinity();
      case 2: return -L::infinity();
      case 3: return L::max();
      case 4: return L::lowest();
      case 5: return L::denorm_min();
      case 6: return L::min();
      case 7: return -T(0);
      case 8: return T(1e30);
      case 9: return T(-1e30);
      case 10: return T(1e-30);
      case 11: return L::epsilon();
      case 12: return T(1);
      case 13: return T(1e18);
      case 14: return -L::denorm_min();
      default: break;
    }
    T v;
    const std::uint64_t raw = bits(sizeof(T));
    std::memcpy(&v, &raw, sizeof(T));
    return v;
  }

 private:
  const std::uint8_t* p_;
  const std::uint8_t* end_;
  std::uint64_t lcg_ = 0;
};

template <class T>
bool all_finite(const T* p, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k)
    if (!std::isfinite(static_cast<double>(p[k]))) return false;
  return true;
}

// Whether two buffers hold the same bits.
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// The first position where two buffers hold different values (as same_values below), or the
// shorter one's size.
template <class T>
std::size_t first_difference(const std::vector<T>& a, const std::vector<T>& b) {
  const std::size_t n = std::min(a.size(), b.size());
  for (std::size_t k = 0; k < n; ++k)
    if (!(a[k] == b[k]) && std::memcmp(&a[k], &b[k], sizeof(T)) != 0) return k;
  return n;
}
// A message naming where two buffers differ: "dK[12]: 0.5 vs 0.25".
template <class T>
std::string difference(const char* name, const std::vector<T>& a, const std::vector<T>& b) {
  const std::size_t k = first_difference(a, b);
  if (k == a.size() && k == b.size()) return "";
  if (k == a.size() || k == b.size()) return sus::detail::concat(name, ": sizes ", a.size(), " vs ", b.size(), "; ");
  return sus::detail::concat(name, "[", k, "]: ", a[k], " vs ", b[k], "; ");
}

// Whether two buffers hold the same values: the same bits, or −0 and +0 (a row with no kept
// entry is s·0, −0 for a negative scale, in one kernel and a plain zero in another).
template <class T>
bool same_values(const std::vector<T>& a, const std::vector<T>& b) {
  return first_difference(a, b) == a.size() && a.size() == b.size();
}

// The value that guard regions hold: a NaN with a payload no arithmetic produces, compared
// bit for bit.
template <class T>
T sentinel() {
  T v;
  if constexpr (sizeof(T) == 4) {
    const std::uint32_t b = 0x7FA5A5A5u;
    std::memcpy(&v, &b, 4);
  } else {
    const std::uint64_t b = 0x7FF5A5A5A5A5A5A5ull;
    std::memcpy(&v, &b, 8);
  }
  return v;
}
template <class T>
bool is_sentinel(const T& v) {
  const T s = sentinel<T>();
  return std::memcmp(&v, &s, sizeof(T)) == 0;
}

// A rows x cols row-major output whose rows are `ld` >= cols apart, in an allocation of exactly
// (rows − 1)·ld + cols elements (ASan catches writes past either end). The pad columns hold
// the sentinel; check() asserts that they still do and that the matrix is finite.
template <class T>
struct GuardedMatrix {
  using Map = Eigen::Map<sus::Matrix<T>, 0, Eigen::OuterStride<>>;
  index_t rows, cols, ld;
  std::vector<T> buf;

  GuardedMatrix(index_t rows_, index_t cols_, index_t pad) : rows(rows_), cols(cols_), ld(cols_ + pad) {
    buf.assign(rows > 0 && cols > 0 ? static_cast<std::size_t>((rows - 1) * ld + cols) : 0, sentinel<T>());
  }
  T* data() { return buf.empty() ? nullptr : buf.data(); }
  Map map() { return Map(data(), rows, cols, Eigen::OuterStride<>(ld)); }
  bool inside(std::size_t k) const { return static_cast<index_t>(k) % ld < cols; }
  void fill(T v) {
    for (std::size_t k = 0; k < buf.size(); ++k)
      if (inside(k)) buf[k] = v;
  }
  // Asserts that the pad columns still hold the sentinel and that the matrix is finite.
  void check(const char* name) const {
    for (std::size_t k = 0; k < buf.size(); ++k) {
      const index_t i = static_cast<index_t>(k) / ld, j = static_cast<index_t>(k) % ld;
      if (inside(k))
        FUZZ_CHECK(std::isfinite(static_cast<double>(buf[k])), "output ", name, "(", i, ", ", j, ") = ", buf[k],
                   " is not finite (", rows, "x", cols, ")");
      else
        FUZZ_CHECK(is_sentinel(buf[k]), "output ", name, ": element ", k, " (row ", i, ", pad column ", j - cols,
                   ") outside the ", rows, "x", cols, " view was written");
    }
  }
};

}  // namespace sus_fuzz

// The libFuzzer entry point of a target: bit 0 of the first byte picks double or float for
// run<T>(Reader&, flags).
#define SUS_FUZZ_ENTRY_POINT(run)                                                  \
  extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) { \
    sus_fuzz::Reader r(data, size);                                                \
    const std::uint8_t flags = r.byte();                                           \
    if (flags & 1) run<double>(r, flags);                                          \
    else run<float>(r, flags);                                                     \
    return 0;                                                                      \
  }
