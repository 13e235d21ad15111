// Quantized linear layers with 8-bit activations: y[m, n] = sum_k x[m, k] * w[n, k].
//
// As llama.cpp does (Q8_0 x Q8_0, Q4_1 x Q8_1): each row of x is quantized to int8 in blocks of 32 with one
// float scale per block (|x| max / 127), products are summed exactly in int32 per block, and each block's sum
// is scaled by its activation scale (and, for int4, its weight scale) in float32.
//
// int8 weights ("tiles4x64" layout, packed once at load by the layer): rows in tiles of 4 (N padded with zero
// rows), K padded to 64 with zeros, and each tile stored as [Kp / 64, 4 rows, 64 bytes], so that a tile's bytes
// are one sequential stream, in the order the kernel reads them (the checkpoint's [N, K] rows are 4 streams at
// once per tile, which measured 11-19 GB/s against int4's 23 GB/s from memory). One scale per output row.
// Signed x signed bytes use the identity x * w = |x| * (sign(x) * w), so that the unsigned x signed instructions
// apply (AVX2 vpmaddubsw + vpmaddwd; VNNI vpdpbusd does both in one); values stay in [-127, 127], so no sign flip
// overflows.
//
// int4 weights ("blocks32" layout, packed once at load by the layer): levels q in [0, 15], w = q * s + m with
// (s, m) per block of 32 inputs. K is padded to a multiple of 64; each pair of blocks is 32 bytes whose low
// nibbles are the first block's 32 levels in order and whose high nibbles are the second's, so one 256-bit
// load and two masks give both blocks. (s, m) are float16, [N, K/32, 2]. The offset term sums to
// m * dx * sum(xq), with sum(xq) computed once per activation block.
//
// Instruction sets are chosen at run time: every kernel below is compiled for its own target (GCC target
// attributes), and `isa` names the one to use ("avx512_vnni", "avx_vnni", "avx2"; "auto" = the best the CPU has).
// The output rows are split over torch's intra-op threads; rows of x are taken four at a time, so that each
// weight row read from memory serves up to four tokens (prefill) while it sits in L1; the rows two tiles ahead
// are prefetched (measured: 12 -> 15 GB/s streaming the LM head from memory).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "activations.h"
#include "isa.h"
#include "row_tiles.h"
#include "step_graph.h"
#include "vector.h"

#include <cmath>
#include <cstring>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using llminfer::Activations;
using llminfer::bf16_rounded;
using llminfer::hsum;
using llminfer::kBlock;
using llminfer::kRowsOfW;

using llminfer::Isa;
using llminfer::choose_isa;

// ---- weights: what one tile reads ---------------------------------------------------------------------------

struct Int8Weights {
  static constexpr bool kPaddedRows = true;
  const int8_t* q;     // tiles4x64: [Np / 4, Kp / 64, 4, 64]
  const void* scales;  // [N], float32 or bfloat16
  bool bf16_scales;
  int64_t padded_K;
  const int8_t* tile(int64_t n0) const { return q + n0 * padded_K; }  // n0 a multiple of 4
  float row_scale(int64_t n) const {
    return bf16_scales ? static_cast<float>(static_cast<const c10::BFloat16*>(scales)[n])
                       : static_cast<const float*>(scales)[n];
  }
};

constexpr int64_t kTileRows = 4;                 // int8 rows per tile (= kRowsOfW)
constexpr int64_t kPrefetchBytes = 8 * 64 * 4;   // int8 tiles: prefetch 8 chunks (2 KiB) ahead of the reads

struct Int4Weights {
  static constexpr bool kPaddedRows = false;
  const uint8_t* q;       // [N, Kp / 2], pairs of blocks
  const c10::Half* table;  // [N, Kp / 32, 2]: (s, m) per block
  int64_t padded_K;
};

template <typename Out>
inline void store(Out* y, float value) { *y = static_cast<Out>(value); }

// ---- AVX2 (and AVX-VNNI): one block of 32 per step, 8 int32 lanes ---------------------------------------------

