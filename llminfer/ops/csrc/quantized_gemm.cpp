// Quantized linear layers over many rows (batched decode, prompts): y[m, n] = sum_k x[m, k] * w[n, k], compute
// bound, where quantized_linear.cpp's kernels for a few rows are bound by reading the weights.
//
// Activations are int8 in blocks of 32 as there (activations.h). The weights are stored in panels of 8 output
// columns, so that one 256-bit register holds 4 consecutive k of each of the 8 columns (one 32-bit lane per
// column): 4 bytes of a row of x broadcast to every lane, one vpmaddubsw and the lanes hold pair sums for 8
// outputs at once. Nothing is reduced across lanes until the end, and a 4-row tile needs only 8 accumulators.
//
// int4 ("panels8" layout): levels q in [0, 15], w = q * s + m per block of 32 inputs, as in blocks32. Levels are
// unsigned and |x| <= 127, so a vpmaddubsw pair is at most 2 * 15 * 127 = 3810 and the 8 products of a block
// (4 x 8 values of k) sum exactly in int16 (8 * 3810 < 32767): per 32 multiply-adds one vpmaddubsw and one
// vpaddw, and one vpmaddwd + one float multiply-add per block. On an AVX2 core without VNNI this runs at the
// rate of vpmaddubsw alone (measured 40 int8 multiply-adds per ns per core against 12 for float32 FMA).
//   qweight uint8 [Np / 8, Kb, 128]: block b of panel p is 4 vectors of 32 bytes, vector j holding k = 32 b + 8 j
//     + t (low nibble) and 32 b + 8 j + 4 + t (high nibble) of column c at byte 4 c + t, t < 4.
//   table float16 [Np / 8, Kb, 2, 8]: the 8 columns' scales, then their minimums m.
// (Np: N rounded up to 8, Kb: K / 32 rounded up; padding levels are 0 and padding columns have s = m = 0.)

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "activations.h"
#include "step_graph.h"
#include "vector.h"

namespace {

using llminfer::Activations;
using llminfer::kBlock;

constexpr int64_t kPanel = 8;          // output columns per panel
constexpr int kTileRows = 8;  // rows of x per tile: 8 int16 sums + 2 weight registers + a broadcast + the mask
constexpr int64_t kRowsPerPass = 64;   // rows of x whose quantized values stay in L2 while a panel range is read

struct Int4Panels {
  const uint8_t* q;
  const c10::Half* table;
  int64_t blocks;  // Kb
  const uint8_t* panel(int64_t p) const { return q + p * blocks * 128; }
  const c10::Half* panel_table(int64_t p) const { return table + p * blocks * 16; }
};

__attribute__((target(AVX2_TARGET))) inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// 8 outputs of one row (n0 + 8 <= N: all of them, else the first N - n0).
__attribute__((target(AVX2_TARGET))) inline void store8(float* y, __m256 v, int64_t valid) {
  if (valid >= kPanel) {
    _mm256_storeu_ps(y, v);
  } else {
    alignas(32) float lanes[kPanel];
    _mm256_store_ps(lanes, v);
    std::memcpy(y, lanes, valid * sizeof(float));
  }
}

__attribute__((target(AVX2_TARGET))) inline void store8(c10::BFloat16* y, __m256 v, int64_t valid) {
  alignas(32) float lanes[kPanel];
  _mm256_store_ps(lanes, v);
  alignas(32) uint32_t bits[kPanel];
  _mm256_store_si256(reinterpret_cast<__m256i*>(bits), llminfer::bf16_rounded(lanes));
  for (int64_t c = 0; c < std::min(valid, kPanel); ++c) {
    const uint16_t b = static_cast<uint16_t>(bits[c]);
    std::memcpy(y + c, &b, 2);
  }
}

template <int MR, typename Out>
__attribute__((target(AVX2_TARGET))) void int4_panel_tile(const Activations& a, int64_t m0, const Int4Panels& w,
                                                           int64_t p, Out* y, int64_t N) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const uint8_t* q = w.panel(p);
  const c10::Half* table = w.panel_table(p);
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b, q += 128, table += 16) {
    __m256i sums[MR];
    for (int i = 0; i < MR; ++i) sums[i] = _mm256_setzero_si256();
#pragma GCC unroll 1  // unrolled, GCC computes all 32 products before summing them and spills them to the stack
    for (int j = 0; j < 4; ++j) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * j));
      const __m256i first = _mm256_and_si256(packed, low_nibbles);
      const __m256i second = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
      for (int i = 0; i < MR; ++i) {
        const int8_t* x = a.row(m0 + i) + b * kBlock + 8 * j;
        sums[i] = _mm256_add_epi16(sums[i], _mm256_maddubs_epi16(first, broadcast4(x)));
        sums[i] = _mm256_add_epi16(sums[i], _mm256_maddubs_epi16(second, broadcast4(x + 4)));
      }
    }
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)));
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table + 8)));
    for (int i = 0; i < MR; ++i) {
      const __m256 products = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[i], ones));
      acc[i] = _mm256_fmadd_ps(products, _mm256_mul_ps(s, _mm256_set1_ps(a.scales(m0 + i)[b])), acc[i]);
      // a.sums holds dx * sum(q) / 8 (spread over 8 lanes there); here each lane is a whole column
      acc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(8.f * a.sums(m0 + i)[b]), acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) store8(y + (m0 + i) * N + p * kPanel, acc[i], N - p * kPanel);
}

