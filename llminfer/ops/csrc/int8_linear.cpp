// int8-weight linear for small batches (decode): y[m, n] = sum_k x[m, k] * q[n, k] * scale[n].
//
// As llama.cpp does for Q8_0: each row of x is quantized to int8 in blocks of 32 with one float scale per block
// (|x| max / 127), the int8 x int8 products are summed exactly in int32 per block, and each block's sum is scaled
// by its activation scale; the weight's per-row scale is applied once at the end. The signed x signed byte
// product uses the usual identity x * w = |x| * (sign(x) * w) so that the unsigned x signed instructions apply
// (AVX2 vpmaddubsw + vpmaddwd; VNNI vpdpbusd does both in one); values stay in [-127, 127], so no sign flip
// overflows. Weights are read in their checkpoint layout ([N, K] int8, one row after another).
//
// Instruction sets are chosen at run time: every kernel below is compiled for its own target (GCC target
// attributes), and `isa` names the one to use ("avx512_vnni", "avx_vnni", "avx2"; "auto" = the best the CPU has).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace {

constexpr int64_t kBlock = 32;

// x[K] float -> q[K] int8 and one scale per block of 32.
void quantize_row(const float* x, int64_t K, int8_t* q, float* scales) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float scale = amax / 127.f;
    const float inverse = scale > 0.f ? 1.f / scale : 0.f;
    for (int64_t i = 0; i < kBlock; ++i) q[b * kBlock + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inverse));
    scales[b] = scale;
  }
}

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One block's int32 dot product of 32 signed bytes, as 8 int32 lanes: |x| (unsigned) times sign(x) * w (signed).
__attribute__((target("avx2,fma"))) inline __m256i block_dot_avx2(__m256i abs_x, __m256i signed_w) {
  const __m256i products = _mm256_maddubs_epi16(abs_x, signed_w);  // 16 x int16, pairs summed (no overflow)
  return _mm256_madd_epi16(products, _mm256_set1_epi16(1));
}

__attribute__((target("avx2,fma,avxvnni"))) inline __m256i block_dot_avx_vnni(__m256i abs_x, __m256i signed_w) {
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), abs_x, signed_w);
}

__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni"))) inline __m256i block_dot_avx512_vnni(
    __m256i abs_x, __m256i signed_w) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), abs_x, signed_w);
}

// The rows [n_begin, n_end) of y for every row of x. Four weight rows at a time share each activation block
// (loaded and made unsigned once) and keep four independent accumulators, so the loop is not bound by the
// latency of one chain of multiply-adds; weight rows are read once per x row while they sit in L1.
#define DEFINE_ROWS(NAME, TARGET, BLOCK_DOT)                                                                   \
  __attribute__((target(TARGET))) void NAME(const int8_t* xq, const float* xs, const int8_t* w,              \
                                            const float* wscale, float* y, int64_t M, int64_t N, int64_t K,   \
                                            int64_t n_begin, int64_t n_end) {                                 \
    const int64_t blocks = K / kBlock;                                                                        \
    for (int64_t m = 0; m < M; ++m) {                                                                         \
      const int8_t* xm = xq + m * K;                                                                          \
      const float* sm = xs + m * blocks;                                                                      \
      int64_t n = n_begin;                                                                                    \
      for (; n + 4 <= n_end; n += 4) {                                                                        \
        const int8_t* w0 = w + n * K;                                                                         \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        for (int64_t b = 0; b < blocks; ++b) {                                                                \
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + b * kBlock));           \
          const __m256i abs_x = _mm256_sign_epi8(xv, xv);                                                     \
          const __m256 scale = _mm256_set1_ps(sm[b]);                                                         \
          for (int r = 0; r < 4; ++r) {                                                                       \
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + r * K + b * kBlock)); \
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(BLOCK_DOT(abs_x, _mm256_sign_epi8(wv, xv))), scale,    \
                                     acc[r]);                                                                 \
          }                                                                                                   \
        }                                                                                                     \
        for (int r = 0; r < 4; ++r) y[m * N + n + r] = hsum256(acc[r]) * wscale[n + r];                       \
      }                                                                                                       \
      for (; n < n_end; ++n) {                                                                                \
        const int8_t* wn = w + n * K;                                                                         \
        __m256 acc = _mm256_setzero_ps();                                                                     \
        for (int64_t b = 0; b < blocks; ++b) {                                                                \
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + b * kBlock));           \
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + b * kBlock));           \
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(BLOCK_DOT(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv))),\
                                _mm256_set1_ps(sm[b]), acc);                                                  \
        }                                                                                                     \
        y[m * N + n] = hsum256(acc) * wscale[n];                                                              \
      }                                                                                                       \
    }                                                                                                         \
  }

