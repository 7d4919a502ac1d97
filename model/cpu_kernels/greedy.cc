// XLA FFI handler for the greedy choice of decode (model/sampling.py's `greedy`; XLA's version is its
// `first_largest` of `penalize_repeats`): each row's first largest logit after the repetition penalty.
// XLA:CPU reduces one lane at a time, a max and then the first index holding it: ~55 us over 32000
// logits (~80 in a decode step's trace), ~1% of a quantized decode step; ~3 us here.
//
//   logits   f32 [B, V]; seen pred [B, V] the tokens the penalty applies to; penalty f32 [] (1: off)
//   -> s32 [B]: the first index of each row's largest penalized logit; V - 1 where a row holds a NaN
//      (as first_largest: no value equals a NaN largest). (One difference: a largest of 0 held both as -0
//      and as +0 is the first +0 here, the first of either there.)
// Rows run on the calling thread: waking a helper costs more than a row.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

// The loops below compute both arms of each choice and then select, which GCC turns into vector code only
// where floating-point operations may not trap (and none does here: XLA runs with exceptions masked).
#pragma GCC optimize("no-trapping-math")

namespace ffi = xla::ffi;

namespace mixtral_cpu {

constexpr int64_t CHUNK = 256;  // logits the search for the first largest checks at a time

// HF's repetition penalty: a seen token's logit divided by the penalty if positive, else multiplied (both
// computed, then chosen: the loops stay free of branches, so the compiler vectorizes them).
static inline float penalized(float logit, uint8_t seen, float penalty) {
  const float divided = logit / penalty, multiplied = logit * penalty;
  const float fined = logit > 0 ? divided : multiplied;
  return seen ? fined : logit;
}

// A float's bits as an int32 that orders as the float does (NaN beyond the infinities; -0 below +0): the
// compiler vectorizes an integer max, but not a float one that must keep NaN's semantics.
static inline int32_t ordered(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

static inline bool is_nan(float x) { return x != x; }

VECTORIZED static int32_t first_largest(const float* logits, const uint8_t* seen, float penalty, int64_t V) {
  int32_t largest = INT32_MIN;
  int nan = 0;
  for (int64_t i = 0; i < V; i++) {
    const float x = penalized(logits[i], seen[i], penalty);
    nan |= is_nan(x);
    largest = std::max(largest, ordered(x));
  }
  if (nan) return int32_t(V - 1);
  for (int64_t first = 0; first < V; first += CHUNK) {  // the chunk holding it, then its place there
    const int64_t end = std::min(first + CHUNK, V);
    int found = 0;
    for (int64_t i = first; i < end; i++) found |= ordered(penalized(logits[i], seen[i], penalty)) == largest;
    if (found)
      for (int64_t i = first; i < end; i++)
        if (ordered(penalized(logits[i], seen[i], penalty)) == largest) return int32_t(i);
  }
  return int32_t(V - 1);
}

static ffi::Error greedy(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::PRED> seen, ffi::Buffer<ffi::F32> penalty,
                         ffi::Result<ffi::Buffer<ffi::S32>> out) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2 || seen.dimensions().size() != 2 || seen.dimensions()[0] != dims[0] ||
      seen.dimensions()[1] != dims[1] || penalty.element_count() != 1 || dims[1] == 0)
    return ffi::Error::InvalidArgument("mixtral greedy: expected logits and seen [B, V], V > 0, and one penalty");
  const int64_t B = dims[0], V = dims[1];
  for (int64_t b = 0; b < B; b++)
    out->typed_data()[b] = first_largest(logits.typed_data() + b * V, (const uint8_t*)seen.typed_data() + b * V,
                                         penalty.typed_data()[0], V);
  return ffi::Error::Success();
}

}  // namespace mixtral_cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(mixtral_greedy, mixtral_cpu::greedy,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::PRED>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>());
