// The small ops of a decode step, fused so that each is one pass over its data and one call from Python:
// RMSNorm (with the residual add before it), SiLU/GELU-and-mul, rotary embedding, storing keys/values in their
// paged blocks (quantized for an int8 cache), and decode attention that reads the blocks in place.
//
// Each keeps its reference's rounding (llminfer/ops/*.py): arithmetic in float32, results rounded to the
// tensor's dtype where the reference rounds. The loops are plain C++ compiled for AVX2 (the kernels' minimum),
// which the compiler vectorizes; none of them is bound by arithmetic.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "step_graph.h"
#include "vector.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#define VECTOR_TARGET __attribute__((target(AVX2_TARGET)))

namespace {

using bf16 = uint16_t;  // bfloat16 as its bits

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;  // bfloat16 is the top half of a float32
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline bf16 from_float<bf16>(float v) {  // round to nearest even, as torch's conversion
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if (std::isnan(v)) return 0x7fc0;
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<bf16>(bits >> 16);
}

// What the reference computes in x's dtype: float32 math rounded to it (a no-op for float32).
template <typename T> inline float rounded(float v) { return to_float(from_float<T>(v)); }

template <typename F>
void for_dtype(const torch::Tensor& t, F&& body) {
  if (t.scalar_type() == torch::kFloat) {
    body(float{});
  } else {
    TORCH_CHECK(t.scalar_type() == torch::kBFloat16, "expected float32 or bfloat16, got ", t.scalar_type());
    body(bf16{});
  }
}

template <typename T> T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, ": [T, H] with contiguous rows");
}

// An output a kernel writes into: contiguous, of the shape and dtype it computes.
void check_output(const torch::Tensor& out, at::IntArrayRef sizes, torch::ScalarType dtype, const char* name) {
  TORCH_CHECK(out.sizes() == sizes && out.scalar_type() == dtype && out.is_contiguous(), name, ": expected ",
              dtype, " ", sizes, " contiguous, got ", out.scalar_type(), " ", out.sizes());
}

// 8 cached values as float32: a float, bfloat16 or int8 cache.
using llminfer::hsum;
using llminfer::load8;
VECTOR_TARGET inline __m256 load8(const bf16* p) { return llminfer::load8_bf16(p); }
VECTOR_TARGET inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float scalar(float v) { return v; }
inline float scalar(bf16 v) { return to_float(v); }
inline float scalar(int8_t v) { return static_cast<float>(v); }


// 8 floats rounded to T and back (bfloat16: round to nearest even on the bits), as the reference's dtype rounds.
VECTOR_TARGET inline __m256 round_as(__m256 v, float) { return v; }
VECTOR_TARGET inline __m256 round_as(__m256 v, bf16) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
  return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
VECTOR_TARGET inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
VECTOR_TARGET inline void store8(bf16* p, __m256 v) {  // v already rounded: keep the top halves
  const __m256i top = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// e^x for 8 floats (Cephes' expf: 2^n times a degree-6 polynomial on |r| <= ln2 / 2; ~1 ulp), x clamped to
// [-87, 88] so that 2^n stays a normal float.
VECTOR_TARGET inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_to_n));
}

// ---- RMSNorm ------------------------------------------------------------------------------------------------

// y = w * round(x / rms(x)), as the reference: the normalized row in x's dtype, then the product in it.
template <typename T>
VECTOR_TARGET void norm_row(const T* x, const T* w, T* y, int64_t H, float eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < H; ++i) squares += to_float(x[i]) * to_float(x[i]);
  const float inverse_rms = 1.f / std::sqrt(squares / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) y[i] = from_float<T>(to_float(w[i]) * rounded<T>(to_float(x[i]) * inverse_rms));
}

void rms_norm_out(const torch::Tensor& x, const torch::Tensor& weight, double eps, const torch::Tensor& y) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1),
              "weight: [H] contiguous, in x's dtype");
  check_output(y, x.sizes(), x.scalar_type(), "y");
  const int64_t T = x.size(0), H = x.size(1), stride = x.stride(0);
  for_dtype(x, [&](auto tag) {
    using E = decltype(tag);
    const E *xp = ptr<E>(x), *wp = ptr<E>(weight);
    E* yp = ptr<E>(y);
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) norm_row(xp + t * stride, wp, yp + t * H, H, static_cast<float>(eps));
    });
  });
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  auto y = torch::empty(x.sizes(), x.options());
  rms_norm_out(x, weight, eps, y);
  return y;
}

