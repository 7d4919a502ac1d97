// XLA FFI handler for decode attention over the KV cache (model/cpu_attention.py; XLA's version is
// model/mixtral.py's `attend`): each batch row's few new keys and values written into the cache, then its
// new queries against the slots they see, read in place. XLA:CPU ran it as a cond per block of the cache,
// each copying its block of K and V and multiplying them in small dots: ~100 us a layer a token on
// mini-mixtral, a tenth of an int4 decode step; and its writes of the new keys and values took ~10 us.
//
//   q        f32 [B, KV, R, Dh]: the R = G x T queries of each kv head's G heads (row g * T + t), scaled
//   k_new    [B, KV, T, Dh] new keys, v_new [B, KV, T, Dh] new values, as the cache holds them
//   k        [B, KV, Dh, S] keys, transposed; v [B, KV, S, Dh] values: float32, or 16-bit floats held as
//            uint16 (attribute `half`: 1 bfloat16, 2 float16)
//   q_slots  s32 [T] each query's slot; start s32 [B] each row's first slot
//   window   a sliding window of this many slots (0: none)
//   -> f32 [B, KV, R, Dh], and k and v (the same buffers: the call's operands alias them) with the new
//      keys and values at slots q_slots[0] .. q_slots[0] + T - 1 (clamped into the cache, as XLA's
//      dynamic_update_slice)
// Query t of row b sees the slots j with start[b] <= j <= q_slots[t] and q_slots[t] - j < window; a
// query that sees none gets zeros. One task per (row, kv head) on XLA's thread pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mixtral_cpu {

enum class Held { F32 = 0, BF16 = 1, F16 = 2 };

constexpr int64_t SLOTS_CHUNK = 512;  // slots whose scores add up together (R x 512 floats, in L1)

// n 16-bit floats of the cache from `from` (as `held` says) as float32.
static inline void widen(const void* from, Held held, int64_t n, float* out) {
  if (held == Held::BF16) {
    for (int64_t i = 0; i < n; i++) out[i] = bf16_to_float(((const uint16_t*)from)[i]);
  } else {
    for (int64_t i = 0; i < n; i++) out[i] = f16_to_float(((const uint16_t*)from)[i]);
  }
}

// Asks for the n bytes from p (a row of K, a slot's V) to come into the cache: the rows of K are short
// runs 4 S bytes apart, which the hardware's prefetchers, restarting at each page, fetch one line at a time.
static inline void prefetch(const uint8_t* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(p + i);
}

constexpr int64_t KEY_ROWS_AHEAD = 8;  // rows of K asked for ahead of the one multiplied

// scores [R, n] += q [R, Dh] . k's slots [j0, j0 + n) (k [Dh, S]); row: room for n floats.
VECTORIZED static void add_scores(const float* q, const uint8_t* k, Held held, int64_t R, int64_t Dh, int64_t S,
                                  int64_t j0, int64_t n, int64_t stride, float* row, float* scores) {
  const int64_t itemsize = held == Held::F32 ? 4 : 2;
  for (int64_t d = 0; d < std::min(KEY_ROWS_AHEAD, Dh); d++) prefetch(k + (d * S + j0) * itemsize, n * itemsize);
  for (int64_t d = 0; d < Dh; d++) {
    const uint8_t* from = k + (d * S + j0) * itemsize;
    if (d + KEY_ROWS_AHEAD < Dh) prefetch(from + KEY_ROWS_AHEAD * S * itemsize, n * itemsize);
    const float* keys = held == Held::F32 ? (const float*)from : (widen(from, held, n, row), row);
    for (int64_t r = 0; r < R; r++) {
      const float a = q[r * Dh + d];
      float* s = scores + r * stride;
      for (int64_t i = 0; i < n; i++) s[i] += a * keys[i];
    }
  }
}

constexpr int64_t VALUES_AHEAD = 8;  // slots of V asked for ahead of the one weighed

