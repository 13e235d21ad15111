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
//
// With VNNI, vpdpbusd multiplies the 4 byte pairs of each lane and adds them to its int32 sum in one instruction
// (instead of vpmaddubsw + vpaddw, and no vpmaddwd at the end of a block). AVX-VNNI runs the same 8-column tile;
// AVX-512 VNNI puts two panels side by side in one 512-bit register (16 columns, the same 4 bytes of x broadcast
// to every lane, folded into the instruction as a memory broadcast), so each instruction does 64 multiply-adds.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "activations.h"
#include "isa.h"
#include "step_graph.h"
#include "vector.h"

namespace {

using llminfer::Activations;
using llminfer::Isa;
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

// One block's 8 column sums of one row (4 k per lane): AVX2 in int16 (exact, see above), AVX-VNNI in int32.
struct Avx2Dot {
  __attribute__((target(AVX2_TARGET))) static __m256i add(__m256i sums, __m256i levels, __m256i x4) {
    return _mm256_add_epi16(sums, _mm256_maddubs_epi16(levels, x4));
  }
  __attribute__((target(AVX2_TARGET))) static __m256 to_float(__m256i sums) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(sums, _mm256_set1_epi16(1)));
  }
};

struct AvxVnniDot {
  __attribute__((target(AVX_VNNI_TARGET))) static __m256i add(__m256i sums, __m256i levels, __m256i x4) {
    return _mm256_dpbusd_avx_epi32(sums, levels, x4);
  }
  __attribute__((target(AVX_VNNI_TARGET))) static __m256 to_float(__m256i sums) { return _mm256_cvtepi32_ps(sums); }
};

// The 256-bit tile: MR rows x one panel of 8 columns. A macro, not a template over Dot, because the target
// attribute (which instructions the compiler may use) must name the instruction set of the dot product.
#define DEFINE_PANEL_TILE(NAME, TARGET, Dot)                                                                      \
  template <int MR, typename Out>                                                                                 \
  __attribute__((target(TARGET))) void NAME(const Activations& a, int64_t m0, const Int4Panels& w, int64_t p,     \
                                            Out* y, int64_t N) {                                                  \
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f);                                                           \
    const uint8_t* q = w.panel(p);                                                                                \
    const c10::Half* table = w.panel_table(p);                                                                    \
    __m256 acc[MR];                                                                                               \
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();                                                    \
    for (int64_t b = 0; b < w.blocks; ++b, q += 128, table += 16) {                                               \
      __m256i sums[MR];                                                                                           \
      for (int i = 0; i < MR; ++i) sums[i] = _mm256_setzero_si256();                                              \
      _Pragma("GCC unroll 1") /* unrolled, GCC computes all 32 products first and spills them */                  \
      for (int j = 0; j < 4; ++j) {                                                                               \
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * j));                 \
        const __m256i first = _mm256_and_si256(packed, low_nibbles);                                              \
        const __m256i second = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);                       \
        for (int i = 0; i < MR; ++i) {                                                                            \
          const int8_t* x = a.row(m0 + i) + b * kBlock + 8 * j;                                                   \
          sums[i] = Dot::add(sums[i], first, broadcast4(x));                                                      \
          sums[i] = Dot::add(sums[i], second, broadcast4(x + 4));                                                 \
        }                                                                                                         \
      }                                                                                                           \
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)));                 \
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table + 8)));             \
      for (int i = 0; i < MR; ++i) {                                                                              \
        acc[i] = _mm256_fmadd_ps(Dot::to_float(sums[i]), _mm256_mul_ps(s, _mm256_set1_ps(a.scales(m0 + i)[b])),   \
                                 acc[i]);                                                                         \
        /* a.sums holds dx * sum(q) / 8 (spread over 8 lanes there); here each lane is a whole column */          \
        acc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(8.f * a.sums(m0 + i)[b]), acc[i]);                             \
      }                                                                                                           \
    }                                                                                                             \
    for (int i = 0; i < MR; ++i) store8(y + (m0 + i) * N + p * kPanel, acc[i], N - p * kPanel);                  \
  }

DEFINE_PANEL_TILE(int4_panel_tile_avx2, AVX2_TARGET, Avx2Dot)
DEFINE_PANEL_TILE(int4_panel_tile_avx_vnni, AVX_VNNI_TARGET, AvxVnniDot)

// ---- AVX-512 VNNI: panels p and p + 1 in the low and high halves of each register --------------------------------

__attribute__((target(AVX512_TARGET))) inline __m512i two_panels(const uint8_t* low, const uint8_t* high) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high)), 1);
}

__attribute__((target(AVX512_TARGET))) inline __m512 two_panels_table(const c10::Half* low, const c10::Half* high) {
  const __m256i halves = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(low))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(high)), 1);
  return _mm512_cvtph_ps(halves);
}

__attribute__((target(AVX512_TARGET))) inline __m512i broadcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// 16 outputs of one row, the first `valid` of them written.
__attribute__((target(AVX512_TARGET))) inline void store16(float* y, __m512 v, int64_t valid) {
  _mm512_mask_storeu_ps(y, valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1), v);
}

__attribute__((target(AVX512_TARGET))) inline void store16(c10::BFloat16* y, __m512 v, int64_t valid) {
  const __m512i bits = _mm512_castps_si512(v);  // round to nearest even, as bf16_rounded
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  _mm256_mask_storeu_epi16(y, valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1),
                           _mm512_cvtepi32_epi16(rounded));
}