// (rms_norm(x + residual), x + residual), the sum rounded to x's dtype first as the reference's add does.
template <typename T>
VECTOR_TARGET void add_row(const T* x, const T* residual, T* sum, int64_t H) {
  for (int64_t i = 0; i < H; ++i) sum[i] = from_float<T>(to_float(x[i]) + to_float(residual[i]));
}

void add_rms_norm_out(const torch::Tensor& x, const torch::Tensor& residual, const torch::Tensor& weight, double eps,
                      const torch::Tensor& y, const torch::Tensor& sum) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual: the shape and dtype of x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1),
              "weight: [H] contiguous, in x's dtype");
  check_output(y, x.sizes(), x.scalar_type(), "y");
  check_output(sum, x.sizes(), x.scalar_type(), "sum");
  const int64_t T = x.size(0), H = x.size(1);
  for_dtype(x, [&](auto tag) {
    using E = decltype(tag);
    const E *xp = ptr<E>(x), *rp = ptr<E>(residual), *wp = ptr<E>(weight);
    E *yp = ptr<E>(y), *sp = ptr<E>(sum);
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        add_row(xp + t * x.stride(0), rp + t * residual.stride(0), sp + t * H, H);
        norm_row(sp + t * H, wp, yp + t * H, H, static_cast<float>(eps));
      }
    });
  });
}

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& residual,
                                                      const torch::Tensor& weight, double eps) {
  auto y = torch::empty(x.sizes(), x.options()), sum = torch::empty(x.sizes(), x.options());
  add_rms_norm_out(x, residual, weight, eps, y, sum);
  return {y, sum};
}

// ---- gated activations --------------------------------------------------------------------------------------

// round(act(gate)) * up, rounded: the reference's two ops in x's dtype. SiLU g / (1 + e^-g); GELU with tanh,
// tanh(y) = 1 - 2 / (e^2y + 1).
template <typename T, bool Gelu>
VECTOR_TARGET inline __m256 gated8(__m256 g, __m256 up) {
  const __m256 one = _mm256_set1_ps(1.f);
  __m256 a;
  if (Gelu) {
    const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g), _mm256_mul_ps(g, g), g));
    const __m256 tanh = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f),
                                                         _mm256_add_ps(exp8(_mm256_add_ps(y, y)), one)));
    a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(one, tanh));
  } else {
    a = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  }
  return round_as(_mm256_mul_ps(round_as(a, T{}), up), T{});
}

template <typename T, bool Gelu>
VECTOR_TARGET void gated_row(const T* gate, const T* up, T* y, int64_t I) {
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) store8(y + i, gated8<T, Gelu>(load8(gate + i), load8(up + i)));
  for (; i < I; ++i) {  // the tail, one at a time through the same arithmetic
    float g[8] = {to_float(gate[i])}, u[8] = {to_float(up[i])}, out[8];
    _mm256_storeu_ps(out, gated8<T, Gelu>(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
    y[i] = from_float<T>(out[0]);
  }
}

void gated_activation(const torch::Tensor& gate_up, bool gelu, const torch::Tensor& y) {
  check_rows(gate_up, "gate_up");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up: an even number of columns");
  check_output(y, {T, I}, gate_up.scalar_type(), "y");
  for_dtype(gate_up, [&](auto tag) {
    using E = decltype(tag);
    const E* gp = ptr<E>(gate_up);
    E* yp = ptr<E>(y);
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const E* row = gp + t * gate_up.stride(0);
        gelu ? gated_row<E, true>(row, row + I, yp + t * I, I) : gated_row<E, false>(row, row + I, yp + t * I, I);
      }
    });
  });
}

void silu_and_mul_out(const torch::Tensor& gate_up, const torch::Tensor& y) { gated_activation(gate_up, false, y); }
void gelu_tanh_and_mul_out(const torch::Tensor& gate_up, const torch::Tensor& y) { gated_activation(gate_up, true, y); }

torch::Tensor gated_activation(const torch::Tensor& gate_up, bool gelu) {
  auto y = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  gated_activation(gate_up, gelu, y);
  return y;
}

torch::Tensor silu_and_mul(const torch::Tensor& gate_up) { return gated_activation(gate_up, false); }
torch::Tensor gelu_tanh_and_mul(const torch::Tensor& gate_up) { return gated_activation(gate_up, true); }

// ---- rotary embedding ---------------------------------------------------------------------------------------

// Rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), per head of each token.
template <typename T>
VECTOR_TARGET void rotate_head(const T* x, const float* cos, const float* sin, T* y, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    y[i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
    y[i + half] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

void rotary_embedding_out(const torch::Tensor& positions, const torch::Tensor& x, const torch::Tensor& cos,
                          const torch::Tensor& sin, const torch::Tensor& y) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x: [T, H, D] with contiguous heads");
  TORCH_CHECK(positions.scalar_type() == torch::kLong && positions.dim() == 1 && positions.numel() == x.size(0),
              "positions: int64 [T]");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.sizes() == sin.sizes() && cos.size(1) * 2 == x.size(2),
              "cos, sin: float32 [P, D/2] contiguous");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  check_output(y, {T, H, D}, x.scalar_type(), "y");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "position ", pos[t], " is outside the rotary table (",
                cos.size(0), " positions)");
  }
  for_dtype(x, [&](auto tag) {
    using E = decltype(tag);
    const E* xp = ptr<E>(x);
    E* yp = ptr<E>(y);
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float *c = cos.data_ptr<float>() + pos[t] * half, *s = sin.data_ptr<float>() + pos[t] * half;
        for (int64_t h = 0; h < H; ++h) rotate_head(xp + t * x.stride(0) + h * D, c, s, yp + (t * H + h) * D, half);
      }
    });
  });
}

torch::Tensor rotary_embedding(const torch::Tensor& positions, const torch::Tensor& x, const torch::Tensor& cos,
                               const torch::Tensor& sin) {
  auto y = torch::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  rotary_embedding_out(positions, x, cos, sin, y);
  return y;
}

// ---- paged KV cache -----------------------------------------------------------------------------------------

// Caches are [num_blocks, Hkv, block_size, D]; an int8 cache has float32 scales [num_blocks, Hkv, block_size, 1].
struct CacheView {
  int64_t heads, block_size, D;
  explicit CacheView(const torch::Tensor& cache) : heads(cache.size(1)), block_size(cache.size(2)), D(cache.size(3)) {}
  int64_t vector_index(int64_t block, int64_t head, int64_t offset) const {
    return (block * heads + head) * block_size + offset;
  }
};

void check_cache(const torch::Tensor& cache, const c10::optional<torch::Tensor>& scales, const char* name) {
  TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous(), name, ": [num_blocks, Hkv, block_size, D] contiguous");
  if (scales.has_value()) {
    TORCH_CHECK(cache.scalar_type() == torch::kChar, name, ": an int8 cache with scales");
    TORCH_CHECK(scales->scalar_type() == torch::kFloat && scales->is_contiguous() &&
                    scales->numel() == cache.numel() / cache.size(3),
                name, " scales: float32 [num_blocks, Hkv, block_size, 1]");
  }
}

// One head vector into its slot: copied, or quantized (absmax / 127 per vector, as quantize_kv).
template <typename T, typename C>
VECTOR_TARGET void store_vector(const T* v, C* slot, float* scale, int64_t D) {
  if constexpr (std::is_same_v<C, int8_t>) {
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(to_float(v[i])));
    const float s = std::max(amax / 127.f, 1e-8f);
    for (int64_t i = 0; i < D; ++i) {
      slot[i] = static_cast<int8_t>(std::clamp(std::nearbyint(to_float(v[i]) / s), -127.f, 127.f));
    }
    *scale = s;
  } else {
    std::memcpy(slot, v, D * sizeof(T));
  }
}

void write_kv(torch::Tensor key_cache, torch::Tensor value_cache, const c10::optional<torch::Tensor>& key_scales,
              const c10::optional<torch::Tensor>& value_scales, const torch::Tensor& slot_blocks,
              const torch::Tensor& slot_offsets, const torch::Tensor& k, const torch::Tensor& v) {
  check_cache(key_cache, key_scales, "key_cache");
  check_cache(value_cache, value_scales, "value_cache");
  const int64_t T = k.size(0), heads = key_cache.size(1), D = key_cache.size(3);
  TORCH_CHECK(slot_blocks.scalar_type() == torch::kLong && slot_offsets.scalar_type() == torch::kLong &&
                  slot_blocks.numel() == T && slot_offsets.numel() == T && slot_blocks.is_contiguous() &&
                  slot_offsets.is_contiguous(),
              "slot_blocks, slot_offsets: int64 [T] contiguous");
  const int64_t *blocks = slot_blocks.data_ptr<int64_t>(), *offsets = slot_offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(blocks[t] >= 0 && blocks[t] < key_cache.size(0) && offsets[t] >= 0 && offsets[t] < key_cache.size(2),
                "slot (", blocks[t], ", ", offsets[t], ") is outside the cache");
  }
  for (auto* pair : {&k, &v}) {
    const torch::Tensor& t = *pair;
    TORCH_CHECK(t.dim() == 3 && t.size(1) == heads && t.size(2) == D && t.stride(2) == 1 && t.stride(1) == D,
                "k, v: [T, Hkv, D] with contiguous heads");
  }
  auto store = [&](torch::Tensor& cache, const c10::optional<torch::Tensor>& scales, const torch::Tensor& values) {
    const CacheView view(cache);
    for_dtype(values, [&](auto tag) {
      using E = decltype(tag);
      const E* src = ptr<E>(values);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t index = view.vector_index(blocks[t], h, offsets[t]);
          const E* vec = src + t * values.stride(0) + h * D;
          if (scales.has_value()) {
            store_vector(vec, cache.data_ptr<int8_t>() + index * D, scales->data_ptr<float>() + index, D);
          } else {
            TORCH_CHECK(cache.scalar_type() == values.scalar_type(), "a float cache holds the keys' dtype");
            store_vector(vec, ptr<E>(cache) + index * D, nullptr, D);
          }
        }
      }
    });
  };
  store(key_cache, key_scales, k);
  store(value_cache, value_scales, v);
}

