// The loop both linear kernels run: output rows split over torch's intra-op threads in contiguous ranges of whole
// row tiles (at least 4 tiles a thread), and within a range, tiles of kRowsOfX rows of x by kRowsOfW weight rows.
// A tile is `tile(std::integral_constant<int, MR>, std::integral_constant<int, NR>, m0, n0)`, so that the kernel
// is instantiated for each (MR, NR) it is called with. Weights padded to whole row tiles (kPaddedRows) always take
// NR = kRowsOfW (the padding rows are computed, not stored); the others end row by row.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace llminfer {

constexpr int kRowsOfX = 4;  // rows of x per tile
constexpr int kRowsOfW = 4;  // weight rows per tile

template <bool kPaddedRows, typename TileFn>
void for_each_tile(int64_t M, int64_t N, TileFn&& tile) {
  using Full = std::integral_constant<int, kRowsOfW>;
  using OneRow = std::integral_constant<int, 1>;
  using RowsOfX = std::integral_constant<int, kRowsOfX>;
  at::parallel_for(0, (N + kRowsOfW - 1) / kRowsOfW, 4, [&](int64_t begin, int64_t end) {
    const int64_t n_end = std::min(N, end * kRowsOfW);
    for (int64_t n = begin * kRowsOfW; n < n_end;) {
      const bool full = kPaddedRows || n + kRowsOfW <= n_end;
      int64_t m = 0;
      if constexpr (kPaddedRows) {
        for (; m + kRowsOfX <= M; m += kRowsOfX) tile(RowsOfX{}, Full{}, m, n);
        for (; m < M; ++m) tile(OneRow{}, Full{}, m, n);
      } else {
        for (; m + kRowsOfX <= M; m += kRowsOfX) full ? tile(RowsOfX{}, Full{}, m, n) : tile(RowsOfX{}, OneRow{}, m, n);
        for (; m < M; ++m) full ? tile(OneRow{}, Full{}, m, n) : tile(OneRow{}, OneRow{}, m, n);
      }
      n += full ? kRowsOfW : 1;
    }
  });
}

}  // namespace llminfer
