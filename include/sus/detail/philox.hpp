// sus — counter-based random numbers (Philox4x32-10, Salmon et al., SC'11).
//
// A counter-based generator is a pure function (key, counter) -> 128 random bits.
// The sampler keys it by the user's seed and uses (row, stream, index) as the counter,
// so every row's random numbers are fixed by (seed, row) alone: a mask does not depend
// on the order rows are processed in or on the number of threads.
#pragma once

#include <array>
#include <cstdint>

namespace sus {
namespace detail {

class Philox4x32 {
 public:
  using Block = std::array<std::uint32_t, 4>;

  explicit Philox4x32(std::uint64_t seed)
      : key0_(static_cast<std::uint32_t>(seed)), key1_(static_cast<std::uint32_t>(seed >> 32)) {}

  // 128 random bits for counter (c0, c1) — both 64-bit.
  Block operator()(std::uint64_t c0, std::uint64_t c1) const {
    Block x = {static_cast<std::uint32_t>(c0), static_cast<std::uint32_t>(c0 >> 32),
               static_cast<std::uint32_t>(c1), static_cast<std::uint32_t>(c1 >> 32)};
    std::uint32_t k0 = key0_, k1 = key1_;
    for (int round = 0; round < 10; ++round) {
      const std::uint64_t p0 = std::uint64_t{0xD2511F53u} * x[0];
      const std::uint64_t p1 = std::uint64_t{0xCD9E8D57u} * x[2];
      const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
      const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
      x = {hi1 ^ x[1] ^ k0, lo1, hi0 ^ x[3] ^ k1, lo0};
      k0 += 0x9E3779B9u;  // Weyl key schedule
      k1 += 0xBB67AE85u;
    }
    return x;
  }

  // Two uniforms in [0, 1) with 53 random bits each, for counter (c0, c1).
  std::array<double, 2> uniform2(std::uint64_t c0, std::uint64_t c1) const {
    const Block b = (*this)(c0, c1);
    const std::uint64_t a = (std::uint64_t{b[0]} << 32 | b[1]) >> 11;
    const std::uint64_t c = (std::uint64_t{b[2]} << 32 | b[3]) >> 11;
    constexpr double kInv53 = 1.0 / 9007199254740992.0;  // 2^-53
    return {static_cast<double>(a) * kInv53, static_cast<double>(c) * kInv53};
  }

 private:
  std::uint32_t key0_, key1_;
};

}  // namespace detail
}  // namespace sus
