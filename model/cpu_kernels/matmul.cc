// XLA FFI handlers for the CPU matmuls of kernels.h, called by model/cpu_matmul.py inside the jitted
// programs: one weight of any type (the type read from its dtype), or a MoE layer's experts. Each call
// splits its outputs into ranges run on XLA's intra-op thread pool, the calling thread taking ranges too.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mixtral_cpu {

static inline uint16_t float_to_bf16(float f) {  // rounded to the nearest, ties to even (no NaNs here)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// The integer value of weight (n, k): INT8 q (its scale applied to the whole row), INT4 q in [0, 15].
static int32_t weight_integer(const Weights& w, int64_t n, int64_t k) {
  if (w.type == WeightType::INT8) return ((const int8_t*)w.data)[n * w.K + k];
  const int64_t i = k % INT4_UNIT;
  const uint8_t byte = ((const uint8_t*)w.data)[n * (w.K / 2) + int4_byte(w.K, k / INT4_UNIT, i / 2)];
  return i % 2 ? byte >> 4 : byte & 15;
}

// The scalar reference: what every SIMD kernel must compute, one weight at a time.
static float weight(const Weights& w, int64_t n, int64_t k) {
  switch (w.type) {
    case WeightType::F32: return ((const float*)w.data)[n * w.K + k];
    case WeightType::BF16: return bf16_to_float(((const uint16_t*)w.data)[n * w.K + k]);
    case WeightType::INT8: return weight_integer(w, n, k) * w.scale[n];
    case WeightType::INT4: {
      const int64_t g = n * (w.K / w.group) + k / w.group;
      return weight_integer(w, n, k) * f16_to_float(w.group_scale[g]) + f16_to_float(w.group_offset[g]);
    }
  }
  return 0;
}

static void matmul_reference(const Weights& w, const float* x, const Prepared&, int64_t, int64_t m0, int64_t m1,
                             int64_t n0, int64_t n1, float* y) {
  for (int64_t m = m0; m < m1; m++)
    for (int64_t n = n0; n < n1; n++) {
      float s = 0;
      for (int64_t k = 0; k < w.K; k++) s += x[m * w.K + k] * weight(w, n, k);
      y[m * w.N + n] = s;
    }
}

// The int4 gemv's x (Prepared::x8) at input k of row m, to be multiplied by its unit's x8_scale.
static int32_t x8_integer(const Prepared& prepared, int64_t K, int64_t m, int64_t k) {
  const int64_t u = k / INT4_UNIT;
  return prepared.x8[(m * int4_blocks(K) + u / INT4_BLOCK_UNITS) * X8_BLOCK_BYTES + u % INT4_BLOCK_UNITS * 4 +
                     x8_at(k % INT4_UNIT)];
}

// The gemv of INT8 / INT4 weights (what the SIMD gemv computes): per 32 inputs of the whole blocks (INT4:
// of each unit), the integer dot product with x16 (INT8) or x8 (INT4), times x's scale there (INT4: and
// the group's scale); INT8's inputs after the whole blocks in float32; INT8 times the row's scale, INT4
// plus its offsets times x's group sums.
static void gemv_reference_int(const Weights& w, const float* x, const Prepared& prepared, int64_t, int64_t m0,
                               int64_t m1, int64_t n0, int64_t n1, float* y) {
  const bool int4 = w.type == WeightType::INT4;
  const int64_t K = w.K, whole = int4 ? K : K / X16_BLOCK * X16_BLOCK;
  const int64_t G = int4 ? K / w.group : 0, scales = int4_blocks(K) * INT4_BLOCK_UNITS;
  for (int64_t m = m0; m < m1; m++)
    for (int64_t n = n0; n < n1; n++) {
      float s = 0;
      for (int64_t k0 = 0; k0 < whole; k0 += 32) {
        int32_t dot = 0;
        for (int64_t k = k0; k < k0 + 32; k++)
          dot += weight_integer(w, n, k) * (int4 ? x8_integer(prepared, K, m, k) : prepared.x16[m * K + k]);
        s += int4 ? dot * (f16_to_float(w.group_scale[n * G + k0 / w.group]) * prepared.x8_scale[m * scales + k0 / INT4_UNIT])
                  : dot * prepared.x16_scale[m * (K / X16_BLOCK) + k0 / X16_BLOCK];
      }
      if (int4) {
        for (int64_t g = 0; g < G; g++) s += f16_to_float(w.group_offset[n * G + g]) * prepared.group_sums[m * G + g];
        y[m * w.N + n] = s;
      } else {
        for (int64_t k = whole; k < K; k++) s += x[m * K + k] * weight_integer(w, n, k);
        y[m * w.N + n] = s * w.scale[n];
      }
    }
}

static void gemv_reference(const Weights& w, const float* x, const Prepared& prepared, int64_t M, int64_t m0,
                           int64_t m1, int64_t n0, int64_t n1, float* y) {
  if (w.type == WeightType::INT8 || w.type == WeightType::INT4)
    return gemv_reference_int(w, x, prepared, M, m0, m1, n0, n1, y);
  matmul_reference(w, x, prepared, M, m0, m1, n0, n1, y);
}

// The INT8 / INT4 gemm (what the SIMD one computes): per unit, the integer dot product of the weights with
// x16 (Prepared::tiles_x16, in tiles of one row here), times x's scale there and the weights' (INT8: the
// row's; INT4: the group's); INT4 plus the offsets times x's group sums.
static void gemm_reference_int(const Weights& w, const Prepared& prepared, int64_t m0, int64_t m1, int64_t n0,
                               int64_t n1, float* y) {
  const bool int4 = w.type == WeightType::INT4;
  const int64_t K = w.K, G = int4 ? K / w.group : 0, units = int_units(K);
  for (int64_t m = m0; m < m1; m++)
    for (int64_t n = n0; n < n1; n++) {
      float s = 0;
      for (int64_t u = 0; u < units; u++) {
        int32_t dot = 0;
        for (int64_t k = u * INT4_UNIT; k < std::min(K, (u + 1) * INT4_UNIT); k++)
          dot += weight_integer(w, n, k) * prepared.tiles_x16[(m * units + u) * INT4_UNIT + int_tile_order(k % INT4_UNIT, int4)];
        const float scale = int4 ? f16_to_float(w.group_scale[n * G + u * INT4_UNIT / w.group]) : w.scale[n];
        s += dot * (scale * prepared.tile_x16_scale[m * units + u]);
      }
      for (int64_t g = 0; g < G; g++) s += f16_to_float(w.group_offset[n * G + g]) * prepared.tile_sums[m * G + g];
      y[m * w.N + n] = s;
    }
}

static void gemm_reference(const Weights& w, const float* x, const Prepared& prepared, int64_t M, int64_t m0,
                           int64_t m1, int64_t n0, int64_t n1, float* y) {
  if (w.type == WeightType::INT8 || w.type == WeightType::INT4) return gemm_reference_int(w, prepared, m0, m1, n0, n1, y);
  matmul_reference(w, x, prepared, M, m0, m1, n0, n1, y);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MIXTRAL_X86 1
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif
namespace avx2 {
constexpr int W = 8;
#define SIMD_WIDTH 8
#include "simd.inc"
#undef SIMD_WIDTH
}  // namespace avx2
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))), apply_to = function)
#endif
namespace avx512 {
constexpr int W = 16;
#define SIMD_WIDTH 16
#include "simd.inc"
#undef SIMD_WIDTH
}  // namespace avx512
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options