__attribute__((target(AVX2_TARGET))) inline __m256i dot_avx2(__m256i unsigned_bytes, __m256i signed_bytes) {
  const __m256i pairs = _mm256_maddubs_epi16(unsigned_bytes, signed_bytes);  // 16 x int16, no overflow here
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

__attribute__((target(AVX_VNNI_TARGET))) inline __m256i dot_avx_vnni(__m256i unsigned_bytes, __m256i signed_bytes) {
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), unsigned_bytes, signed_bytes);
}

#define DEFINE_TILES_256(SUFFIX, TARGET, DOT)                                                                     \
  template <int MR, int NR, typename Out>                                                                          \
  __attribute__((target(TARGET))) void int8_tile_##SUFFIX(const Activations& a, int64_t m0, const Int8Weights& w,  \
                                                          int64_t n0, Out* y, int64_t N) {                         \
    static_assert(NR == kTileRows, "int8 tiles hold 4 rows");                                                      \
    const int64_t blocks = w.padded_K / kBlock;                                                                    \
    const int8_t* tile = w.tile(n0);                                                                               \
    __m256 acc[MR][NR];                                                                                            \
    for (int i = 0; i < MR; ++i)                                                                                   \
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();                                                \
    for (int64_t b = 0; b < blocks; ++b) {                                                                         \
      const int8_t* chunk = tile + (b / 2) * (64 * NR) + (b % 2) * kBlock;  /* row r's block at chunk + 64 r */    \
      if (b % 2 == 0)                                                                                              \
        for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(chunk + kPrefetchBytes + 64 * r), _MM_HINT_T0);\
      __m256i wv[NR];                                                                                              \
      for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 64 * r));   \
      for (int i = 0; i < MR; ++i) {                                                                               \
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.row(m0 + i) + b * kBlock));       \
        const __m256i abs_x = _mm256_sign_epi8(xv, xv);                                                            \
        const __m256 dx = _mm256_set1_ps(a.scales(m0 + i)[b]);                                                     \
        for (int r = 0; r < NR; ++r)                                                                               \
          acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(abs_x, _mm256_sign_epi8(wv[r], xv))), dx, acc[i][r]); \
      }                                                                                                            \
    }                                                                                                              \
    for (int i = 0; i < MR; ++i)                                                                                   \
      for (int r = 0; r < NR && n0 + r < N; ++r) store(y + (m0 + i) * N + n0 + r, hsum(acc[i][r]) * w.row_scale(n0 + r));\
  }                                                                                                                \
  template <int MR, int NR, typename Out>                                                                          \
  __attribute__((target(TARGET))) void int4_tile_##SUFFIX(const Activations& a, int64_t m0, const Int4Weights& w, \
                                                          int64_t n0, Out* y, int64_t N) {                         \
    const int64_t pairs = w.padded_K / 64;                                                                         \
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f);                                                            \
    __m256 acc[MR][NR];                                                                                            \
    for (int i = 0; i < MR; ++i)                                                                                   \
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();                                                \
    for (int64_t p = 0; p < pairs; ++p) {                                                                          \
      for (int half = 0; half < 2; ++half) {                                                                       \
        const int64_t b = 2 * p + half;                                                                            \
        __m256i qv[NR];                                                                                            \
        float s[NR], m[NR];                                                                                        \
        for (int r = 0; r < NR; ++r) {                                                                             \
          const uint8_t* row = w.q + (n0 + r) * (w.padded_K / 2) + p * 32;                                         \
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));                        \
          if (!half) _mm_prefetch(reinterpret_cast<const char*>(row + 2 * kRowsOfW * (w.padded_K / 2)), _MM_HINT_T0); \
          qv[r] = _mm256_and_si256(half ? _mm256_srli_epi16(packed, 4) : packed, low_nibbles);                     \
          const c10::Half* sm = w.table + ((n0 + r) * (w.padded_K / kBlock) + b) * 2;                              \
          s[r] = static_cast<float>(sm[0]);                                                                        \
          m[r] = static_cast<float>(sm[1]);                                                                        \
        }                                                                                                          \
        for (int i = 0; i < MR; ++i) {                                                                             \
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.row(m0 + i) + b * kBlock));     \
          const float dx = a.scales(m0 + i)[b], offset_sum = a.sums(m0 + i)[b];                                    \
          for (int r = 0; r < NR; ++r) {                                                                           \
            acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(qv[r], xv)), _mm256_set1_ps(dx * s[r]), acc[i][r]); \
            acc[i][r] = _mm256_add_ps(acc[i][r], _mm256_set1_ps(m[r] * offset_sum));                               \
          }                                                                                                        \
        }                                                                                                          \
      }                                                                                                            \
    }                                                                                                              \
    for (int i = 0; i < MR; ++i)                                                                                   \
      for (int r = 0; r < NR; ++r) store(y + (m0 + i) * N + n0 + r, hsum(acc[i][r]));                          \
  }