// ---- decode attention ---------------------------------------------------------------------------------------

template <typename C>
VECTOR_TARGET inline float dot(const float* q, const C* k, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), acc1);
  }
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < D; ++i) sum += q[i] * scalar(k[i]);
  return sum;
}

// out += weight * v
template <typename C>
VECTOR_TARGET inline void add_scaled(float* out, const C* v, float weight, int64_t D) {
  const __m256 w = _mm256_set1_ps(weight);
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(w, load8(v + i), _mm256_loadu_ps(out + i)));
  for (; i < D; ++i) out[i] += weight * scalar(v[i]);
}

// One sequence, one KV head, its G query heads: scores for every visible position, softmax, weighted values.
template <typename Q, typename C>
VECTOR_TARGET void attend(const Q* q, int64_t q_head_stride, const C* keys, const C* values, const float* key_scales,
                          const float* value_scales, const CacheView& view, const int64_t* table, int64_t head,
                          int64_t first, int64_t length, int64_t G, float scale, Q* out, std::vector<float>& work) {
  const int64_t D = view.D, span = length - first;
  work.resize(G * (D + span));
  float* qf = work.data();         // [G, D] the queries in float32
  float* scores = qf + G * D;      // [G, span]
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) qf[g * D + i] = to_float(q[g * q_head_stride + i]);
  // Positions block by block: a block's [block_size, D] vectors of this head are contiguous, and no division per
  // position is needed to find them.
  auto for_each_position = [&](auto&& body) {
    for (int64_t p = first; p < length;) {
      const int64_t block = p / view.block_size, offset = p % view.block_size;
      const int64_t base = view.vector_index(table[block], head, 0);
      const int64_t end = std::min(length, p - offset + view.block_size);
      for (int64_t index = base + offset; p < end; ++p, ++index) body(p - first, index);
    }
  };
  for_each_position([&](int64_t j, int64_t index) {
    const float k_scale = (key_scales ? key_scales[index] : 1.f) * scale;
    for (int64_t g = 0; g < G; ++g) scores[g * span + j] = dot(qf + g * D, keys + index * D, D) * k_scale;
  });
  std::vector<float> acc(D);
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * span;
    const float top = *std::max_element(s, s + span);
    float total = 0.f;
    int64_t j = 0;
    for (; j + 8 <= span; j += 8) _mm256_storeu_ps(s + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(top))));
    for (; j < span; ++j) s[j] = std::exp(s[j] - top);
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < span; ++j) total += s[j];
    std::fill(acc.begin(), acc.end(), 0.f);
    for_each_position([&](int64_t j, int64_t index) {
      add_scaled(acc.data(), values + index * D, s[j] * (value_scales ? value_scales[index] : 1.f), D);
    });
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = from_float<Q>(acc[i] / total);
  }
}

// Ask for the keys and values of the chunk after the one at p (the next positions of this head, maybe in
// another block) while this one is computed: a jump to another block is one the hardware prefetcher cannot
// follow. Worth 1-7% at batch 64, context 140-256 on a Zen 3 host (the kernel is bound by its arithmetic there).
template <typename C>
inline void prefetch_next_chunk(const C* keys, const C* values, const CacheView& view, const int64_t* table,
                                int64_t head, int64_t p, int64_t length, int64_t chunk) {
  if (p >= length) return;
  const int64_t offset = p % view.block_size;
  const int64_t n = std::min({chunk, length - p, view.block_size - offset});
  const int64_t index = view.vector_index(table[p / view.block_size], head, offset);
  const char* k = reinterpret_cast<const char*>(keys + index * view.D);
  const char* v = reinterpret_cast<const char*>(values + index * view.D);
  for (int64_t byte = 0; byte < n * view.D * static_cast<int64_t>(sizeof(C)); byte += 64) {
    _mm_prefetch(k + byte, _MM_HINT_T0);
    _mm_prefetch(v + byte, _MM_HINT_T0);
  }
}