// AVX-512 with VNNI: the int16 dot products in one instruction (vpdpwssd) instead of two
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni"))), apply_to = function)
#endif
namespace avx512_vnni {
constexpr int W = 16;
#define SIMD_WIDTH 16
#define SIMD_VNNI 1
#include "simd.inc"
#undef SIMD_VNNI
#undef SIMD_WIDTH
}  // namespace avx512_vnni
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options

// AVX-512 with VNNI and BF16: bfloat16 weights times x in two bfloat16 parts (vdpbf16ps)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni,avx512bf16")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni,avx512bf16"))), apply_to = function)
#endif
namespace avx512_bf16 {
constexpr int W = 16;
#define SIMD_WIDTH 16
#define SIMD_VNNI 1
#define SIMD_BF16 1
#include "simd.inc"
#undef SIMD_BF16
#undef SIMD_VNNI
#undef SIMD_WIDTH
}  // namespace avx512_bf16
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif

// Instruction sets, best last. A kernel set per entry: gemv (few rows), gemm (many rows), and the rows per
// tile the gemm wants x packed in (Prepared::tiles; 0: it reads x as it is).
enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2, AVX512_VNNI = 3, AVX512_BF16 = 4 };
struct Kernels {
  MatmulFn gemv, gemm;
  int64_t tile_rows;
};
static const Kernels KERNELS[] = {
    {gemv_reference, gemm_reference, 0},
#ifdef MIXTRAL_X86
    {avx2::gemv, avx2::gemm_any, avx2::TILE_ROWS},
    {avx512::gemv, avx512::gemm_any, avx512::TILE_ROWS},
    {avx512_vnni::gemv, avx512_vnni::gemm_any, avx512_vnni::TILE_ROWS},
    {avx512_bf16::gemv, avx512_bf16::gemm_any, avx512_bf16::TILE_ROWS},
#endif
};

static bool cpu_has(Isa isa) {
#ifdef MIXTRAL_X86
  __builtin_cpu_init();
  switch (isa) {
    case SCALAR: return true;
    case AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case AVX512_VNNI: return cpu_has(AVX512) && __builtin_cpu_supports("avx512vnni");
    case AVX512_BF16: return cpu_has(AVX512_VNNI) && __builtin_cpu_supports("avx512bf16");
  }
#endif
  return isa == SCALAR;
}

static Isa best_isa() {
  for (int i = AVX512_BF16; i > SCALAR; i--)
    if (cpu_has(Isa(i))) return Isa(i);
  return SCALAR;
}

static std::atomic<int> current_isa{best_isa()};

constexpr int64_t GEMV_MAX_ROWS = 4;  // more activation rows than this take the gemm kernel
constexpr int64_t GEMM_ROWS = 192;    // activation rows per gemm block (a multiple of every tile_rows)
constexpr int64_t GEMM_COLS = 96;     // outputs per gemm piece (a multiple of every NB)
constexpr int64_t GEMV_GRAIN = 16;    // outputs of the gemv's last, shortest ranges (parallel_outputs)