DEFINE_TILES_256(avx2, AVX2_TARGET, dot_avx2)
DEFINE_TILES_256(avx_vnni, AVX_VNNI_TARGET, dot_avx_vnni)

// ---- AVX-512 VNNI: two blocks (64 bytes) per step, 16 int32 lanes -----------------------------------------------

// [a x8 | b x8] from two floats.
__attribute__((target(AVX512_TARGET))) inline __m512 two_blocks(float a, float b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(a)), _mm256_set1_ps(b), 1);
}

template <int MR, int NR, typename Out>
__attribute__((target(AVX512_TARGET))) void int8_tile_avx512_vnni(const Activations& a, int64_t m0,
                                                                  const Int8Weights& w, int64_t n0, Out* y,
                                                                  int64_t N) {
  static_assert(NR == kTileRows, "int8 tiles hold 4 rows");
  const int64_t chunks = w.padded_K / 64;
  const int8_t* tile = w.tile(n0);
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t c = 0; c < chunks; ++c) {
    const int8_t* chunk = tile + c * (64 * NR);  // two blocks of each of the tile's rows, one after the other
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) {
      wv[r] = _mm512_loadu_si512(chunk + 64 * r);
      _mm_prefetch(reinterpret_cast<const char*>(chunk + kPrefetchBytes + 64 * r), _MM_HINT_T0);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_loadu_si512(a.row(m0 + i) + c * 64);  // padded to 64: always in bounds
      const __m512i abs_x = _mm512_abs_epi8(xv);
      const __mmask64 negative = _mm512_movepi8_mask(xv);
      const __m512 dx = two_blocks(a.scales(m0 + i)[2 * c], a.scales(m0 + i)[2 * c + 1]);
      for (int r = 0; r < NR; ++r) {
        const __m512i signed_w = _mm512_mask_sub_epi8(wv[r], negative, zero, wv[r]);
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, abs_x, signed_w)), dx, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR && n0 + r < N; ++r)
      store(y + (m0 + i) * N + n0 + r, _mm512_reduce_add_ps(acc[i][r]) * w.row_scale(n0 + r));
}

template <int MR, int NR, typename Out>
__attribute__((target(AVX512_TARGET))) void int4_tile_avx512_vnni(const Activations& a, int64_t m0,
                                                                  const Int4Weights& w, int64_t n0, Out* y,
                                                                  int64_t N) {
  const int64_t pairs = w.padded_K / 64, blocks = w.padded_K / kBlock;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
  // (s0, m0, s1, m1) -> [s0 x8 | s1 x8] and [m0 x8 | m1 x8]
  const __m512i pick_s = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m512i pick_m = _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3);
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i xv[MR];
    __m512 dx[MR], offset_sum[MR];
    for (int i = 0; i < MR; ++i) {
      xv[i] = _mm512_loadu_si512(a.row(m0 + i) + p * 64);
      dx[i] = two_blocks(a.scales(m0 + i)[2 * p], a.scales(m0 + i)[2 * p + 1]);
      offset_sum[i] = two_blocks(a.sums(m0 + i)[2 * p], a.sums(m0 + i)[2 * p + 1]);
    }
    for (int r = 0; r < NR; ++r) {
      const uint8_t* row = w.q + (n0 + r) * (w.padded_K / 2) + p * 32;
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * kRowsOfW * (w.padded_K / 2)), _MM_HINT_T0);
      const __m512i qv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(packed, low_nibbles)),
                                            _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles), 1);
      const __m512 sm = _mm512_castps128_ps512(_mm_cvtph_ps(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.table + ((n0 + r) * blocks + 2 * p) * 2))));
      const __m512 s = _mm512_permutexvar_ps(pick_s, sm), m = _mm512_permutexvar_ps(pick_m, sm);
      for (int i = 0; i < MR; ++i) {
        const __m512 products = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, qv, xv[i]));
        acc[i][r] = _mm512_fmadd_ps(products, _mm512_mul_ps(s, dx[i]), acc[i][r]);
        acc[i][r] = _mm512_fmadd_ps(m, offset_sum[i], acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) store(y + (m0 + i) * N + n0 + r, _mm512_reduce_add_ps(acc[i][r]));
}