// out [R, Dh] = p [R, L] . v's slots [lo, lo + L) (v [S, Dh]); row: room for Dh floats.
VECTORIZED static void weigh_values(const float* p, const uint8_t* v, Held held, int64_t R, int64_t Dh, int64_t lo,
                                    int64_t L, float* row, float* out) {
  const int64_t itemsize = held == Held::F32 ? 4 : 2, bytes = Dh * itemsize;
  std::fill(out, out + R * Dh, 0.0f);
  for (int64_t j = 0; j < L; j++) {
    const uint8_t* from = v + (lo + j) * bytes;
    if (j + VALUES_AHEAD < L) prefetch(from + VALUES_AHEAD * bytes, bytes);
    const float* values = held == Held::F32 ? (const float*)from : (widen(from, held, Dh, row), row);
    for (int64_t r = 0; r < R; r++) {
      const float a = p[r * L + j];
      float* o = out + r * Dh;
      for (int64_t d = 0; d < Dh; d++) o[d] += a * values[d];
    }
  }
}

// e^x for x <= 0 (below -87, as at -87: 1.6e-38): 2^n e^r with |r| <= ln 2 / 2, e^r by its Taylor
// series to r^7 (within 2 ulp), no branch: a loop of it vectorizes.
static inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860677e-06f;  // ln 2 in two parts
  float p = 1.0f / 5040;
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + c;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// s[0, n) -> e^(s - their largest); returns their sum.
VECTORIZED static float softmax_numerators(float* s, int64_t n) {
  float largest = -INFINITY, sum = 0;
  for (int64_t i = 0; i < n; i++) largest = std::max(largest, s[i]);
  for (int64_t i = 0; i < n; i++) sum += s[i] = exp_nonpositive(s[i] - largest);
  return sum;
}

// The queries q [R, Dh] of one kv head against its keys k [Dh, S] and values v [S, Dh]: slots
// [first[r], last[r]] for row r, all within [lo, hi). scores: room for R x (hi - lo) floats.
static void attend_head(const float* q, const uint8_t* k, const uint8_t* v, Held held, int64_t R, int64_t Dh,
                        int64_t S, const int64_t* first, const int64_t* last, int64_t lo, int64_t hi, float* scores,
                        float* row, float* out) {
  const int64_t L = hi - lo;
  std::fill(scores, scores + R * L, 0.0f);
  for (int64_t j0 = lo; j0 < hi; j0 += SLOTS_CHUNK)
    add_scores(q, k, held, R, Dh, S, j0, std::min(hi, j0 + SLOTS_CHUNK) - j0, L, row, scores + (j0 - lo));
  thread_local std::vector<float> total;  // of each row's numerators
  total.assign(R, 0.0f);
  for (int64_t r = 0; r < R; r++) {
    float* s = scores + r * L;
    const int64_t a = first[r] - lo, b = last[r] + 1 - lo;  // its visible slots, [a, b)
    if (a < b) {
      total[r] = softmax_numerators(s + a, b - a);
      std::fill(s, s + a, 0.0f);
      std::fill(s + b, s + L, 0.0f);
    } else {  // sees no slot
      std::fill(s, s + L, 0.0f);
    }
  }
  weigh_values(scores, v, held, R, Dh, lo, L, row, out);
  for (int64_t r = 0; r < R; r++)
    for (int64_t d = 0; d < Dh; d++) out[r * Dh + d] = total[r] > 0 ? out[r * Dh + d] / total[r] : 0.0f;
}

// Writes one kv head's T new keys k_new [T, Dh] into k [Dh, S] (transposed) and values v_new [T, Dh] into
// v [S, Dh], at slots first .. first + T - 1.
static void write_new(const uint8_t* k_new, const uint8_t* v_new, int64_t T, int64_t Dh, int64_t S, int64_t first,
                      int64_t itemsize, uint8_t* k, uint8_t* v) {
  for (int64_t t = 0; t < T; t++)
    for (int64_t d = 0; d < Dh; d++)
      std::memcpy(k + (d * S + first + t) * itemsize, k_new + (t * Dh + d) * itemsize, itemsize);
  std::memcpy(v + first * Dh * itemsize, v_new, T * Dh * itemsize);
}

