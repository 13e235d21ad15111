// AVX2 helpers shared by the kernels (AVX2 is their minimum; each is compiled for that target).
#pragma once

#include <immintrin.h>

#include <cstdint>

#define AVX2_TARGET "avx2,fma,f16c"

namespace llminfer {

// 8 float32 from float32 or from bfloat16 bits (bfloat16 is the top half of a float32).
__attribute__((target(AVX2_TARGET))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target(AVX2_TARGET))) inline __m256 load8_bf16(const void* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

__attribute__((target(AVX2_TARGET))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Eight float32 as bfloat16 bits in the low halves of the lanes: the same rounding as bf16_bits.
__attribute__((target(AVX2_TARGET))) inline __m256i bf16_rounded(const float* p) {
  const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(p));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
}

}  // namespace llminfer