// ---- driver: tiles over (rows of x) x (rows of w), output rows split over threads -----------------------------

template <typename Weights, typename Out, template <int, int, typename> class Tile>
void run_tiles(const Activations& a, const Weights& w, int64_t N, Out* y) {
  llminfer::for_each_tile<Weights::kPaddedRows>(a.M, N, [&](auto rows_of_x, auto rows_of_w, int64_t m, int64_t n) {
    Tile<decltype(rows_of_x)::value, decltype(rows_of_w)::value, Out>::run(a, m, w, n, y, N);
  });
}

#define TILE_CLASS(NAME, WEIGHTS, FN)                                                       \
  template <int MR, int NR, typename Out>                                                   \
  struct NAME {                                                                             \
    static void run(const Activations& a, int64_t m0, const WEIGHTS& w, int64_t n0, Out* y, \
                    int64_t N) {                                                            \
      FN<MR, NR, Out>(a, m0, w, n0, y, N);                                                  \
    }                                                                                       \
  };

TILE_CLASS(Int8Avx2, Int8Weights, int8_tile_avx2)
TILE_CLASS(Int8AvxVnni, Int8Weights, int8_tile_avx_vnni)
TILE_CLASS(Int8Avx512, Int8Weights, int8_tile_avx512_vnni)
TILE_CLASS(Int4Avx2, Int4Weights, int4_tile_avx2)
TILE_CLASS(Int4AvxVnni, Int4Weights, int4_tile_avx_vnni)
TILE_CLASS(Int4Avx512, Int4Weights, int4_tile_avx512_vnni)

template <typename Weights, template <int, int, typename> class T2, template <int, int, typename> class TV,
          template <int, int, typename> class T512>
void product(const torch::Tensor& x, const Weights& w, int64_t N, const std::string& isa, const torch::Tensor& y) {
  const Isa chosen = choose_isa(isa);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == N && y.scalar_type() == x.scalar_type() &&
                  y.is_contiguous(),
              "y: expected ", x.scalar_type(), " [", x.size(0), ", ", N, "] contiguous, got ", y.scalar_type(), " ",
              y.sizes());
  const Activations a = llminfer::quantize_activations(x);
  auto dispatch = [&](auto* out) {
    using Out = std::remove_pointer_t<decltype(out)>;
    switch (chosen) {
      case Isa::avx512_vnni: run_tiles<Weights, Out, T512>(a, w, N, out); break;
      case Isa::avx_vnni: run_tiles<Weights, Out, TV>(a, w, N, out); break;
      default: run_tiles<Weights, Out, T2>(a, w, N, out);
    }
  };
  if (x.scalar_type() == torch::kFloat) {
    dispatch(y.data_ptr<float>());
  } else {
    dispatch(y.data_ptr<c10::BFloat16>());
  }
}


}  // namespace

// x float32 | bfloat16 [M, K], qweight int8 in the tiles4x64 layout [ceil(N / 4), Kp / 64, 4, 64] (Kp = K rounded
// up to 64), scales float32 | bfloat16 [N] -> [M, N] in x's dtype
void int8_linear_out(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                     const std::string& isa, const torch::Tensor& y) {
  TORCH_CHECK((scales.scalar_type() == torch::kFloat || scales.scalar_type() == torch::kBFloat16) &&
                  scales.is_contiguous() && scales.dim() == 1,
              "scales: float32 or bfloat16 [N] contiguous");
  const int64_t N = scales.numel();
  TORCH_CHECK(qweight.dim() == 4 && qweight.scalar_type() == torch::kChar && qweight.is_contiguous() &&
                  qweight.size(0) == (N + kTileRows - 1) / kTileRows && qweight.size(2) == kTileRows &&
                  qweight.size(3) == 64,
              "qweight: int8 [", (N + kTileRows - 1) / kTileRows, ", Kp / 64, 4, 64] contiguous (tiles4x64 layout), got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const int64_t padded_K = qweight.size(1) * 64;
  TORCH_CHECK(x.size(1) <= padded_K && x.size(1) > padded_K - 64, "x has ", x.size(1), " columns, the weight ",
              padded_K, " padded columns");
  llminfer::check_activations(x, x.size(1));
  const Int8Weights w{qweight.data_ptr<int8_t>(), scales.data_ptr(), scales.scalar_type() == torch::kBFloat16,
                      padded_K};
  product<Int8Weights, Int8Avx2, Int8AvxVnni, Int8Avx512>(x, w, N, isa, y);
}

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                          const std::string& isa) {
  auto y = torch::empty({x.size(0), scales.numel()}, x.options());
  int8_linear_out(x, qweight, scales, isa, y);
  return y;
}