static ffi::Error attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
                            ffi::AnyBuffer k_in, ffi::AnyBuffer v_in, ffi::Buffer<ffi::S32> q_slots,
                            ffi::Buffer<ffi::S32> start, int64_t window, int64_t half,
                            ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Result<ffi::AnyBuffer> k,
                            ffi::Result<ffi::AnyBuffer> v) {
  const auto qd = q.dimensions(), kd = k_in.dimensions(), vd = v_in.dimensions(), nd = k_new.dimensions(),
             vnd = v_new.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || nd.size() != 4 || vnd.size() != 4)
    return ffi::Error::InvalidArgument(
        "mixtral attention: expected q [B, KV, R, Dh], k_new and v_new [B, KV, T, Dh], k [B, KV, Dh, S], "
        "v [B, KV, S, Dh]");
  const int64_t B = qd[0], KV = qd[1], R = qd[2], Dh = qd[3], S = vd[2], T = q_slots.element_count();
  if (kd[0] != B || kd[1] != KV || kd[2] != Dh || kd[3] != S || vd[0] != B || vd[1] != KV || vd[3] != Dh ||
      nd[0] != B || nd[1] != KV || nd[2] != T || nd[3] != Dh || !std::equal(nd.begin(), nd.end(), vnd.begin()) ||
      start.element_count() != size_t(B) || T == 0 || T > S || R % T)
    return ffi::Error::InvalidArgument("mixtral attention: q, k_new, v_new, k, v, q_slots and start do not match");
  const auto type = k_in.element_type();
  Held held;
  if (type == ffi::DataType::F32 && half == 0)
    held = Held::F32;
  else if (type == ffi::DataType::U16 && (half == 1 || half == 2))
    held = Held(half);
  else
    return ffi::Error::InvalidArgument("mixtral attention: the cache must be f32, or u16 holding bf16 / f16");
  if (v_in.element_type() != type || k_new.element_type() != type || v_new.element_type() != type)
    return ffi::Error::InvalidArgument("mixtral attention: the new keys and values must be held as the cache");
  const int32_t* slots = q_slots.typed_data();
  const int64_t itemsize = held == Held::F32 ? 4 : 2;
  const int64_t written = std::clamp<int64_t>(slots[0], 0, S - T);
  uint8_t *keys = (uint8_t*)k->untyped_data(), *values = (uint8_t*)v->untyped_data();
  parallel_for(pool, B * KV, [&](int64_t task) {
    const int64_t b = task / KV;
    write_new((const uint8_t*)k_new.untyped_data() + task * T * Dh * itemsize,
              (const uint8_t*)v_new.untyped_data() + task * T * Dh * itemsize, T, Dh, S, written, itemsize,
              keys + task * Dh * S * itemsize, values + task * S * Dh * itemsize);
    thread_local std::vector<int64_t> first, last;
    thread_local std::vector<float> scores, row;
    first.resize(R), last.resize(R);
    int64_t lo = S, hi = 0;
    for (int64_t r = 0; r < R; r++) {
      const int64_t slot = std::min<int64_t>(slots[r % T], S - 1);
      first[r] = std::max<int64_t>({start.typed_data()[b], 0, window > 0 ? slot - window + 1 : 0});
      last[r] = slot;
      if (first[r] <= last[r]) lo = std::min(lo, first[r]), hi = std::max(hi, last[r] + 1);
    }
    hi = std::max(hi, lo);
    scores.resize(R * (hi - lo));
    row.resize(std::max(SLOTS_CHUNK, Dh));
    attend_head(q.typed_data() + task * R * Dh, keys + task * Dh * S * itemsize, values + task * S * Dh * itemsize,
                held, R, Dh, S, first.data(), last.data(), lo, hi, scores.data(), row.data(),
                out->typed_data() + task * R * Dh);
  });
  return ffi::Error::Success();
}

}  // namespace mixtral_cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(mixtral_attention, mixtral_cpu::attention,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("half")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>());
