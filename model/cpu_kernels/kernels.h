// Matmuls y[M, N] = x[M, K] @ W[N, K]^T with float32 activations in and out and weights in one of four
// types, laid out [out, in] (one contiguous row of W per output) by model/cpu_matmul.py at load time:
//   F32   float32 [N, K]
//   BF16  bfloat16 [N, K] (as uint16)
//   INT8  int8 [N, K], one float32 scale per output row:            W[n, k] = q * scale[n]
//   INT4  uint8 [N, K/2], two inputs per byte (input 2j in the low nibble of byte j, 2j + 1 in the high),
//         groups of `group` inputs (a multiple of 32), W[n, k] = q * scale[n, g] + offset[n, g],
//         float32 scale and offset [N, K/group]. (The layout of the GPU kernels, model/expert_gemv.py.)
// Every weight type has a scalar reference (matmul.cc) and SIMD kernels (simd.inc) compiled once per
// instruction set; which set runs is chosen at run time from what the CPU reports.
#pragma once

#include <cstdint>
#include <cstring>

namespace mixtral_cpu {

enum class WeightType { F32, BF16, INT8, INT4 };

static inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Weights {
  WeightType type;
  const void* data;
  const float* scale;   // INT8 [N], INT4 [N, K / group]; else null
  const float* offset;  // INT4 [N, K / group]; else null
  int64_t N, K, group;
};

// The gemv of INT8 weights takes x as int16, in blocks of X16_BLOCK inputs with a float32 scale each
// (x ~= x16 * scale, |x16| <= 32767: within 1.5e-5 of the block's largest |x|), and multiplies it by the
// weights' integers in integer dot products; inputs after the last whole block stay float32.
constexpr int64_t X16_BLOCK = 64;

// The gemv of INT4 weights takes x in blocks of X8_BLOCK inputs (what 64 bytes of a row hold) as two
// int8 parts a and b per input, with a float32 scale per 32 inputs (X8_GROUP): x ~= (256 a + b) * scale
// / 256, |a| <= 127 (the 32 inputs' largest |x| is 127 * scale), within 1.6e-5 of that largest |x|.
// Unsigned nibbles times signed bytes, 4 products summed a lane (vpdpbusd; vpmaddubsw + vpmaddwd
// without VNNI): the nibbles need no widening. Inputs after the last whole block stay float32.
constexpr int64_t X8_BLOCK = 128;
constexpr int64_t X8_GROUP = 32;
constexpr int64_t X8_LANE = 8;  // inputs per int32 lane of the dot products: 4 bytes, two nibbles each

// What the kernels want of x besides x, prepared once per call (matmul.cc).
struct Prepared {
  const float* group_sums;  // INT4 gemv [M, K / group]: x summed over each group, as x8 stands for it
  const int16_t* x16;       // INT8 gemv [M, K]: the whole blocks of x as int16
  const float* x16_scale;   // [M, K / X16_BLOCK]
  const int8_t* x8;         // INT4 gemv [M, K / X8_BLOCK, 4, 64]: per whole block, a of its 64 even inputs (the
                            // low nibbles' order), a of its odd ones (the high nibbles'), then b of each
  const float* x8_scale;    // [M, K / X8_LANE] (whole blocks): each lane's scale / 256
  const int32_t* lane_group;  // [K / X8_LANE] (whole blocks): each lane's weight group, less its block's first
  const uint16_t* x_bf16;   // BF16 gemv [M, 2, K]: x as a bfloat16 and the bfloat16 of what it leaves (their sum
                            // within 2^-16 of x), for the CPUs with bfloat16 dot products (AVX512-BF16)
  const float* tiles;       // SIMD gemm [M / tile_rows][K][tile_rows]: x in tiles of rows, zero-padded (INT4: each 32
                            // inputs reordered, the 16 even ones first, as its weights dequantize)
  bool x_is_bf16;           // x_bf16's second parts are all 0 (x is bfloat16 already)
};

// y rows [m0, m1) x columns [n0, n1) of y [M, N].
using MatmulFn = void (*)(const Weights& w, const float* x, const Prepared& prepared, int64_t M, int64_t m0,
                          int64_t m1, int64_t n0, int64_t n1, float* y);

}  // namespace mixtral_cpu