// x float32 | bfloat16 [M, K], qweight uint8 [N, Kp / 2] and table float16 [N, Kp / 32, 2] in the blocks32
// layout (Kp = K rounded up to 64) -> [M, N] in x's dtype
void int4_linear_out(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& table,
                     const std::string& isa, const torch::Tensor& y) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == torch::kByte && qweight.is_contiguous(),
              "qweight: uint8 [N, Kp / 2] contiguous (blocks32 layout)");
  const int64_t N = qweight.size(0), padded_K = qweight.size(1) * 2;
  TORCH_CHECK(padded_K % 64 == 0, "qweight: ", padded_K, " levels per row is not a multiple of 64");
  TORCH_CHECK(table.scalar_type() == torch::kHalf && table.is_contiguous() && table.dim() == 3 &&
                  table.size(0) == N && table.size(1) == padded_K / kBlock && table.size(2) == 2,
              "table: float16 [N, Kp / 32, 2] contiguous");
  TORCH_CHECK(x.size(1) <= padded_K && x.size(1) > padded_K - 64, "x has ", x.size(1),
              " columns, the weight ", padded_K, " padded levels");
  llminfer::check_activations(x, x.size(1));
  const Int4Weights w{qweight.data_ptr<uint8_t>(), table.data_ptr<c10::Half>(), padded_K};
  product<Int4Weights, Int4Avx2, Int4AvxVnni, Int4Avx512>(x, w, N, isa, y);
}

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& table,
                          const std::string& isa) {
  auto y = torch::empty({x.size(0), qweight.size(0)}, x.options());
  int4_linear_out(x, qweight, table, isa, y);
  return y;
}

// The weights as a float matrix [N, K] in `dtype` (float32 or bfloat16), for products over many rows (a prompt),
// where a float matmul of the dequantized weights beats integer dot products per block.
inline uint16_t bf16_bits(float v) {  // round to nearest even (finite weights: no NaN handling needed)
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// A row of float32 as bfloat16 bits, 16 at a time.
__attribute__((target(AVX2_TARGET))) void bf16_row(const float* values, int64_t K, uint16_t* dst) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    // packus interleaves the two 128-bit lanes; the permute puts the 16 values back in order
    const __m256i packed = _mm256_packus_epi32(bf16_rounded(values + k), bf16_rounded(values + k + 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_permute4x64_epi64(packed, 0xd8));
  }
  for (; k < K; ++k) dst[k] = bf16_bits(values[k]);
}

template <typename RowFn>
torch::Tensor dequantized(int64_t N, int64_t K, torch::ScalarType dtype, RowFn&& row) {
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dequantize to float32 or bfloat16");
  auto w = torch::empty({N, K}, dtype);
  const bool to_bf16 = dtype == torch::kBFloat16;
  char* out = static_cast<char*>(w.data_ptr());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> values(K + kBlock);
    for (int64_t n = begin; n < end; ++n) {
      row(n, values.data());
      if (to_bf16) {
        bf16_row(values.data(), K, reinterpret_cast<uint16_t*>(out) + n * K);
      } else {
        std::memcpy(reinterpret_cast<float*>(out) + n * K, values.data(), K * sizeof(float));
      }
    }
  });
  return w;
}