DEFINE_ROWS(rows_avx2, "avx2,fma", block_dot_avx2)
DEFINE_ROWS(rows_avx_vnni, "avx2,fma,avxvnni", block_dot_avx_vnni)
DEFINE_ROWS(rows_avx512_vnni, "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni", block_dot_avx512_vnni)

using RowsFn = void (*)(const int8_t*, const float*, const int8_t*, const float*, float*, int64_t, int64_t,
                        int64_t, int64_t, int64_t);

RowsFn choose(const std::string& isa) {
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_512 = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("avx512bw");
  const bool has_vnni = __builtin_cpu_supports("avxvnni");
  if (isa == "avx512_vnni" || (isa == "auto" && has_512)) {
    TORCH_CHECK(has_512, "this CPU has no AVX-512 VNNI");
    return rows_avx512_vnni;
  }
  if (isa == "avx_vnni" || (isa == "auto" && has_vnni)) {
    TORCH_CHECK(has_vnni, "this CPU has no AVX-VNNI");
    return rows_avx_vnni;
  }
  TORCH_CHECK(isa == "avx2" || isa == "auto", "unknown instruction set '", isa, "'");
  TORCH_CHECK(has_avx2, "this CPU has no AVX2/FMA");
  return rows_avx2;
}

}  // namespace

// x float32 [M, K] (K a multiple of 32), qweight int8 [N, K], scales float32 [N] -> float32 [M, N]
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                          const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: float32 [M, K] contiguous");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == torch::kChar && qweight.is_contiguous(),
              "qweight: int8 [N, K] contiguous");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous(), "scales: float32 [N] contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K && scales.numel() == N, "shapes: x [M, K], qweight [N, K], scales [N]");
  TORCH_CHECK(K % kBlock == 0, "K = ", K, " is not a multiple of ", kBlock);
  const RowsFn rows = choose(isa);
  auto xq = torch::empty({M, K}, torch::kChar);
  auto xs = torch::empty({M, K / kBlock}, torch::kFloat);
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(x.data_ptr<float>() + m * K, K, xq.data_ptr<int8_t>() + m * K, xs.data_ptr<float>() + m * (K / kBlock));
  }
  auto y = torch::empty({M, N}, torch::kFloat);
  const int8_t* xq_ptr = xq.data_ptr<int8_t>();
  const float* xs_ptr = xs.data_ptr<float>();
  const int8_t* w_ptr = qweight.data_ptr<int8_t>();
  const float* s_ptr = scales.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  // Split the output rows over torch's intra-op threads, at least 64 rows each.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    rows(xq_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, M, N, K, begin, end);
  });
  return y;
}

// Which instruction sets this CPU can run, best first.
std::vector<std::string> supported_isas() {
  __builtin_cpu_init();
  std::vector<std::string> isas;
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    isas.push_back("avx512_vnni");
  if (__builtin_cpu_supports("avxvnni")) isas.push_back("avx_vnni");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("avx2");
  return isas;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "int8-weight linear with int8 activations in blocks of 32");
  m.def("supported_isas", &supported_isas, "instruction sets this CPU runs, best first");
}
