// The adapter dropout mask, written once for the host driver (dropout.cpp) and the CUDA kernel
// (dropout_cuda.cu). It is a pure function of (seed, row, column), drawn the same by every
// backend: the host replica in PyTorch is adapterops/backends/reference/dropout.py (the tests'
// oracle), the Triton one `dropout_keep` in adapterops/kernels/common.py.
//
//     threshold = round(p 2^16) (half to even, as Python's round),  scale = 1 / (1 - p) (0 at p = 1)
//     kept(i, j) = bits16(seed, i, j) >= threshold,  x_d = x * kept * scale
//
// bits16(seed, i, j): Philox-4x32-10 (Salmon et al., SC'11; the round and key constants of
// Triton's `tl.philox`) with key (k0, k1) = (seed mod 2^32, seed >> 32 mod 2^32) at counter
// (j / 8, i mod 2^32, i >> 32, 0) gives four 32-bit words w0..w3; lane l = j % 8 takes the low
// (l < 4) or high (l >= 4) 16 bits of word w[l % 4]. One Philox call thus serves 8 consecutive
// columns of a row, and any tiling draws the same mask.
#pragma once

#include <cstdint>

#include "common.h"

namespace adapterops {

// The high 32 bits of the 64-bit product a * b.
ADAPTEROPS_HOST_DEVICE inline uint32_t mul_hi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox-4x32-10: the four words of counter `c` under key `seed` (k0 its low, k1 its high 32
// bits), written over c.
ADAPTEROPS_HOST_DEVICE inline void philox4x32_10(uint64_t seed, uint32_t c[4]) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0 = c[0], c2 = c[2];
    c[0] = mul_hi32(kRoundB, c2) ^ c[1] ^ k0;
    c[2] = mul_hi32(kRoundA, c0) ^ c[3] ^ k1;
    c[1] = kRoundB * c2;
    c[3] = kRoundA * c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// The 16 bits of columns [8 group, 8 group + 8) of row `row`, lane l at bits[l].
ADAPTEROPS_HOST_DEVICE inline void dropout_bits16(uint64_t seed, int64_t row, int64_t group,
                                                  uint32_t bits[8]) {
  const uint64_t i = static_cast<uint64_t>(row);
  uint32_t words[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(i),
                       static_cast<uint32_t>(i >> 32), 0u};
  philox4x32_10(seed, words);
  for (int lane = 0; lane < 4; ++lane) {
    bits[lane] = words[lane] & 0xFFFFu;
    bits[lane + 4] = words[lane] >> 16;
  }
}

// out[j] = in[j] * kept * scale for the columns [8 group, min(8 group + 8, cols)) of row `row`
// (in and out point at the row's first element): the product in fp32, rounded to scalar_t once.
// A dropped element is in * 0 * scale, as the reference's x * mask * scale (a NaN or inf stays
// NaN, -x gives -0).
template <typename scalar_t>
ADAPTEROPS_HOST_DEVICE inline void dropout_apply_group(const scalar_t* in, scalar_t* out,
                                                       int64_t row, int64_t group, int64_t cols,
                                                       uint64_t seed, uint32_t threshold,
                                                       float scale) {
  uint32_t bits[8];
  dropout_bits16(seed, row, group, bits);
  const int64_t first = group * 8;
  const int64_t count = cols - first < 8 ? cols - first : 8;
  for (int64_t lane = 0; lane < count; ++lane) {
    const float keep = bits[lane] >= threshold ? 1.0f : 0.0f;
    out[first + lane] = static_cast<scalar_t>(static_cast<float>(in[first + lane]) * keep * scale);
  }
}

}  // namespace adapterops