// The handlers keep their buffers, per calling thread, for the next call (`thread_local`): a prefill's
// buffers of a few MB would otherwise come as fresh pages every call, faulted in and zeroed by the OS
// (15% of a mini-mixtral prefill's time). Each call sizes what it uses. Up to KEPT_BYTES a thread: a
// call that needed more (a long prefill of a large model, whose matmuls take so long that the faults
// matter little) frees them at its end.
constexpr size_t KEPT_BYTES = size_t(256) << 20;

template <class T>
static size_t bytes(const std::vector<T>& v) { return v.capacity() * sizeof(T); }

// x as the kernels of one weight type want it besides x (kernels.h's Prepared), with its buffers (the
// kernels read only what their weight type needs).
struct PreparedX {
  std::vector<float> sums, tiles, x16_scale, x8_scale, tile_x16_scale, tile_sums;
  std::vector<int16_t> x16, tiles_x16;
  std::vector<int8_t> x8;
  std::vector<int32_t> lane_group;
  std::vector<uint16_t> x_bf16, tiles_bf16;
  bool x_is_bf16 = false, bf16_tiles = false;

  Prepared view() const {
    return {sums.data(), x16.data(), x16_scale.data(), x8.data(), x8_scale.data(), lane_group.data(),
            x_bf16.data(), tiles.data(), bf16_tiles ? tiles_bf16.data() : nullptr, tiles_x16.data(),
            tile_x16_scale.data(), tile_sums.data(), x_is_bf16};
  }
  size_t held() const {
    return bytes(sums) + bytes(tiles) + bytes(x16_scale) + bytes(x8_scale) + bytes(x16) + bytes(x8) +
           bytes(lane_group) + bytes(x_bf16) + bytes(tiles_bf16) + bytes(tiles_x16) + bytes(tile_x16_scale) +
           bytes(tile_sums);
  }
};

// The rounding of x for the int8 / int4 gemv, compiled for the vector units too (VECTORIZED: the calling
// thread prepares x while the others wait: in scalar code it took 15% of an int4 gemv of 3584 inputs).
VECTORIZED static float largest_abs(const float* x, int64_t n) {
  float largest = 0;
  for (int64_t i = 0; i < n; i++) largest = std::max(largest, std::fabs(x[i]));
  return largest;
}

// X16_BLOCK inputs times to_int, rounded to int16
VECTORIZED static void to_x16(const float* x, float to_int, int16_t* out) {
  for (int64_t i = 0; i < X16_BLOCK; i++) out[i] = int16_t(std::nearbyint(x[i] * to_int));
}

// A unit's INT4_UNIT inputs times to_int, rounded, to out[at(i)] (T: int8, the gemv's x8, kernels.h: `out`
// at the unit's lane of its block's first chunk; int16, a unit of the gemm's tiles); returns their sum.
template <class T, class At>
VECTORIZED static int32_t round_unit(const float* x, float to_int, T* out, At at) {
  int32_t rounded[INT4_UNIT], sum = 0;
  for (int i = 0; i < INT4_UNIT; i++) {
    rounded[i] = int32_t(std::nearbyint(x[i] * to_int));
    sum += rounded[i];
  }
  for (int i = 0; i < INT4_UNIT; i++) out[at(i)] = T(rounded[i]);
  return sum;
}

// Whether each of n values is a bfloat16 (its low 16 bits 0).
VECTORIZED static bool is_bf16(const float* x, int64_t n) {
  uint32_t low = 0;
  for (int64_t i = 0; i < n; i++) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    low |= bits & 0xFFFF;
  }
  return low == 0;
}

// n inputs as bfloat16 (to high[0, n)) and the bfloat16 of what each leaves (to high[n, 2n)).
VECTORIZED static void to_bf16_parts(const float* x, int64_t n, uint16_t* high) {
  for (int64_t i = 0; i < n; i++) {
    high[i] = float_to_bf16(x[i]);
    high[n + i] = float_to_bf16(x[i] - bf16_to_float(high[i]));
  }
}

// x [M, K] in tiles of `tile` rows, input-major, zero-padded (the gemm's): input k of a tile's row r at
// place(k) + r * stride of the tile, as convert makes it. Written in order of k; the tile's rows of x stay
// in L1 meanwhile.
template <class T, class Place, class Convert>
static void pack_tiles(ffi::ThreadPool& pool, const float* xs, int64_t M, int64_t K, int64_t tile, std::vector<T>& tiles,
                       int64_t stride, Place place, Convert convert) {
  tiles.resize((M + tile - 1) / tile * tile * K);
  parallel_for(pool, (M + tile - 1) / tile, [&](int64_t t) {
    T* out = tiles.data() + t * tile * K;
    const int64_t rows = std::min(tile, M - t * tile);
    const float* in = xs + t * tile * K;
    for (int64_t k = 0; k < K; k++) {
      T* column = out + place(k);
      for (int64_t r = 0; r < tile; r++) column[r * stride] = r < rows ? convert(in[r * K + k]) : T{};
    }
  });
}

