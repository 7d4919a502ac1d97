// Matmuls y[M, N] = x[M, K] @ W[N, K]^T with float32 activations in and out and weights in one of four
// types, laid out [out, in] (one contiguous row of W per output) by model/cpu_matmul.py at load time:
//   F32   float32 [N, K]
//   BF16  bfloat16 [N, K] (as uint16)
//   INT8  int8 [N, K], one float32 scale per output row:            W[n, k] = q * scale[n]
//   INT4  uint8 [N, K/2], two inputs per byte (input 2j in the low nibble of byte j, 2j + 1 in the high),
//         groups of `group` inputs (a multiple of 32), W[n, k] = q * scale[n, g] + offset[n, g],
//         float16 scale and offset [N, K/group]. (The layout of the GPU kernels, model/expert_gemv.py.)
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

// A float16 (as uint16) as float32, exactly: subnormals, infinities and NaNs too.
static inline float f16_to_float(uint16_t h) {
  const uint32_t magnitude = uint32_t(h & 0x7FFF) << 13, exponent = magnitude & (0x1F << 23);
  uint32_t bits = magnitude + ((127 - 15) << 23);
  if (exponent == (0x1Fu << 23)) bits += (128 - 16) << 23;  // infinity, NaN
  float f;
  std::memcpy(&f, &bits, 4);
  if (exponent == 0) f -= 6.103515625e-05f;  // subnormal: (2^-14 + m 2^-24) - 2^-14 = m 2^-24
  std::memcpy(&bits, &f, 4);
  bits |= uint32_t(h & 0x8000) << 16;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Weights {
  WeightType type;
  const void* data;
  const float* scale;            // INT8 [N]; else null
  const uint16_t* group_scale;   // INT4 [N, K / group], float16; else null
  const uint16_t* group_offset;  // INT4 [N, K / group], float16; else null
  int64_t N, K, group;
};

// The gemv of INT8 weights takes x as int16, in blocks of X16_BLOCK inputs with a float32 scale each
// (x ~= x16 * scale, |x16| <= 32767: within 1.5e-5 of the block's largest |x|), and multiplies it by the
// weights' integers in integer dot products; inputs after the last whole block stay float32.
constexpr int64_t X16_BLOCK = 64;

// INT4 weights as the kernels read them: each row's inputs in units of INT4_UNIT (16 bytes: input 2j of
// the unit in the low nibble of byte j, 2j + 1 in the high one), the units in blocks of
// INT4_BLOCK_UNITS (the row's last block may hold fewer, U), each block's bytes interleaved four at a
// time: byte 4c + i of its unit u (chunk c in 0..3) at 4 U c + 4 u + i (model/cpu_matmul.py's
// `interleave_int4` lays them out so at load). A vector of W lanes then holds chunk c of W units, one a
// lane, and the gemv sums each unit's 32 products in its lane over the 4 chunks before scaling it once.
// Groups must be whole units dividing a whole block (32, 64, ..., 512 inputs).
constexpr int64_t INT4_UNIT = 32;
constexpr int64_t INT4_BLOCK_UNITS = 16;

// Blocks of a row of K inputs, and the units of the block starting at unit `first` (U above).
static inline int64_t int4_blocks(int64_t K) { return (K / INT4_UNIT + INT4_BLOCK_UNITS - 1) / INT4_BLOCK_UNITS; }
static inline int64_t int4_block_units(int64_t K, int64_t first) {
  return K / INT4_UNIT - first < INT4_BLOCK_UNITS ? K / INT4_UNIT - first : INT4_BLOCK_UNITS;
}

// Where byte j (0..15) of unit u lies in an INT4 row of K inputs.
static inline int64_t int4_byte(int64_t K, int64_t u, int64_t j) {
  const int64_t first = u / INT4_BLOCK_UNITS * INT4_BLOCK_UNITS;
  return first * (INT4_UNIT / 2) + j / 4 * 4 * int4_block_units(K, first) + (u - first) * 4 + j % 4;
}

// The gemv of INT4 weights takes x as int8 per unit, with a float32 scale each (x ~= x8 * scale, |x8|
// <= 127: within 0.4% of the unit's largest |x|, as llama.cpp's Q8 activations): unsigned nibbles times
// signed bytes, 4 products summed a lane (vpdpbusd; vpmaddubsw + vpmaddwd without VNNI), the nibbles
// not widened. (x as two int8 parts, within 1.6e-5, took twice the dot products: 1.7x slower from cache,
// 10-20% from memory.)
constexpr int64_t X8_BLOCK_BYTES = 4 * 2 * INT4_BLOCK_UNITS * 4;  // x8 of a block: 4 chunks, low and high

// Where input i (0..31) of a unit lies in x8 (Prepared::x8), from the unit's first byte (its lane of its
// block's first chunk): chunk i / 8, the low nibbles' (even i) or the high ones' (odd i) part, byte i % 8 / 2.
static inline int64_t x8_at(int64_t i) { return i / 8 * (X8_BLOCK_BYTES / 4) + i % 2 * (X8_BLOCK_BYTES / 8) + i % 8 / 2; }

// The gemms of INT8 and INT4 weights take x as int16 per unit of INT4_UNIT inputs (the last one padded
// with zeros), with a float32 scale each (x ~= x16 * scale, |x16| <= 32767: within 1.5e-5 of the unit's
// largest |x|), and multiply it by the weights' integers widened to int16 (vpdpwssd: twice the multiply-
// adds of an FMA). x as int8 (4 multiply-adds a lane) took the demo's int4 greedy replies off float32's
// from the first token: its activations' outliers.
static inline int64_t int_units(int64_t K) { return (K + INT4_UNIT - 1) / INT4_UNIT; }

// Where input i (0..31) of a unit goes in the gemms' int16 tiles: INT4 the 16 even inputs first, then the
// odd ones, the order its unit's low and high nibbles come in; INT8 in order.
static inline int64_t int_tile_order(int64_t i, bool int4) { return int4 ? i % 2 * 16 + i / 2 : i; }

// What the kernels want of x besides x, prepared once per call (matmul.cc).
struct Prepared {
  const float* group_sums;  // INT4 gemv [M, K / group]: x summed over each group, as x8 stands for it
  const int16_t* x16;       // INT8 gemv [M, K]: the whole blocks of x as int16
  const float* x16_scale;   // [M, K / X16_BLOCK]
  const int8_t* x8;         // INT4 gemv [M, blocks, 4 chunks, 2, INT4_BLOCK_UNITS, 4]: per block and chunk c, x8 of
                            // the inputs its low nibbles meet (unit u's 8c, 8c + 2, 8c + 4, 8c + 6 in lane u), then
                            // of those its high ones meet (8c + 1, ...); 0 past the row's last unit
  const float* x8_scale;    // [M, blocks * INT4_BLOCK_UNITS]: each unit's scale (0 past the last unit)
  const int32_t* lane_group;  // [INT4_BLOCK_UNITS]: each unit's weight group, less its block's first
  const uint16_t* x_bf16;   // BF16 gemv [M, 2, K]: x as a bfloat16 and the bfloat16 of what it leaves (their sum
                            // within 2^-16 of x), for the CPUs with bfloat16 dot products (AVX512-BF16)
  const float* tiles;       // F32 / BF16 SIMD gemm [M / tile_rows][K][tile_rows]: x in tiles of rows, zero-padded
  const uint16_t* tiles_bf16;  // BF16 gemm with bfloat16 dot products, where x is bfloat16 already (null elsewhere):
                               // [M / tile_rows][K / 2][tile_rows][2], x in tiles of rows, its inputs in pairs
  const int16_t* tiles_x16;  // INT8 / INT4 gemm [M / tile_rows][units * 16][tile_rows][2] (units: int_units(K)): x16, in
                             // tiles of rows, 2 inputs a row at a time, each unit's inputs in int_tile_order;
                             // rows past M and inputs past K zero (the scalar reference: tiles of one row)
  const float* tile_x16_scale;  // [M / tile_rows][units][tile_rows]: each unit's scale
  const float* tile_sums;   // INT4 [M / tile_rows][K / group][tile_rows]: x summed over each group, as x16 stands for it
  bool x_is_bf16;           // x is bfloat16 already (x_bf16's second parts are all 0)
};

// y rows [m0, m1) x columns [n0, n1) of y [M, N].
using MatmulFn = void (*)(const Weights& w, const float* x, const Prepared& prepared, int64_t M, int64_t m0,
                          int64_t m1, int64_t n0, int64_t n1, float* y);

}  // namespace mixtral_cpu
