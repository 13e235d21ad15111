// The int8 activations of the quantized linear kernels (quantized_linear.cpp for a few rows, quantized_gemm.cpp
// for many): each row of x quantized to int8 in blocks of 32 with one float scale per block, as llama.cpp's Q8_0.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "vector.h"

namespace llminfer {

constexpr int64_t kBlock = 32;

// x's rows quantized: q [M, Kp] (Kp = K rounded up to 64, zero padded), and per block of 32: scale dx and
// dx * sum(q) / 8 (the offset term of int4 weights; divided by 8 because the kernels spread it over 8 lanes).
struct Activations {
  int64_t M, K, padded_K;
  const int8_t* q_ptr;  // raw pointers into the scratch buffers (data_ptr<T>() is a checked call)
  const float *scale_ptr, *sum_ptr;
  const int8_t* row(int64_t m) const { return q_ptr + m * padded_K; }
  const float* scales(int64_t m) const { return scale_ptr + m * (padded_K / kBlock); }
  const float* sums(int64_t m) const { return sum_ptr + m * (padded_K / kBlock); }
};

__attribute__((target(AVX2_TARGET))) inline __m256 load8(const c10::BFloat16* p) { return load8_bf16(p); }

__attribute__((target(AVX2_TARGET))) inline int hsum256_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// One row: 32 values at a time, |max| -> scale, round half to even (the default rounding mode), pack to bytes.
template <typename T>
__attribute__((target(AVX2_TARGET))) void quantize_row(const T* x, int64_t K, int64_t padded_K, int8_t* q,
                                                      float* scales, float* sums) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  T tail[kBlock];  // a last block that K does not fill, zero padded
  if (K % kBlock) {
    for (int64_t i = 0; i < kBlock; ++i) tail[i] = static_cast<T>(i < K % kBlock ? static_cast<float>(x[K / kBlock * kBlock + i]) : 0.f);
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const T* xb = (b + 1) * kBlock <= K ? x + b * kBlock : tail;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = load8(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float scale = _mm_cvtss_f32(m4) / 127.f;
    const __m256 inverse = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    __m256i i32[4];
    for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
    // int32 -> int16 -> int8 packs interleave 128-bit lanes; the permute puts the 32 bytes back in order.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    scales[b] = scale;
    sums[b] = scale * static_cast<float>(hsum256_epi32(total)) * 0.125f;
  }
  for (int64_t b = blocks; b < padded_K / kBlock; ++b) {  // padding: contributes nothing
    std::memset(q + b * kBlock, 0, kBlock);
    scales[b] = sums[b] = 0.f;
  }
}

// The calling thread's scratch space for quantized activations: reused, so that a decode step allocates nothing.
struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> scales, sums;
};

inline Activations quantize_activations(const torch::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), padded_K = (K + 63) / 64 * 64;
  const int64_t blocks = padded_K / kBlock;
  thread_local Scratch scratch;
  scratch.q.resize(M * padded_K);
  scratch.scales.resize(M * blocks);
  scratch.sums.resize(M * blocks);
  Activations a{M, K, padded_K, scratch.q.data(), scratch.scales.data(), scratch.sums.data()};
  int8_t* q = scratch.q.data();
  float *scales = scratch.scales.data(), *sums = scratch.sums.data();
  const bool is_float = x.scalar_type() == torch::kFloat;
  const void* data = x.data_ptr();
  // Rows are cheap to quantize: threads only pay off for a prompt's many rows.
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (is_float) {
        quantize_row(static_cast<const float*>(data) + m * K, K, padded_K, q + m * padded_K, scales + m * blocks,
                     sums + m * blocks);
      } else {
        quantize_row(static_cast<const c10::BFloat16*>(data) + m * K, K, padded_K, q + m * padded_K,
                     scales + m * blocks, sums + m * blocks);
      }
    }
  });
  return a;
}

inline void check_activations(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x: float32 or bfloat16 [M, K] contiguous");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
}

}  // namespace llminfer