// x [M, K] rounded to int16 per unit, in the int8 / int4 gemms' tiles (kernels.h: Prepared::tiles_x16,
// tile_x16_scale; INT4 (group > 0) tile_sums; rows past M and inputs past K zero).
static void pack_x16_tiles(ffi::ThreadPool& pool, const float* xs, int64_t M, int64_t K, int64_t group, int64_t tile,
                           PreparedX& p) {
  const int64_t tiles = (M + tile - 1) / tile, units = int_units(K), G = group ? K / group : 0;
  p.tiles_x16.assign(tiles * tile * units * INT4_UNIT, 0);
  p.tile_x16_scale.assign(tiles * tile * units, 0.0f);
  p.tile_sums.assign(tiles * tile * G, 0.0f);
  parallel_for(pool, tiles, [&](int64_t t) {
    for (int64_t m = t * tile; m < std::min(M, (t + 1) * tile); m++) {
      const int64_t r = m - t * tile;
      for (int64_t u = 0; u < units; u++) {
        float unit[INT4_UNIT] = {};  // (the last one padded with zeros)
        std::memcpy(unit, xs + m * K + u * INT4_UNIT, std::min(INT4_UNIT, K - u * INT4_UNIT) * sizeof(float));
        const float largest = largest_abs(unit, INT4_UNIT), to_int = largest > 0 ? 32767.0f / largest : 0.0f;
        const float scale = largest / 32767.0f;
        int16_t* out = p.tiles_x16.data() + (t * units + u) * INT4_UNIT * tile + r * 2;
        const int32_t sum = round_unit(unit, to_int, out, [tile, group](int64_t i) {
          const int64_t at = int_tile_order(i, group > 0);
          return at / 2 * 2 * tile + at % 2;
        });
        p.tile_x16_scale[(t * units + u) * tile + r] = scale;
        if (G) p.tile_sums[(t * G + u * INT4_UNIT / group) * tile + r] += sum * scale;
      }
    }
  });
}

// Prepares x [M, w.K] for `w`'s gemv (M <= GEMV_MAX_ROWS) or gemm kernels.
static void prepare(ffi::ThreadPool& pool, const Weights& w, const float* xs, int64_t M, const Kernels& kernels,
                    bool bf16_dot, PreparedX& p) {
  const bool gemv = M <= GEMV_MAX_ROWS;
  const int64_t K = w.K;
  const bool bf16 = w.type == WeightType::BF16 && bf16_dot;  // bfloat16 dot products (the kernels that ask)
  p.x_is_bf16 = bf16 && is_bf16(xs, M * K);
  if (gemv && bf16) {  // the only kernels that read it
    p.x_bf16.resize(M * 2 * K);
    for (int64_t m = 0; m < M; m++) to_bf16_parts(xs + m * K, K, p.x_bf16.data() + 2 * m * K);
  }
  if (gemv && w.type == WeightType::INT8) {
    const int64_t B = K / X16_BLOCK;
    p.x16.resize(M * K);
    p.x16_scale.resize(M * B);
    for (int64_t m = 0; m < M; m++)
      for (int64_t b = 0; b < B; b++) {
        const float* block = xs + m * K + b * X16_BLOCK;
        const float largest = largest_abs(block, X16_BLOCK), to_int = largest > 0 ? 32767.0f / largest : 0.0f;
        p.x16_scale[m * B + b] = largest / 32767.0f;
        to_x16(block, to_int, p.x16.data() + m * K + b * X16_BLOCK);
      }
  }
  if (gemv && w.type == WeightType::INT4) {  // x8, and the group sums of x as multiplied
    const int64_t G = K / w.group, units = K / INT4_UNIT, blocks = int4_blocks(K);
    p.sums.assign(M * G, 0.0f);
    p.x8.assign(M * blocks * X8_BLOCK_BYTES, 0);
    p.x8_scale.assign(M * blocks * INT4_BLOCK_UNITS, 0.0f);
    p.lane_group.resize(INT4_BLOCK_UNITS);
    for (int64_t l = 0; l < INT4_BLOCK_UNITS; l++) p.lane_group[l] = int32_t(l * INT4_UNIT / w.group);
    for (int64_t m = 0; m < M; m++)
      for (int64_t u = 0; u < units; u++) {
        const float* unit = xs + m * K + u * INT4_UNIT;
        const float largest = largest_abs(unit, INT4_UNIT), to_int = largest > 0 ? 127.0f / largest : 0.0f;
        const float scale = largest / 127.0f;
        p.x8_scale[m * blocks * INT4_BLOCK_UNITS + u] = scale;
        int8_t* lane = p.x8.data() + (m * blocks + u / INT4_BLOCK_UNITS) * X8_BLOCK_BYTES + u % INT4_BLOCK_UNITS * 4;
        p.sums[m * G + u * INT4_UNIT / w.group] += round_unit(unit, to_int, lane, [](int64_t i) { return x8_at(i); }) * scale;
      }
  }
  const int64_t tile = kernels.tile_rows;
  // BF16 weights times x that is bfloat16 already (a bfloat16 model's activations, the experts' hidden ones
  // too: moe), on CPUs with bfloat16 dot products: x in tiles of bfloat16 pairs, for vdpbf16ps
  p.bf16_tiles = !gemv && tile && p.x_is_bf16 && K % 2 == 0;
  if (p.bf16_tiles) {
    pack_tiles(pool, xs, M, K, tile, p.tiles_bf16, 2, [&](int64_t k) { return k / 2 * 2 * tile + k % 2; }, float_to_bf16);
  } else if (!gemv && (w.type == WeightType::INT8 || w.type == WeightType::INT4)) {  // (the scalar reference reads
                                                                                     // tiles of one row)
    pack_x16_tiles(pool, xs, M, K, w.type == WeightType::INT4 ? w.group : 0, std::max<int64_t>(tile, 1), p);
  } else if (!gemv && tile) {
    pack_tiles(pool, xs, M, K, tile, p.tiles, 1, [&](int64_t k) { return k * tile; }, [](float v) { return v; });
  }
}