// One row of blocks32 levels: value = q * s + m per block of 32 (vectorized by the compiler for AVX2).
__attribute__((target(AVX2_TARGET))) void int4_row(const uint8_t* q, const c10::Half* table, int64_t blocks,
                                                   float* values) {
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* pair = q + (b / 2) * 32;
    const float s = static_cast<float>(table[b * 2]), m = static_cast<float>(table[b * 2 + 1]);
    const int shift = (b % 2) * 4;
    for (int i = 0; i < kBlock; ++i) values[b * kBlock + i] = static_cast<float>((pair[i] >> shift) & 15) * s + m;
  }
}

torch::Tensor dequantize_int4(const torch::Tensor& qweight, const torch::Tensor& table, int64_t K,
                              torch::ScalarType dtype) {
  TORCH_CHECK(qweight.scalar_type() == torch::kByte && qweight.is_contiguous() && table.is_contiguous() &&
                  table.scalar_type() == torch::kHalf && K <= qweight.size(1) * 2,
              "qweight, table: the blocks32 layout");
  const int64_t N = qweight.size(0), half_row = qweight.size(1), blocks = half_row / 16;
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const c10::Half* t = table.data_ptr<c10::Half>();
  auto row = [&](int64_t n, float* values) { int4_row(q + n * half_row, t + n * blocks * 2, (K + kBlock - 1) / kBlock, values); };
  return dequantized(N, K, dtype, row);
}

// One row of a tiles4x64 tile (its 64 columns of each chunk, 4 rows apart) times its scale.
__attribute__((target(AVX2_TARGET))) void int8_row(const int8_t* tile_row, int64_t K, float scale, float* values) {
  for (int64_t c = 0; c * 64 < K; ++c) {
    const int8_t* chunk = tile_row + c * 64 * kTileRows;
    const int64_t width = std::min<int64_t>(64, K - c * 64);
    for (int64_t j = 0; j < width; ++j) values[c * 64 + j] = static_cast<float>(chunk[j]) * scale;
  }
}

torch::Tensor dequantize_int8(const torch::Tensor& qweight, const torch::Tensor& scales, int64_t K,
                              torch::ScalarType dtype) {
  const int64_t N = scales.numel();
  TORCH_CHECK(qweight.scalar_type() == torch::kChar && qweight.is_contiguous() && qweight.dim() == 4 &&
                  qweight.size(0) == (N + kTileRows - 1) / kTileRows && K <= qweight.size(1) * 64,
              "qweight: int8 in the tiles4x64 layout, scales [N]");
  const int64_t chunks = qweight.size(1);
  const int8_t* q = qweight.data_ptr<int8_t>();
  const torch::Tensor s32 = scales.to(torch::kFloat).contiguous();
  const float* s = s32.data_ptr<float>();
  auto row = [&](int64_t n, float* values) {
    int8_row(q + (n / kTileRows) * chunks * 64 * kTileRows + (n % kTileRows) * 64, K, s[n], values);
  };
  return dequantized(N, K, dtype, row);
}

// Which instruction sets this CPU can run, best first.
std::vector<std::string> supported_isas() {
  std::vector<std::string> isas;
  for (const char* name : {"avx512_vnni", "avx_vnni", "avx2"}) {
    try {
      choose_isa(name);
      isas.push_back(name);
    } catch (const c10::Error&) {
    }
  }
  return isas;
}

void register_decode_ops(pybind11::module& m);     // decode_ops.cpp
void register_float_linear(pybind11::module& m);  // float_linear.cpp
void register_quantized_gemm(pybind11::module& m);  // quantized_gemm.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode_ops(m);
  register_float_linear(m);
  register_quantized_gemm(m);
  llminfer::register_step_graph(m);
  llminfer::register_graph_kernel("int8_linear", llminfer::node_factory(&int8_linear_out));
  llminfer::register_graph_kernel("int4_linear", llminfer::node_factory(&int4_linear_out));
  m.def("int8_linear", &int8_linear, "int8-weight linear (tiles4x64 layout) with int8 activations in blocks of 32");
  m.def("int4_linear", &int4_linear, "int4-weight linear (blocks32 layout) with int8 activations in blocks of 32");
  m.def("dequantize_int4", &dequantize_int4, "blocks32 int4 weights as a float matrix");
  m.def("dequantize_int8", &dequantize_int8, "int8 tiles4x64 weights times their row scales as a float matrix [N, K]");
  m.def("supported_isas", &supported_isas, "instruction sets this CPU runs, best first");
}
