// sus — error type and the two tiers of checks.
//
// Tier 1: argument checks. Always on (they cost O(n·d) or O(nnz) at most, next to
//         O(n·c·d) or O(n²·d) kernels) and throw sus::Error whose message names the
//         function, the argument and the shapes involved.
// Tier 2: internal invariants (SUS_ASSERT). Compiled out under NDEBUG.
#pragma once

#include <cassert>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace sus {

/// Index type of every size and offset in the library (64-bit: n·n and n·c can exceed 2³¹).
using index_t = std::int64_t;

/// Thrown on bad input. The message names the function, the argument and the shapes.
class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& what) : std::invalid_argument(what) {}
};

namespace detail {

// Builds a message from any streamable pieces: concat("Q has ", 3, " rows").
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

// "rows x cols", the way every message prints a shape.
inline std::string shape(index_t rows, index_t cols) {
  return concat(rows, "x", cols);
}

template <class... Parts>
[[noreturn]] void fail(const char* function, const Parts&... parts) {
  throw Error(concat("sus::", function, ": ", parts...));
}

}  // namespace detail
}  // namespace sus

// Internal invariant; compiled out under NDEBUG. Never used for argument checking.
#define SUS_ASSERT(cond) assert(cond)