// Blocks of GEMM_ROWS activation rows in M rows: the gemm's (the gemv takes its few rows at once).
static int64_t row_blocks(int64_t M) { return M <= GEMV_MAX_ROWS ? 1 : (M + GEMM_ROWS - 1) / GEMM_ROWS; }

// y[m0:m1, n0:n1] of x [M, K] times w (m0 a multiple of GEMM_ROWS, m1 - m0 <= GEMM_ROWS): the gemv or the
// gemm kernel.
static void multiply(const Kernels& kernels, const Weights& w, const float* x, const Prepared& prepared, int64_t M,
                     int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* y) {
  (M <= GEMV_MAX_ROWS ? kernels.gemv : kernels.gemm)(w, x, prepared, M, m0, m1, n0, n1, y);
}

// fn(b, n0, n1) over the outputs [0, N) of each of `blocks` blocks of rows, shared among the threads: for
// the gemv (M <= GEMV_MAX_ROWS) in parallel_ranges' ranges, cut at the blocks' ends; for the gemm in pieces
// of `piece` outputs, claimed in turn (the gemm holds a piece's block of y, transposed; in parallel_ranges'
// ranges of pieces a 512-token prefill took 4-5% longer).
template <class F>
static void parallel_outputs(ffi::ThreadPool& pool, int64_t M, int64_t blocks, int64_t N, int64_t piece, const F& fn) {
  if (M <= GEMV_MAX_ROWS) {
    parallel_ranges(pool, blocks * N, GEMV_GRAIN, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin / N; b * N < end; b++) fn(b, std::max(begin - b * N, int64_t(0)), std::min(end - b * N, N));
    });
  } else {
    const int64_t pieces = (N + piece - 1) / piece;
    parallel_for(pool, blocks * pieces, [&](int64_t i) {
      const int64_t n0 = i % pieces * piece;
      fn(i / pieces, n0, std::min(N, n0 + piece));
    });
  }
}

// y_j [M, N_j] = x [M, K] @ W_j^T for weights W_j [N_j, K] of one type (the attention's q, k and v in one
// call): x prepared once, and the outputs of every weight, end to end, shared among the threads at once.
static void matmul(ffi::ThreadPool& pool, const std::vector<Weights>& ws, const float* xs, int64_t M,
                   const std::vector<float*>& ys) {
  const Isa isa = Isa(current_isa.load(std::memory_order_relaxed));
  const Kernels& kernels = KERNELS[isa];
  thread_local PreparedX prepared_x;
  prepare(pool, ws[0], xs, M, kernels, isa == AVX512_BF16, prepared_x);
  const Prepared prepared = prepared_x.view();
  int64_t outputs = 0;
  for (const Weights& w : ws) outputs += w.N;
  parallel_outputs(pool, M, row_blocks(M), outputs, GEMM_COLS, [&](int64_t b, int64_t n0, int64_t n1) {
    int64_t first = 0;  // weight j's outputs: [first, first + N_j)
    for (size_t j = 0; j < ws.size(); first += ws[j].N, j++) {
      const int64_t lo = std::max(n0, first) - first, hi = std::min(n1, first + ws[j].N) - first;
      if (lo < hi)
        multiply(kernels, ws[j], xs, prepared, M, b * GEMM_ROWS, std::min(M, (b + 1) * GEMM_ROWS), lo, hi, ys[j]);
    }
  });
  if (prepared_x.held() > KEPT_BYTES) prepared_x = PreparedX();
}