// ---- decode attention, AVX2: one pass over the history, 8 positions at a time --------------------------------
//
// The two-pass kernel above computes every score with a horizontal sum and reads the values once per query head
// (at batch 64 it was the largest op of a decode step on an AVX2 host). Here the history goes by chunks of up to
// 8 positions (never across a cache block): each query head's 8 dot products are summed across lanes together
// (a horizontal-add tree: 8 instructions for 8 sums), the softmax runs online, and keys and values are
// converted to float32 in registers as they are multiplied, never copied. bfloat16 converts in one instruction
// per 8 values if the lanes are taken in their own order (the even elements of 16, then the odd ones), so the
// queries and the accumulated values are kept in that order and put back at the end.

// The c-th 8 float32 lanes of a stored head vector, and which element of the vector a lane holds.
template <typename C> struct Lanes;
template <> struct Lanes<float> {
  VECTOR_TARGET static __m256 vec(const float* v, int c) { return _mm256_loadu_ps(v + 8 * c); }
  static int64_t element(int64_t lane) { return lane; }
};
template <> struct Lanes<int8_t> {
  VECTOR_TARGET static __m256 vec(const int8_t* v, int c) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + 8 * c))));
  }
  static int64_t element(int64_t lane) { return lane; }
};
template <> struct Lanes<bf16> {  // vector 2h: elements 16h, 16h+2, ..., 16h+14; vector 2h+1: the odd ones
  VECTOR_TARGET static __m256 vec(const bf16* v, int c) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * (c / 2)));
    return _mm256_castsi256_ps(c % 2 == 0 ? _mm256_slli_epi32(bits, 16)
                                          : _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static int64_t element(int64_t lane) { return 16 * (lane / 16) + 2 * (lane % 8) + (lane / 8) % 2; }
};

constexpr int64_t kChunk8 = 8;

VECTOR_TARGET inline __m256 sum8(const float* rows) {  // lane j: the sum of the 8 floats of row j ([8, 8])
  __m256 row[8];
  for (int j = 0; j < 8; ++j) row[j] = _mm256_loadu_ps(rows + 8 * j);
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(row[0], row[1]), _mm256_hadd_ps(row[2], row[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(row[4], row[5]), _mm256_hadd_ps(row[6], row[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

VECTOR_TARGET inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// NV: D / 8, a constant so that the loops over a vector unroll.
template <int NV, typename Q, typename C>
VECTOR_TARGET void attend_avx2(const Q* q, int64_t q_head_stride, const C* keys, const C* values,
                               const float* key_scales, const float* value_scales, const CacheView& view,
                               const int64_t* table, int64_t head, int64_t first, int64_t length, int64_t G,
                               float scale, Q* out, std::vector<float>& work) {
  constexpr int64_t D = 8 * NV;
  using L = Lanes<C>;
  work.assign(2 * G * D + G * kChunk8 * 8 + G * kChunk8 + 2 * G, 0.f);
  float* qf = work.data();                     // [G, D] the queries in float32, in the lanes' order
  float* acc = qf + G * D;                     // [G, D] their weighted values so far, in the lanes' order
  float* partial = acc + G * D;                // [G, 8, 8] each position's products, summed to 8 lanes
  float* probs = partial + G * kChunk8 * 8;    // [G, 8] the chunk's softmax weights times the value scales
  float* running_max = probs + G * kChunk8;    // [G]
  float* running_sum = running_max + G;        // [G]
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < D; ++i) qf[g * D + i] = to_float(q[g * q_head_stride + L::element(i)]);
    running_max[g] = -std::numeric_limits<float>::infinity();
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  alignas(32) float k_scales[kChunk8], v_scales[kChunk8];
  for (int64_t p = first; p < length;) {
    const int64_t offset = p % view.block_size, block_end = p - offset + view.block_size;
    const int64_t n = std::min({kChunk8, length - p, block_end - p});
    const int64_t index = view.vector_index(table[p / view.block_size], head, offset);
    prefetch_next_chunk(keys, values, view, table, head, p + n, length, kChunk8);
    for (int64_t j = 0; j < kChunk8; ++j) {
      k_scales[j] = j < n ? (key_scales ? key_scales[index + j] : 1.f) * scale : 0.f;
      v_scales[j] = j < n && value_scales ? value_scales[index + j] : 1.f;
    }
    for (int64_t j = 0; j < n; ++j) {
      const C* key = keys + (index + j) * D;
      for (int64_t g = 0; g < G; ++g) {
        __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  // two chains of FMAs
        for (int c = 0; c < NV; c += 2) {
          even = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + 8 * c), L::vec(key, c), even);
          odd = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + 8 * (c + 1)), L::vec(key, c + 1), odd);
        }
        _mm256_storeu_ps(partial + (g * kChunk8 + j) * 8, _mm256_add_ps(even, odd));
      }
    }
    const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane));
    for (int64_t g = 0; g < G; ++g) {  // rows of partial past n are stale: their lanes are masked
      const __m256 scores = _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                                             _mm256_mul_ps(sum8(partial + g * kChunk8 * 8), _mm256_load_ps(k_scales)),
                                             valid);
      const float top = std::max(running_max[g], max8(scores));
      const float rescale = std::exp(running_max[g] - top);  // 0 for the first chunk (the maximum was -inf)
      const __m256 weights = _mm256_and_ps(valid, exp8(_mm256_sub_ps(scores, _mm256_set1_ps(top))));
      running_sum[g] = running_sum[g] * rescale + hsum(weights);
      running_max[g] = top;
      _mm256_storeu_ps(probs + g * kChunk8, _mm256_mul_ps(weights, _mm256_load_ps(v_scales)));
      // Up to 8 accumulators at a time, the positions inner: independent FMAs, not one chain per vector.
      constexpr int kGroup = NV < 8 ? NV : 8;
      for (int c0 = 0; c0 < NV; c0 += kGroup) {
        __m256 a[kGroup];
        for (int c = 0; c < kGroup; ++c)
          a[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + g * D + 8 * (c0 + c)), _mm256_set1_ps(rescale));
        for (int64_t j = 0; j < n; ++j) {
          const __m256 weight = _mm256_set1_ps(probs[g * kChunk8 + j]);
          const C* value = values + (index + j) * D;
          for (int c = 0; c < kGroup; ++c) a[c] = _mm256_fmadd_ps(weight, L::vec(value, c0 + c), a[c]);
        }
        for (int c = 0; c < kGroup; ++c) _mm256_storeu_ps(acc + g * D + 8 * (c0 + c), a[c]);
      }
    }
    p += n;
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) out[g * D + L::element(i)] = from_float<Q>(acc[g * D + i] / running_sum[g]);
}

