// Float linear layers for few rows (decode): y[m, n] = sum_k x[m, k] * w[n, k], weights in the checkpoint layout
// [N, K], bfloat16 or float32, float32 accumulation, y in the weights' dtype.
//
// At one or a few rows the product reads each weight once and does two flops per weight: memory bound. PyTorch's
// bfloat16 matmul streamed SmolLM2's weights at ~11 GB/s in a decode step against the ~22 GB/s a torch.sum reads
// from this machine's memory (docs/PERFORMANCE.md); this kernel reads four weight rows at a time, sequentially,
// with every row of x (up to four at once) multiplied against them while they sit in L1.
//
// bfloat16: AVX-512 BF16 (vdpbf16ps: 32 products per instruction, pairs summed in float32) where the CPU has it,
// otherwise AVX2, widening bfloat16 to float32 (a 16-bit shift) and FMA. float32: AVX-512F or AVX2 FMA. Output
// rows are split over torch's threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "row_tiles.h"
#include "step_graph.h"
#include "vector.h"

#include <cstdint>
#include <cstring>
#include <string>

namespace {

constexpr int64_t kPrefetchRows = 8;  // prefetch the rows two tiles ahead

#define AVX512_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq"
#define AVX512_BF16_TARGET AVX512_TARGET ",avx512bf16"

template <typename T>
struct Problem {
  const T* x;
  const T* w;
  T* y;
  int64_t M, N, K;
};

// The products of the columns a vector loop leaves (K not a multiple of the vector width).
template <typename T>
inline float tail_dot(const T* x, const T* w, int64_t from, int64_t K) {
  float sum = 0.f;
  for (int64_t k = from; k < K; ++k) sum += static_cast<float>(x[k]) * static_cast<float>(w[k]);
  return sum;
}

template <int MR, int NR>
__attribute__((target(AVX512_BF16_TARGET))) void tile_avx512_bf16(const Problem<c10::BFloat16>& p, int64_t m0,
                                                                  int64_t n0) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K; k += 32) {
    const __mmask32 lanes = k + 32 <= p.K ? ~0u : (1u << (p.K - k)) - 1;  // a last step K does not fill
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) {
      const c10::BFloat16* row = p.w + (n0 + r) * p.K + k;
      wv[r] = _mm512_maskz_loadu_epi16(lanes, row);
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * p.K), _MM_HINT_T0);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi16(lanes, p.x + (m0 + i) * p.K + k);
      for (int r = 0; r < NR; ++r)
        acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r)
      p.y[(m0 + i) * p.N + n0 + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[i][r]));
}

__attribute__((target(AVX2_TARGET))) inline __m256 load8(const c10::BFloat16* p) { return llminfer::load8_bf16(p); }
__attribute__((target(AVX2_TARGET))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

template <int MR, int NR>
__attribute__((target(AVX512_TARGET))) void tile_avx512_f32(const Problem<float>& p, int64_t m0, int64_t n0) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K; k += 16) {
    const __mmask16 lanes = k + 16 <= p.K ? 0xffff : (1u << (p.K - k)) - 1;  // a last step K does not fill
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) {
      const float* row = p.w + (n0 + r) * p.K + k;
      wv[r] = _mm512_maskz_loadu_ps(lanes, row);
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * p.K), _MM_HINT_T0);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(lanes, p.x + (m0 + i) * p.K + k);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) p.y[(m0 + i) * p.N + n0 + r] = _mm512_reduce_add_ps(acc[i][r]);
}

template <int MR, int NR, typename T>
__attribute__((target(AVX2_TARGET))) void tile_avx2(const Problem<T>& p, int64_t m0, int64_t n0) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  const int64_t vector_K = p.K / 8 * 8;
  for (int64_t k = 0; k < vector_K; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) {
      const T* row = p.w + (n0 + r) * p.K + k;
      wv[r] = load8(row);
      if (k % (64 / sizeof(T)) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * p.K), _MM_HINT_T0);
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = load8(p.x + (m0 + i) * p.K + k);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r)
      p.y[(m0 + i) * p.N + n0 + r] =
          static_cast<T>(llminfer::hsum(acc[i][r]) + tail_dot(p.x + (m0 + i) * p.K, p.w + (n0 + r) * p.K, vector_K, p.K));
}

bool has_avx512() {  // asked once: the answer cannot change while the process runs
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
}

bool has_avx512_bf16() {
  static const bool has = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}

}  // namespace

// x [M, K], weight [N, K] -> y [M, N], all bfloat16 or all float32. isa: "avx512" (AVX-512 BF16 for bfloat16,
// AVX-512F for float32), "avx2" or "auto".
void float_linear_out(const torch::Tensor& x, const torch::Tensor& weight, const std::string& isa,
                      const torch::Tensor& y) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && (dtype == torch::kBFloat16 || dtype == torch::kFloat) && x.is_contiguous(),
              "x: bfloat16 or float32 [M, K] contiguous");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == dtype && weight.is_contiguous() &&
                  weight.size(1) == x.size(1),
              "weight: ", dtype, " [N, ", x.size(1), "] contiguous, got ", weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == dtype && y.is_contiguous() && y.size(0) == x.size(0) &&
                  y.size(1) == weight.size(0),
              "y: ", dtype, " [", x.size(0), ", ", weight.size(0), "] contiguous");
  TORCH_CHECK(isa == "auto" || isa == "avx512" || isa == "avx2", "unknown instruction set '", isa, "'");
  const bool has_512 = dtype == torch::kBFloat16 ? has_avx512_bf16() : has_avx512();
  const bool use_512 = isa == "avx512" || (isa == "auto" && has_512);
  TORCH_CHECK(!use_512 || has_512, "this CPU has no AVX-512", dtype == torch::kBFloat16 ? " BF16" : "");
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
// Every (MR, NR) tile of problem P through the tile function FN.
#define RUN_TILES(FN, P)                                                                    \
  llminfer::for_each_tile<false>((P).M, (P).N, [&](auto mr, auto nr, int64_t m0, int64_t n0) { \
    FN<decltype(mr)::value, decltype(nr)::value>(P, m0, n0);                                \
  })
  if (dtype == torch::kBFloat16) {
    const Problem<c10::BFloat16> p{x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(),
                                   y.data_ptr<c10::BFloat16>(), M, N, K};
    use_512 ? RUN_TILES(tile_avx512_bf16, p) : RUN_TILES(tile_avx2, p);
  } else {
    const Problem<float> p{x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), M, N, K};
    use_512 ? RUN_TILES(tile_avx512_f32, p) : RUN_TILES(tile_avx2, p);
  }
#undef RUN_TILES
}

torch::Tensor float_linear(const torch::Tensor& x, const torch::Tensor& weight, const std::string& isa) {
  auto y = torch::empty({x.size(0), weight.size(0)}, x.options());
  float_linear_out(x, weight, isa, y);
  return y;
}

bool cpu_has_avx512_bf16() { return has_avx512_bf16(); }

void register_float_linear(pybind11::module& m) {
  m.def("float_linear", &float_linear, "bfloat16 or float32 linear for few rows, float32 accumulation");
  m.def("has_avx512_bf16", &cpu_has_avx512_bf16, "whether this CPU runs the AVX-512 BF16 path");
  llminfer::register_graph_kernel("float_linear", llminfer::node_factory(&float_linear_out));
}