// The next weight of a call's remaining arguments, from `i` on: the weight, then its scale (INT8: f32) or
// scale and offset (INT4: f16), its type from the weight's dtype (F32, BF16, S8, U8: INT4 packed). A weight
// [N, K] is one matrix; a stack [E, N, K] (its parameters [E, ...]) E of them, read in place.
static ffi::Error next_weights(const ffi::RemainingArgs& args, size_t& i, int64_t group, std::vector<Weights>& out) {
  auto weight = args.get<ffi::AnyBuffer>(i++);
  if (!weight) return weight.error();
  const auto d = weight->dimensions();
  if (d.size() != 2 && d.size() != 3) return ffi::Error::InvalidArgument("mixtral cpu kernels: a weight must be [N, K] or [E, N, K]");
  const int64_t E = d.size() == 3 ? d[0] : 1, N = d[d.size() - 2];
  Weights w = {WeightType::F32, nullptr, nullptr, nullptr, nullptr, N, d[d.size() - 1], 0};
  int params = 0;
  switch (weight->element_type()) {
    case ffi::DataType::F32: break;
    case ffi::DataType::BF16: w.type = WeightType::BF16; break;
    case ffi::DataType::S8: w.type = WeightType::INT8, params = 1; break;
    case ffi::DataType::U8: w.type = WeightType::INT4, w.K = 2 * w.K, w.group = group, params = 2; break;
    default: return ffi::Error::InvalidArgument("mixtral cpu kernels: weights must be f32, bf16, s8 or u8 (int4)");
  }
  if (w.type == WeightType::INT4 && (group <= 0 || group % INT4_UNIT || INT4_UNIT * INT4_BLOCK_UNITS % group || w.K % group))
    return ffi::Error::InvalidArgument("int4 weights: groups must be 32, 64, ..., 512 inputs, dividing K");
  const int64_t per_matrix = w.type == WeightType::INT8 ? N : w.type == WeightType::INT4 ? N * (w.K / w.group) : 0;
  const auto param_type = w.type == WeightType::INT8 ? ffi::DataType::F32 : ffi::DataType::F16;
  const void* param[2] = {nullptr, nullptr};
  for (int j = 0; j < params; j++) {
    auto p = args.get<ffi::AnyBuffer>(i++);
    if (!p) return p.error();
    if (p->element_type() != param_type || p->element_count() != size_t(E * per_matrix))
      return ffi::Error::InvalidArgument("mixtral cpu kernels: scales must be f32 [N] (int8), scales and offsets f16 [N, K / group] (int4), per matrix");
    param[j] = p->untyped_data();
  }
  for (int64_t e = 0; e < E; e++) {
    w.data = (const uint8_t*)weight->untyped_data() + e * (weight->size_bytes() / E);
    if (w.type == WeightType::INT8) w.scale = (const float*)param[0] + e * per_matrix;
    if (w.type == WeightType::INT4)
      w.group_scale = (const uint16_t*)param[0] + e * per_matrix, w.group_offset = (const uint16_t*)param[1] + e * per_matrix;
    out.push_back(w);
  }
  return ffi::Error::Success();
}

static inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// Each live token's routing (moe.py's `route`): the softmax of its router logits [E_all], its k largest
// probabilities (ties: the lower expert first) renormalised to sum 1; as weights [M, E] of the experts
// first .. first + E - 1, those of this call (0: not chosen). A token not live (bucket padding) chooses none.
static void route(const float* logits, const bool* live, int64_t M, int64_t E_all, int64_t k, int64_t first,
                  int64_t E, float* weights) {
  std::vector<float> probs(E_all);
  std::vector<int64_t> order(E_all);
  std::fill(weights, weights + M * E, 0.0f);
  for (int64_t m = 0; m < M; m++) {
    if (!live[m]) continue;
    const float* l = logits + m * E_all;
    const float largest = *std::max_element(l, l + E_all);
    float sum = 0;
    for (int64_t e = 0; e < E_all; e++) sum += probs[e] = std::exp(l[e] - largest);
    for (float& p : probs) p /= sum;
    for (int64_t e = 0; e < E_all; e++) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return probs[a] > probs[b] || (probs[a] == probs[b] && a < b); });
    float chosen = 0;
    for (int64_t i = 0; i < k; i++) chosen += probs[order[i]];
    for (int64_t i = 0; i < k; i++)
      if (order[i] >= first && order[i] < first + E) weights[m * E + order[i] - first] = probs[order[i]] / chosen;
  }
}

