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

namespace mixtral_cpu {

enum class WeightType { F32, BF16, INT8, INT4 };

struct Weights {
  WeightType type;
  const void* data;
  const float* scale;   // INT8 [N], INT4 [N, K / group]; else null
  const float* offset;  // INT4 [N, K / group]; else null
  int64_t N, K, group;
};

// The gemv of INT8 and INT4 weights takes x as int16, in blocks of X16_BLOCK inputs with a float32 scale
// each (x ~= x16 * scale, |x16| <= 32767: within 1.5e-5 of the block's largest |x|), and multiplies it
// by the weights' integers in integer dot products; inputs after the last whole block stay float32.
constexpr int64_t X16_BLOCK = 64;

// What the kernels want of x besides x, prepared once per call (matmul.cc).
struct Prepared {
  const float* group_sums;  // INT4 [M, K / group]: x summed over each group (the gemv: x as x16 stands for it)
  const int16_t* x16;       // INT8 / INT4 gemv [M, K]: the whole blocks of x as int16 (INT4: each block's 32
                            // even inputs first, then its odd ones: the low and high nibbles' order)
  const float* x16_scale;   // [M, K / X16_BLOCK]
  const uint16_t* x_bf16;   // BF16 gemv [M, 2, K]: x as a bfloat16 and the bfloat16 of what it leaves (their sum
                            // within 2^-16 of x), for the CPUs with bfloat16 dot products (AVX512-BF16)
  const float* split;       // INT4 gemm [M, K]: each 32 inputs of x reordered, the 16 even ones first
  const float* tiles;       // SIMD gemm [M / tile_rows][K][tile_rows]: x (INT4: split) in tiles of rows, zero-padded
};

// y rows [m0, m1) x columns [n0, n1) of y [M, N].
using MatmulFn = void (*)(const Weights& w, const float* x, const Prepared& prepared, int64_t M, int64_t m0,
                          int64_t m1, int64_t n0, int64_t n1, float* y);

}  // namespace mixtral_cpu
