// sus — counter-based random numbers (Philox4x32-10, Salmon et al., SC'11).
//
// A counter-based generator is a pure function (key, counter) -> 128 random bits.
// The sampler keys it by the user's seed and uses (row, stream, index) as the counter,
// so every row's random numbers are fixed by (seed, row) alone: a mask does not depend
// on the order rows are processed in or on the number of threads.
#pragma once

#include <array>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512DQ__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SUS_PHILOX_AVX512 1
#endif

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

  // uniform2(c0, c1 + k) for k = 0..7, bit for bit: out[k] its first, out[8 + k] its second.
  // With AVX-512 the 8 counters go through the rounds together, one per 64-bit lane
  // (vpmuludq multiplies the low 32 bits of each lane; the high halves carry garbage until
  // the final mask).
  void uniform16(std::uint64_t c0, std::uint64_t c1, double* out) const {
#if defined(SUS_PHILOX_AVX512)
    const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFF);
    const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(c1)),
                                         _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
    __m512i x0 = _mm512_set1_epi64(static_cast<long long>(c0 & 0xFFFFFFFFu));
    __m512i x1 = _mm512_set1_epi64(static_cast<long long>(c0 >> 32));
    __m512i x2 = _mm512_and_si512(ctr, low32);
    __m512i x3 = _mm512_srli_epi64(ctr, 32);
    const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
    std::uint32_t k0 = key0_, k1 = key1_;
    for (int round = 0; round < 10; ++round) {
      const __m512i p0 = _mm512_mul_epu32(x0, m0), p1 = _mm512_mul_epu32(x2, m1);
      // x = {hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0}; 0x96: three-way xor
      x0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), x1, _mm512_set1_epi64(k0), 0x96);
      x2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), x3, _mm512_set1_epi64(k1), 0x96);
      x1 = p1;
      x3 = p0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m512i a = _mm512_srli_epi64(
        _mm512_or_si512(_mm512_slli_epi64(x0, 32), _mm512_and_si512(x1, low32)), 11);
    const __m512i c = _mm512_srli_epi64(
        _mm512_or_si512(_mm512_slli_epi64(x2, 32), _mm512_and_si512(x3, low32)), 11);
    const __m512d inv53 = _mm512_set1_pd(1.0 / 9007199254740992.0);
    _mm512_storeu_pd(out, _mm512_mul_pd(_mm512_cvtepi64_pd(a), inv53));
    _mm512_storeu_pd(out + 8, _mm512_mul_pd(_mm512_cvtepi64_pd(c), inv53));
#else
    for (int k = 0; k < 8; ++k) {
      const std::array<double, 2> u = uniform2(c0, c1 + static_cast<std::uint64_t>(k));
      out[k] = u[0];
      out[8 + k] = u[1];
    }
#endif
  }

 private:
  std::uint32_t key0_, key1_;
};

}  // namespace detail
}  // namespace sus