// MR rows x panels p, p + 1 (16 columns); the last panel of an odd count reads itself twice and stores 8.
template <int MR, typename Out>
__attribute__((target(AVX512_TARGET))) void int4_panel_pair_tile_avx512(const Activations& a, int64_t m0,
                                                                        const Int4Panels& w, int64_t p,
                                                                        int64_t panels, Out* y, int64_t N) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
  const int64_t p_high = p + 1 < panels ? p + 1 : p;
  const uint8_t *q_low = w.panel(p), *q_high = w.panel(p_high);
  const c10::Half *table_low = w.panel_table(p), *table_high = w.panel_table(p_high);
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    __m512i sums[MR];
    for (int i = 0; i < MR; ++i) sums[i] = _mm512_setzero_si512();
#pragma GCC unroll 1
    for (int j = 0; j < 4; ++j) {
      const __m512i packed = two_panels(q_low + 128 * b + 32 * j, q_high + 128 * b + 32 * j);
      const __m512i first = _mm512_and_si512(packed, low_nibbles);
      const __m512i second = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
      for (int i = 0; i < MR; ++i) {
        const int8_t* x = a.row(m0 + i) + b * kBlock + 8 * j;
        sums[i] = _mm512_dpbusd_epi32(sums[i], first, broadcast4_512(x));
        sums[i] = _mm512_dpbusd_epi32(sums[i], second, broadcast4_512(x + 4));
      }
    }
    const __m512 s = two_panels_table(table_low + 16 * b, table_high + 16 * b);
    const __m512 m = two_panels_table(table_low + 16 * b + 8, table_high + 16 * b + 8);
    for (int i = 0; i < MR; ++i) {
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[i]), _mm512_mul_ps(s, _mm512_set1_ps(a.scales(m0 + i)[b])),
                               acc[i]);
      acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(8.f * a.sums(m0 + i)[b]), acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) store16(y + (m0 + i) * N + p * kPanel, acc[i], N - p * kPanel);
}

// A tile's kernel for this instruction set: columns [p * 8, p * 8 + step * 8), rows m0 .. m0 + MR.
template <Isa I, int MR, typename Out>
void run_tile(const Activations& a, int64_t m0, const Int4Panels& w, int64_t p, int64_t panels, Out* y, int64_t N) {
  if constexpr (I == Isa::avx512_vnni) {
    int4_panel_pair_tile_avx512<MR>(a, m0, w, p, panels, y, N);
  } else if constexpr (I == Isa::avx_vnni) {
    int4_panel_tile_avx_vnni<MR>(a, m0, w, p, y, N);
  } else {
    int4_panel_tile_avx2<MR>(a, m0, w, p, y, N);
  }
}

// The last tile of a pass, rows < kTileRows: the instantiation for its row count.
template <Isa I, int MR, typename Out>
void partial_tile(int64_t rows, const Activations& a, int64_t m0, const Int4Panels& w, int64_t p, int64_t panels,
                  Out* y, int64_t N) {
  if constexpr (MR > 0) {
    if (rows == MR) return run_tile<I, MR>(a, m0, w, p, panels, y, N);
    partial_tile<I, MR - 1>(rows, a, m0, w, p, panels, y, N);
  }
}

// Rows in passes of kRowsPerPass; panels (pairs of them for AVX-512) split over threads; within a thread's
// panels, every tile of the pass's rows reads the panel while it sits in L1.
template <Isa I, typename Out>
void int4_panels(const Activations& a, const Int4Panels& w, int64_t N, Out* y) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t step = I == Isa::avx512_vnni ? 2 : 1;
  const int64_t units = (panels + step - 1) / step;
  for (int64_t pass = 0; pass < a.M; pass += kRowsPerPass) {
    const int64_t pass_end = std::min(a.M, pass + kRowsPerPass);
    at::parallel_for(0, units, 2 / step, [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t p = unit * step;
        int64_t m = pass;
        for (; m + kTileRows <= pass_end; m += kTileRows) run_tile<I, kTileRows>(a, m, w, p, panels, y, N);
        if (m < pass_end) partial_tile<I, kTileRows - 1>(pass_end - m, a, m, w, p, panels, y, N);
      }
    });
  }
}

template <typename Out>
void int4_panels(Isa isa, const Activations& a, const Int4Panels& w, int64_t N, Out* y) {
  switch (isa) {
    case Isa::avx512_vnni: return int4_panels<Isa::avx512_vnni>(a, w, N, y);
    case Isa::avx_vnni: return int4_panels<Isa::avx_vnni>(a, w, N, y);
    default: return int4_panels<Isa::avx2>(a, w, N, y);
  }
}

}  // namespace

// x float32 | bfloat16 [M, K]; qweight uint8 [Np / 8, Kb, 128] and table float16 [Np / 8, Kb, 2, 8] in the
// panels8 layout; N the output columns; isa as choose_isa -> y [M, N] in x's dtype
void int4_gemm_out(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& table, int64_t N,
                   const std::string& isa, const torch::Tensor& y) {
  const Isa chosen = llminfer::choose_isa(isa);
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
    int4_panels(chosen, a, w, N, y.data_ptr<float>());
  } else {
    int4_panels(chosen, a, w, N, y.data_ptr<c10::BFloat16>());
  }
}

torch::Tensor int4_gemm(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& table, int64_t N,
                        const std::string& isa) {
  auto y = torch::empty({x.size(0), N}, x.options());
  int4_gemm_out(x, qweight, table, N, isa, y);
  return y;
}

void register_quantized_gemm(pybind11::module& m) {
  llminfer::register_graph_kernel("int4_gemm", llminfer::node_factory(&int4_gemm_out));
  m.def("int4_gemm", &int4_gemm, "int4-weight linear (panels8 layout) with int8 activations, for many rows");
}