// ---- decode attention, AVX-512: one pass over the history, 16 positions at a time ----------------------------
//
// The chunked AVX2 kernel above on 16 lanes: a chunk of up to 16 positions, each query head's 16 dot products
// summed across lanes together (a transpose-and-add tree: 45 instructions for 16 sums instead of ~8 each), the
// softmax online, keys and values read once for all G heads.

#define AVX512_VECTOR_TARGET __attribute__((target(AVX2_TARGET ",avx512f,avx512bw,avx512vl,avx512dq")))

constexpr int64_t kChunk = 16;  // positions per step: one score per lane

AVX512_VECTOR_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512_VECTOR_TARGET inline __m512 load16(const bf16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
AVX512_VECTOR_TARGET inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// exp8's polynomial on 16 lanes.
AVX512_VECTOR_TARGET inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  const __m512i two_to_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(two_to_n));
}

// r[j] = the sum of v[j]'s 16 lanes. Pairs of vectors fold within 128-bit lanes (unpack ps, then pd), which
// leaves, for each group of 4 vectors, one vector whose lane L holds their 4 sums over lane L; two 128-bit
// shuffles then add the lanes up, in order.
AVX512_VECTOR_TARGET inline __m512 fold_lanes(__m512 a, __m512 b) {  // [a0+a1, a2+a3, b0+b1, b2+b3] by 128 bits
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

AVX512_VECTOR_TARGET inline __m512 sum16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  return fold_lanes(fold_lanes(quads[0], quads[1]), fold_lanes(quads[2], quads[3]));
}