// The SwiGLU experts of a MoE layer, in one call, routing included (`route`, from the router's logits):
//   y[m] = sum over experts e of weight[m, e] * w2_e(silu(w1_e x[m]) * w3_e x[m])
// (BF16 weights: silu(w1_e x[m]) * w3_e x[m] rounded to bfloat16)
// run for the experts some token chose, each on the tokens that chose it, all of them at once: each
// expert's weights are read once a call (in prefill, a loop over tiles of an expert's tokens read them
// once a tile). Two passes over the threads: w1 and w3 of every chosen expert, block by block of its rows,
// their outputs in ranges, then w2's outputs in ranges, summed over the experts. One
// call instead of a cond or a loop and three calls per expert: a program a third smaller to trace and
// compile; and routing here instead of XLA's seven small operations a layer (softmax, top-k, the
// weights' scatter), ~2% of an int4 decode step. The experts come as stacks (w1, w3, w2 of E' experts
// each; next_weights): global experts first, first + 1, ... (a device's under shard_map), read in place.
//   x f32 [M, D], logits f32 [M, E_all], live pred [M], first s32 [1]; attribute k: experts per token
static ffi::Error moe(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> logits,
                      ffi::Buffer<ffi::PRED> live, ffi::Buffer<ffi::S32> first, ffi::RemainingArgs experts,
                      int64_t group, int64_t k, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto x_dims = x.dimensions(), l_dims = logits.dimensions();
  if (x_dims.size() != 2 || l_dims.size() != 2 || l_dims[0] != x_dims[0] || live.element_count() != size_t(x_dims[0]) ||
      first.element_count() != 1)
    return ffi::Error::InvalidArgument("mixtral moe: expected x [M, D], logits [M, E], live [M] and first [1]");
  const int64_t M = x_dims[0], D = x_dims[1], E_all = l_dims[1];
  std::vector<Weights> w;  // w1, w3, w2 of each expert
  for (size_t i = 0; i < experts.size();) {  // stacks of w1, w3 and w2 of as many experts each
    std::vector<Weights> stacks[3];
    for (auto& stack : stacks)
      if (auto error = next_weights(experts, i, group, stack); error.failure()) return error;
    if (stacks[1].size() != stacks[0].size() || stacks[2].size() != stacks[0].size())
      return ffi::Error::InvalidArgument("mixtral moe: w1, w3 and w2 must stack as many experts");
    for (size_t e = 0; e < stacks[0].size(); e++) w.insert(w.end(), {stacks[0][e], stacks[1][e], stacks[2][e]});
  }
  const int64_t E = w.size() / 3, first_expert = first.typed_data()[0];
  if (E == 0 || first_expert < 0 || first_expert + E > E_all || k < 1 || k > E_all)
    return ffi::Error::InvalidArgument("mixtral moe: expected 1 <= k <= E and this call's experts among the E routed");
  const int64_t I = w[0].N;
  for (int64_t e = 0; e < E; e++)
    if (w[3 * e].N != I || w[3 * e].K != D || w[3 * e + 1].N != I || w[3 * e + 1].K != D || w[3 * e + 2].N != D ||
        w[3 * e + 2].K != I || w[3 * e].type != w[0].type)
      return ffi::Error::InvalidArgument("mixtral moe: w1, w3 must be [I, D] and w2 [D, I], of one type");
  // each chosen expert: the tokens that chose it, as rows of x of its own unless every token did (the
  // buffers kept for the next call, as PreparedX's)
  struct Chosen {
    int64_t expert;
    std::vector<int64_t> tokens;
    std::vector<float> rows, gate, up, out;  // [tokens, D] (when not all of x); [tokens, I]: w1 x, then
                                             // silu(w1 x) * w3 x; w3 x; [tokens, D]: w2 of that
    const float* x = nullptr;           // its tokens' rows of x: x itself or `rows`
    const PreparedX* x_in = nullptr;    // those rows prepared for w1 and w3
    PreparedX own_in, h_in;             // `rows` prepared; silu(w1 x) * w3 x prepared for w2

    size_t held() const {
      return bytes(tokens) + bytes(rows) + bytes(gate) + bytes(up) + bytes(out) + own_in.held() + h_in.held();
    }
  };
  thread_local std::vector<float> weights;  // [M, E]
  weights.resize(M * E);
  route(logits.typed_data(), live.typed_data(), M, E_all, k, first_expert, E, weights.data());
  const float* weight = weights.data();
  const float* xs = x.typed_data();
  thread_local std::vector<Chosen> kept;  // chosen: the first C, grown to the most a call has had
  int64_t C = 0;
  for (int64_t e = 0; e < E; e++) {
    if (int64_t(kept.size()) == C) kept.emplace_back();
    Chosen& c = kept[C];
    c.expert = e;
    c.tokens.clear();
    for (int64_t m = 0; m < M; m++)
      if (weight[m * E + e] != 0) c.tokens.push_back(m);
    C += !c.tokens.empty();
  }
  std::vector<Chosen*> chosen;
  for (int64_t j = 0; j < C; j++) chosen.push_back(&kept[j]);
  float* ys = y->typed_data();
  std::fill(ys, ys + M * D, 0.0f);
  if (chosen.empty()) return ffi::Error::Success();

  const Isa isa = Isa(current_isa.load(std::memory_order_relaxed));
  const Kernels& kernels = KERNELS[isa];
  const bool bf16_dot = isa == AVX512_BF16;
  thread_local PreparedX all_in;  // x prepared once for the experts every token chose (in decode, every chosen one)
  bool all_prepared = false;
  int64_t most = 0;  // tokens of the most chosen expert: the ranges follow its kernel
  for (Chosen* c : chosen) {
    const int64_t rows = c->tokens.size();
    most = std::max(most, rows);
    if (rows == M) {
      if (!all_prepared) prepare(pool, w[3 * c->expert], xs, M, kernels, bf16_dot, all_in);
      all_prepared = true;
      c->x = xs, c->x_in = &all_in;
    } else {
      c->rows.clear();
      for (int64_t m : c->tokens) c->rows.insert(c->rows.end(), xs + m * D, xs + (m + 1) * D);
      prepare(pool, w[3 * c->expert], c->rows.data(), rows, kernels, bf16_dot, c->own_in);
      c->x = c->rows.data(), c->x_in = &c->own_in;
    }
    c->gate.resize(rows * I);
    c->up.resize(rows * I);
    c->out.resize(rows * D);
  }
  // A bfloat16 model's hidden activations are bfloat16, as its other activations (and as XLA's path and
  // transformers have them): w2 then takes one bfloat16 dot product per pair of inputs where the CPU has them
  const bool hidden_bf16 = w[2].type == WeightType::BF16;
  // the first pass: w1's and w3's outputs of each (chosen expert, block of its rows); the gemm's pieces half
  // the matmul's (a pass over an expert's 1-4k outputs in ~20-80 pieces keeps both threads busy to the end)
  std::vector<std::pair<Chosen*, int64_t>> blocks;
  for (Chosen* c : chosen)
    for (int64_t b = 0; b < row_blocks(c->tokens.size()); b++) blocks.emplace_back(c, b * GEMM_ROWS);
  parallel_outputs(pool, most, int64_t(blocks.size()), I, GEMM_COLS / 2, [&](int64_t b, int64_t n0, int64_t n1) {
    auto [c, m0] = blocks[b];
    const int64_t rows = c->tokens.size(), m1 = std::min(rows, m0 + GEMM_ROWS);
    const Prepared in = c->x_in->view();
    multiply(kernels, w[3 * c->expert], c->x, in, rows, m0, m1, n0, n1, c->gate.data());
    multiply(kernels, w[3 * c->expert + 1], c->x, in, rows, m0, m1, n0, n1, c->up.data());
    for (int64_t r = m0; r < m1; r++)
      for (int64_t n = n0; n < n1; n++) {
        const float h = silu(c->gate[r * I + n]) * c->up[r * I + n];
        c->gate[r * I + n] = hidden_bf16 ? bf16_to_float(float_to_bf16(h)) : h;
      }
  });

  for (Chosen* c : chosen) prepare(pool, w[3 * c->expert + 2], c->gate.data(), c->tokens.size(), kernels, bf16_dot, c->h_in);
  parallel_outputs(pool, most, 1, D, GEMM_COLS / 2, [&](int64_t, int64_t n0, int64_t n1) {
    for (Chosen* c : chosen) {
      const int64_t rows = c->tokens.size();
      for (int64_t m0 = 0; m0 < rows; m0 += GEMM_ROWS)
        multiply(kernels, w[3 * c->expert + 2], c->gate.data(), c->h_in.view(), rows, m0, std::min(rows, m0 + GEMM_ROWS),
                 n0, n1, c->out.data());
      for (int64_t r = 0; r < rows; r++) {
        const int64_t m = c->tokens[r];
        for (int64_t n = n0; n < n1; n++) ys[m * D + n] += weight[m * E + c->expert] * c->out[r * D + n];
      }
    }
  });
  size_t held = all_in.held();
  for (const Chosen& c : kept) held += c.held();
  if (held > KEPT_BYTES) kept.clear(), kept.shrink_to_fit(), all_in = PreparedX();
  return ffi::Error::Success();
}