// The last tile of a pass, rows < kTileRows: the instantiation for its row count.
template <int MR, typename Out>
void partial_tile(int64_t rows, const Activations& a, int64_t m0, const Int4Panels& w, int64_t p, Out* y, int64_t N) {
  if constexpr (MR > 0) {
    if (rows == MR) return int4_panel_tile<MR>(a, m0, w, p, y, N);
    partial_tile<MR - 1>(rows, a, m0, w, p, y, N);
  }
}

// Rows in passes of kRowsPerPass; panels split over threads; within a thread's panels, every tile of the pass's
// rows reads the panel while it sits in L1.
template <typename Out>
void int4_panels(const Activations& a, const Int4Panels& w, int64_t N, Out* y) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  for (int64_t pass = 0; pass < a.M; pass += kRowsPerPass) {
    const int64_t pass_end = std::min(a.M, pass + kRowsPerPass);
    at::parallel_for(0, panels, 2, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        int64_t m = pass;
        for (; m + kTileRows <= pass_end; m += kTileRows) int4_panel_tile<kTileRows>(a, m, w, p, y, N);
        if (m < pass_end) partial_tile<kTileRows - 1>(pass_end - m, a, m, w, p, y, N);
      }
    });
  }
}

}  // namespace

// x float32 | bfloat16 [M, K]; qweight uint8 [Np / 8, Kb, 128] and table float16 [Np / 8, Kb, 2, 8] in the
// panels8 layout; N the output columns -> y [M, N] in x's dtype
void int4_gemm_out(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& table, int64_t N,
                   const torch::Tensor& y) {
  TORCH_CHECK(qweight.dim() == 3 && qweight.scalar_type() == torch::kByte && qweight.is_contiguous() &&
                  qweight.size(0) == (N + kPanel - 1) / kPanel && qweight.size(2) == 128,
              "qweight: uint8 [", (N + kPanel - 1) / kPanel, ", Kb, 128] contiguous (panels8 layout), got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const int64_t blocks = qweight.size(1);
  TORCH_CHECK(table.scalar_type() == torch::kHalf && table.is_contiguous() && table.dim() == 4 &&
                  table.size(0) == qweight.size(0) && table.size(1) == blocks && table.size(2) == 2 &&
                  table.size(3) == kPanel,
              "table: float16 [Np / 8, Kb, 2, 8] contiguous (panels8 layout)");
  TORCH_CHECK(x.size(1) <= blocks * kBlock && x.size(1) > (blocks - 1) * kBlock, "x has ", x.size(1),
              " columns, the weight ", blocks, " blocks of 32");
  llminfer::check_activations(x, x.size(1));
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == N && y.scalar_type() == x.scalar_type() &&
                  y.is_contiguous(),
              "y: expected ", x.scalar_type(), " [", x.size(0), ", ", N, "] contiguous");
  const Activations a = llminfer::quantize_activations(x);
  const Int4Panels w{qweight.data_ptr<uint8_t>(), table.data_ptr<c10::Half>(), blocks};
  if (x.scalar_type() == torch::kFloat) {
    int4_panels(a, w, N, y.data_ptr<float>());
  } else {
    int4_panels(a, w, N, y.data_ptr<c10::BFloat16>());
  }
}

torch::Tensor int4_gemm(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& table, int64_t N) {
  auto y = torch::empty({x.size(0), N}, x.options());
  int4_gemm_out(x, qweight, table, N, y);
  return y;
}

void register_quantized_gemm(pybind11::module& m) {
  llminfer::register_graph_kernel("int4_gemm", llminfer::node_factory(&int4_gemm_out));
  m.def("int4_gemm", &int4_gemm, "int4-weight linear (panels8 layout) with int8 activations, for many rows");
}