// NV: D / 16, a constant so that the loops over a vector unroll and its registers stay registers.
template <int NV, typename Q, typename C>
AVX512_VECTOR_TARGET void attend_avx512(const Q* q, int64_t q_head_stride, const C* keys, const C* values,
                                        const float* key_scales, const float* value_scales, const CacheView& view,
                                        const int64_t* table, int64_t head, int64_t first, int64_t length, int64_t G,
                                        float scale, Q* out, std::vector<float>& work) {
  constexpr int64_t D = 16 * NV;
  work.resize(2 * G * D + 2 * kChunk * D + 2 * G);
  float* qf = work.data();             // [G, D] the queries in float32
  float* acc = qf + G * D;             // [G, D] their weighted values so far
  float* chunk_keys = acc + G * D;     // [16, D] the chunk in float32, dequantized and scaled
  float* chunk_values = chunk_keys + kChunk * D;
  float* running_max = chunk_values + kChunk * D;  // [G]
  float* running_sum = running_max + G;            // [G]
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < D; ++i) qf[g * D + i] = to_float(q[g * q_head_stride + i]);
    running_max[g] = -std::numeric_limits<float>::infinity();
    running_sum[g] = 0.f;
  }
  std::fill(acc, acc + G * D, 0.f);
  alignas(64) float probs[kChunk];
  for (int64_t p = first; p < length;) {
    const int64_t offset = p % view.block_size, block_end = p - offset + view.block_size;
    const int64_t n = std::min({kChunk, length - p, block_end - p});
    const int64_t index = view.vector_index(table[p / view.block_size], head, offset);
    for (int64_t j = 0; j < n; ++j) {
      const __m512 k_scale = _mm512_set1_ps((key_scales ? key_scales[index + j] : 1.f) * scale);
      const __m512 v_scale = _mm512_set1_ps(value_scales ? value_scales[index + j] : 1.f);
      for (int64_t c = 0; c < NV; ++c) {
        _mm512_storeu_ps(chunk_keys + j * D + 16 * c, _mm512_mul_ps(load16(keys + (index + j) * D + 16 * c), k_scale));
        _mm512_storeu_ps(chunk_values + j * D + 16 * c,
                         _mm512_mul_ps(load16(values + (index + j) * D + 16 * c), v_scale));
      }
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t g = 0; g < G; ++g) {
      __m512 query[NV], dots[kChunk];
      for (int c = 0; c < NV; ++c) query[c] = _mm512_loadu_ps(qf + g * D + 16 * c);
      for (int64_t j = 0; j < kChunk; ++j) {  // past n the chunk's rows are stale: their lanes are masked below
        __m512 d = _mm512_setzero_ps();
        for (int c = 0; c < NV; ++c) d = _mm512_fmadd_ps(query[c], _mm512_loadu_ps(chunk_keys + j * D + 16 * c), d);
        dots[j] = d;
      }
      const __m512 scores = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid,
                                               sum16(dots));
      const float top = std::max(running_max[g], _mm512_reduce_max_ps(scores));
      const float rescale = std::exp(running_max[g] - top);  // 0 for the first chunk (the maximum was -inf)
      const __m512 weights = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(top))));
      running_sum[g] = running_sum[g] * rescale + _mm512_reduce_add_ps(weights);
      running_max[g] = top;
      _mm512_store_ps(probs, weights);
      for (int64_t c = 0; c < NV; ++c) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(acc + g * D + 16 * c), _mm512_set1_ps(rescale));
        for (int64_t j = 0; j < n; ++j)
          a = _mm512_fmadd_ps(_mm512_set1_ps(probs[j]), _mm512_loadu_ps(chunk_values + j * D + 16 * c), a);
        _mm512_storeu_ps(acc + g * D + 16 * c, a);
      }
    }
    p += n;
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = from_float<Q>(acc[g * D + i] / running_sum[g]);
}

template <typename Q, typename C>
using AttendFn = void (*)(const Q*, int64_t, const C*, const C*, const float*, const float*, const CacheView&,
                          const int64_t*, int64_t, int64_t, int64_t, int64_t, float, Q*, std::vector<float>&);

// The kernel for this head size and instruction set (AVX2 is the kernels' minimum).
template <typename Q, typename C>
AttendFn<Q, C> attend_for(bool avx512, int64_t D) {
  if (avx512 && D == 64) return attend_avx512<4, Q, C>;
  if (avx512 && D == 128) return attend_avx512<8, Q, C>;
  if (avx512 && D == 256) return attend_avx512<16, Q, C>;
  if (D == 64) return attend_avx2<8, Q, C>;
  if (D == 128) return attend_avx2<16, Q, C>;
  if (D == 256) return attend_avx2<32, Q, C>;
  return attend<Q, C>;  // other head sizes: two passes
}

bool use_avx512_attention(const std::string& isa, int64_t D) {
  TORCH_CHECK(isa == "auto" || isa == "avx512" || isa == "avx2", "unknown instruction set '", isa, "'");
  __builtin_cpu_init();
  static const bool has_512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  TORCH_CHECK(isa != "avx512" || has_512, "this CPU has no AVX-512");
  return isa != "avx2" && has_512 && (D == 64 || D == 128 || D == 256);
}

