// The similarity GEMM of one tile, C [rows, cols] = V_tile T_tile^T, for the fused CPU max
// kernel. At the AVX-512 level (isa.h) the operands are packed once per call into
// register-blocked panels and a 12 x 32 micro-kernel computes each tile (no per-tile packing;
// MKL on this AMD EPYC reached about 0.6 of the FMA peak through sgemm_). At the other
// levels, valid tokens are packed row-major and MKL's sgemm_ (gemm.h), which picks its own
// code for the CPU at run time, computes the tile.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cpu/gemm.h"

namespace hatkernels::cpu::HATK_CPU_LEVEL::max_gemm {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using AlignedFloats = std::unique_ptr<float[], FreeDeleter>;

inline AlignedFloats aligned_floats(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 16)) * sizeof(float) + 63) / 64 * 64;
  auto* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return AlignedFloats(p);
}

#if HATK_CPU_AVX512
inline constexpr bool kPanels = true;
#else
inline constexpr bool kPanels = false;
#endif

inline constexpr int64_t kMR = 12;  // rows (image tokens) per register block
inline constexpr int64_t kNR = 32;  // columns (words) per strip: two 16-float vectors

// Row getter: the address of packed row r (r counts valid tokens of one side, in order).
struct Rows {
  const float* base;            // [items, max_len, d]
  const int64_t* off;           // packed offsets per item
  const int32_t* owner;         // packed row -> item
  int64_t max_len, d;
  const float* row(int64_t r) const {
    const int64_t b = owner[r];
    return base + (b * max_len + r - off[b]) * d;
  }
};

// Image side, rows [r0, r0 + rows) of every group packed in blocks of kMR rows, each block
// [d][mr] (mr = its row count), so a group's packed data starts at r0 * d.
inline void pack_row_blocks(const Rows& src, int64_t r0, int64_t rows, float* dst) {
  const int64_t d = src.d;
  for (int64_t b0 = 0; b0 < rows; b0 += kMR) {
    const int64_t mr = std::min(kMR, rows - b0);
    float* blk = dst + (r0 + b0) * d;
    for (int64_t r = 0; r < mr; ++r) {
      const float* x = src.row(r0 + b0 + r);
      for (int64_t k = 0; k < d; ++k) blk[k * mr + r] = x[k];
    }
  }
}

// Text side, columns [w0, w0 + cols) of a group packed in strips of kNR words, each strip
// [d][kNR], zero-filled past the group's last word; dst holds ceil(cols / kNR) strips.
inline void pack_col_strips(const Rows& src, int64_t w0, int64_t cols, float* dst) {
  const int64_t d = src.d;
  for (int64_t s0 = 0; s0 < cols; s0 += kNR) {
    float* strip = dst + s0 * d;
    const int64_t nc = std::min(kNR, cols - s0);
    for (int64_t w = 0; w < kNR; ++w) {
      if (w >= nc) {
        for (int64_t k = 0; k < d; ++k) strip[k * kNR + w] = 0.f;
        continue;
      }
      const float* x = src.row(w0 + s0 + w);
      for (int64_t k = 0; k < d; ++k) strip[k * kNR + w] = x[k];
    }
  }
}

#if HATK_CPU_AVX512
// c[MR, ncols] = a [d][MR] x b [d][kNR] (ncols <= 16 * NV valid columns stored).
template <int MR, int NV>
inline void micro_kernel(const float* __restrict a, const float* __restrict b, int64_t d,
                         float* __restrict c, int64_t ldc, int ncols) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(b + k * kNR + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[k * MR + r]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
    }
  }
  if (ncols == 16 * NV) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
    return;
  }
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    const int left = std::clamp(ncols - 16 * v, 0, 16);
    const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mask, acc[r][v]);
  }
}

template <int NV>
inline void micro_dispatch(int64_t mr, const float* a, const float* b, int64_t d, float* c,
                           int64_t ldc, int ncols) {
  switch (mr) {
#define HATK_MR_CASE(R) \
  case R:               \
    return micro_kernel<R, NV>(a, b, d, c, ldc, ncols);
    HATK_MR_CASE(1) HATK_MR_CASE(2) HATK_MR_CASE(3) HATK_MR_CASE(4) HATK_MR_CASE(5)
    HATK_MR_CASE(6) HATK_MR_CASE(7) HATK_MR_CASE(8) HATK_MR_CASE(9) HATK_MR_CASE(10)
    HATK_MR_CASE(11) HATK_MR_CASE(12)
#undef HATK_MR_CASE
    default:
      return;
  }
}

// C [rows, cols] (leading dimension ldc) from a group's row blocks and a group's strips.
inline void panel_gemm(const float* a, int64_t rows, const float* b, int64_t cols, int64_t d,
                       float* c, int64_t ldc) {
  for (int64_t s0 = 0; s0 < cols; s0 += kNR) {
    const int nc = static_cast<int>(std::min(kNR, cols - s0));
    const float* strip = b + s0 * d;
    for (int64_t b0 = 0; b0 < rows; b0 += kMR) {
      const int64_t mr = std::min(kMR, rows - b0);
      float* cb = c + b0 * ldc + s0;
      if (nc > 16)
        micro_dispatch<2>(mr, a + b0 * d, strip, d, cb, ldc, nc);
      else
        micro_dispatch<1>(mr, a + b0 * d, strip, d, cb, ldc, nc);
    }
  }
}
#endif

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::max_gemm