// y_j [M, N_j] = x [M, K] @ W_j^T for weights of one type and K (`matmul`), each given after x with its
// parameters (next_weights), y_j the j-th result.
static ffi::Error matmul_any(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights, int64_t group,
                             ffi::RemainingRets results) {
  std::vector<Weights> ws;
  for (size_t i = 0; i < weights.size();) {
    if (weights.get<ffi::AnyBuffer>(i)->dimensions().size() != 2)
      return ffi::Error::InvalidArgument("mixtral cpu matmul: weights must be [N, K]");
    if (auto error = next_weights(weights, i, group, ws); error.failure()) return error;
  }
  const auto x_dims = x.dimensions();
  if (ws.empty() || ws.size() != results.size() || x_dims.size() != 2)
    return ffi::Error::InvalidArgument("mixtral cpu matmul: x [M, K], then weights, one result each");
  std::vector<float*> ys;
  for (size_t j = 0; j < ws.size(); j++) {
    auto y = results.get<ffi::Buffer<ffi::F32>>(j);
    if (!y) return y.error();
    const auto y_dims = (*y)->dimensions();
    if (ws[j].type != ws[0].type || ws[j].K != x_dims[1] || y_dims.size() != 2 || y_dims[0] != x_dims[0] || y_dims[1] != ws[j].N)
      return ffi::Error::InvalidArgument("mixtral cpu matmul: expected x [M, K], weights [N_j, K] of one type, y_j [M, N_j]");
    ys.push_back((*y)->typed_data());
  }
  matmul(pool, ws, x.typed_data(), x_dims[0], ys);
  return ffi::Error::Success();
}

}  // namespace mixtral_cpu

using namespace mixtral_cpu;

#define BIND_MATMUL ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(mixtral_matmul, matmul_any,
                              BIND_MATMUL.RemainingArgs().Attr<int64_t>("group").RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(mixtral_moe, moe,
                              BIND_MATMUL.Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The instruction set the kernels use: 0 scalar reference, 1 AVX2 + FMA (+ F16C), 2 AVX-512, 3 AVX-512 + VNNI,
// 4 AVX-512 + VNNI + BF16.
extern "C" int mixtral_cpu_isa() { return current_isa.load(); }

// Switches to `isa` if this CPU has it (tests run every kernel set); returns whether it did.
extern "C" int mixtral_cpu_set_isa(int isa) {
  if (isa < SCALAR || isa > AVX512_BF16 || isa >= int(sizeof(KERNELS) / sizeof(KERNELS[0])) || !cpu_has(Isa(isa)))
    return 0;
  current_isa.store(isa);
  return 1;
}