void paged_decode_attention_out(const torch::Tensor& q, const torch::Tensor& key_cache,
                                const torch::Tensor& value_cache, const c10::optional<torch::Tensor>& key_scales,
                                const c10::optional<torch::Tensor>& value_scales, const torch::Tensor& block_tables,
                                const torch::Tensor& lengths, double scale, c10::optional<int64_t> sliding_window,
                                const std::string& isa, const torch::Tensor& out) {
  check_cache(key_cache, key_scales, "key_cache");
  check_cache(value_cache, value_scales, "value_cache");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q: [B, Hq, D] with contiguous heads");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = key_cache.size(1), bs = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D && Hq % Hkv == 0, "q heads ", Hq, " x ", D, " do not match the cache's ", Hkv,
              " x ", key_cache.size(3));
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && block_tables.dim() == 2 && block_tables.size(0) == B &&
                  block_tables.stride(1) == 1,
              "block_tables: int64 [B, nb]");
  TORCH_CHECK(lengths.scalar_type() == torch::kLong && lengths.dim() == 1 && lengths.numel() == B &&
                  lengths.is_contiguous(),
              "context_lens: int64 [B], one length per sequence");
  const int64_t* context_lens = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(context_lens[b] >= 1 && context_lens[b] <= block_tables.size(1) * bs, "sequence ", b, ": length ",
                context_lens[b], " does not fit its ", block_tables.size(1), " blocks");
    const int64_t* table = block_tables.data_ptr<int64_t>() + b * block_tables.stride(0);
    for (int64_t j = 0; j < (context_lens[b] + bs - 1) / bs; ++j) {
      TORCH_CHECK(table[j] >= 0 && table[j] < key_cache.size(0), "sequence ", b, ": block ", table[j],
                  " is outside the cache");
    }
  }
  const int64_t G = Hq / Hkv;
  const bool avx512 = use_avx512_attention(isa, D);
  check_output(out, {B, Hq, D}, q.scalar_type(), "out");
  const CacheView keys(key_cache);
  const float* ks = key_scales ? key_scales->data_ptr<float>() : nullptr;
  const float* vs = value_scales ? value_scales->data_ptr<float>() : nullptr;
  for_dtype(q, [&](auto qtag) {
    using QT = decltype(qtag);
    auto run = [&](auto ctag) {
      using CT = decltype(ctag);
      const CT *kp = reinterpret_cast<const CT*>(key_cache.data_ptr()), *vp = reinterpret_cast<const CT*>(value_cache.data_ptr());
      at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> work;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / Hkv, h = task % Hkv, length = context_lens[b];
          const int64_t first = sliding_window ? std::max<int64_t>(0, length - *sliding_window) : 0;
          attend_for<QT, CT>(avx512, D)(
              ptr<QT>(q) + b * q.stride(0) + h * G * D, D, kp, vp, ks, vs, keys,
              block_tables.data_ptr<int64_t>() + b * block_tables.stride(0), h, first, length, G,
              static_cast<float>(scale), ptr<QT>(out) + (b * Hq + h * G) * D, work);
        }
      });
    };
    if (key_scales.has_value()) {
      run(int8_t{});
    } else {
      TORCH_CHECK(key_cache.scalar_type() == q.scalar_type(), "a float cache holds q's dtype");
      run(QT{});
    }
  });
}

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& key_cache,
                                     const torch::Tensor& value_cache, const c10::optional<torch::Tensor>& key_scales,
                                     const c10::optional<torch::Tensor>& value_scales,
                                     const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                                     double scale, c10::optional<int64_t> sliding_window, const std::string& isa) {
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  paged_decode_attention_out(q, key_cache, value_cache, key_scales, value_scales, block_tables, context_lens, scale,
                             sliding_window, isa, out);
  return out;
}

}  // namespace

void register_decode_ops(pybind11::module& m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("gelu_tanh_and_mul", &gelu_tanh_and_mul);
  m.def("rotary_embedding", &rotary_embedding);
  m.def("write_kv", &write_kv);
  m.def("paged_decode_attention", &paged_decode_attention);
  using llminfer::node_factory;
  using llminfer::register_graph_kernel;
  register_graph_kernel("rms_norm", node_factory(&rms_norm_out));
  register_graph_kernel("add_rms_norm", node_factory(&add_rms_norm_out));
  register_graph_kernel("silu_and_mul", node_factory(&silu_and_mul_out));
  register_graph_kernel("gelu_tanh_and_mul", node_factory(&gelu_tanh_and_mul_out));
  register_graph_kernel("rotary_embedding", node_factory(&rotary_embedding_out));
  register_graph_kernel("write_kv", node_factory(&write_kv));
  register_graph_kernel("paged_decode_attention", node_factory(&paged_decode_attention_out));
}
