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
template <class Src, class T>
inline void pack_row_blocks(const Src& src, int64_t r0, int64_t rows, T* dst) {
  const int64_t d = src.d;
  for (int64_t b0 = 0; b0 < rows; b0 += kMR) {
    const int64_t mr = std::min(kMR, rows - b0);
    T* blk = dst + (r0 + b0) * d;
    for (int64_t r = 0; r < mr; ++r) {
      const T* x = src.row(r0 + b0 + r);
      for (int64_t k = 0; k < d; ++k) blk[k * mr + r] = x[k];
    }
  }
}

// Text side, columns [w0, w0 + cols) of a group packed in strips of kNR words, each strip
// [d][kNR], zero-filled past the group's last word; dst holds ceil(cols / kNR) strips.
template <class Src, class T>
inline void pack_col_strips(const Src& src, int64_t w0, int64_t cols, T* dst) {
  const int64_t d = src.d;
  for (int64_t s0 = 0; s0 < cols; s0 += kNR) {
    T* strip = dst + s0 * d;
    const int64_t nc = std::min(kNR, cols - s0);
    for (int64_t w = 0; w < kNR; ++w) {
      if (w >= nc) {
        for (int64_t k = 0; k < d; ++k) strip[k * kNR + w] = T{0};
        continue;
      }
      const T* x = src.row(w0 + s0 + w);
      for (int64_t k = 0; k < d; ++k) strip[k * kNR + w] = x[k];
    }
  }
}

#if HATK_CPU_AVX512
// The micro-kernel's element type: float32 FMA, or (exact screening, max_align_screen.h) int8
// codes four to a 32-bit lane, unsigned on the broadcast (image) side and signed on the strip
// side, multiplied and summed in int32 by VNNI's vpdpbusd. The int8 instantiation only runs
// where the CPU has AVX-512 VNNI (checked at run time), so the GEMM functions carry that
// target; the float32 instantiation uses no VNNI instruction.
#define HATK_VNNI __attribute__((target("avx512vnni")))

struct F32 {
  using T = float;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const T* p) { return _mm512_load_ps(p); }
  static V broadcast(T x) { return _mm512_set1_ps(x); }
  static V madd(V acc, V a, V b) { return _mm512_fmadd_ps(a, b, acc); }
  static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(T* p, __mmask16 m, V v) { _mm512_mask_storeu_ps(p, m, v); }
};

struct I8 {
  using T = int32_t;
  using V = __m512i;
  HATK_VNNI static V zero() { return _mm512_setzero_si512(); }
  HATK_VNNI static V load(const T* p) { return _mm512_loadu_si512(p); }
  HATK_VNNI static V broadcast(T x) { return _mm512_set1_epi32(x); }
  // In-place accumulation: with the intrinsic, GCC 12 copies and spills the accumulators.
  HATK_VNNI static V madd(V acc, V a, V b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
  }
  HATK_VNNI static void store(T* p, V v) { _mm512_storeu_si512(p, v); }
  HATK_VNNI static void store(T* p, __mmask16 m, V v) { _mm512_mask_storeu_epi32(p, m, v); }
};

// The same two layouts from a matrix stored K-major, src [k, ld] row-major (so the rows of
// the product's operand are src's columns): rows [0, rows) of src^T in blocks of kMR, and
// columns [0, cols) of src in strips of kNR, zero-filled past cols. For the scan backward's
// products dS T and dS^T V, whose operands dS, T and V come row-major. Masked vector copies:
// std::copy of 12 floats had become a memmove call per row.
inline void pack_row_blocks_kmajor(const float* src, int64_t ld, int64_t k, int64_t rows,
                                   float* dst) {
  for (int64_t b0 = 0; b0 < rows; b0 += kMR) {
    const int64_t mr = std::min(kMR, rows - b0);
    const __mmask16 mask = static_cast<__mmask16>((1u << mr) - 1u);
    float* blk = dst + b0 * k;
    for (int64_t kk = 0; kk < k; ++kk) {
      const __m512 row = _mm512_maskz_loadu_ps(mask, src + kk * ld + b0);
      _mm512_mask_storeu_ps(blk + kk * mr, mask, row);
    }
  }
}

inline void pack_col_strips_kmajor(const float* src, int64_t ld, int64_t k, int64_t cols,
                                   float* dst) {
  for (int64_t s0 = 0; s0 < cols; s0 += kNR) {
    float* strip = dst + s0 * k;
    const int64_t nc = std::min(kNR, cols - s0);
    const __mmask16 lo = static_cast<__mmask16>((1u << std::min<int64_t>(nc, 16)) - 1u);
    const __mmask16 hi = static_cast<__mmask16>((1u << std::max<int64_t>(nc - 16, 0)) - 1u);
    for (int64_t kk = 0; kk < k; ++kk) {  // whole strips, zeros past cols
      const float* x = src + kk * ld + s0;
      _mm512_store_ps(strip + kk * kNR, _mm512_maskz_loadu_ps(lo, x));
      _mm512_store_ps(strip + kk * kNR + 16, _mm512_maskz_loadu_ps(hi, x + 16));
    }
  }
}

// c[MR, ncols] = a [d][MR] x b [d][kNR] (ncols <= 16 * NV valid columns stored; Acc: added
// to c, float32 only).
template <class K, int MR, int NV, bool Acc = false>
HATK_VNNI inline void micro_kernel(const typename K::T* __restrict a,
                                   const typename K::T* __restrict b, int64_t d,
                                   typename K::T* __restrict c, int64_t ldc, int ncols) {
  typename K::V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = K::zero();
  for (int64_t k = 0; k < d; ++k) {
    typename K::V bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = K::load(b + k * kNR + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename K::V ar = K::broadcast(a[k * MR + r]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = K::madd(acc[r][v], ar, bv[v]);
    }
  }
  if (ncols == 16 * NV) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        typename K::T* out = c + r * ldc + 16 * v;
        if constexpr (Acc) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_loadu_ps(out));
        K::store(out, acc[r][v]);
      }
    return;
  }
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    const int left = std::clamp(ncols - 16 * v, 0, 16);
    const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      typename K::T* out = c + r * ldc + 16 * v;
      if constexpr (Acc) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(mask, out));
      K::store(out, mask, acc[r][v]);
    }
  }
}

template <class K, int NV, bool Acc>
HATK_VNNI inline void micro_dispatch(int64_t mr, const typename K::T* a, const typename K::T* b,
                                     int64_t d, typename K::T* c, int64_t ldc, int ncols) {
  switch (mr) {
#define HATK_MR_CASE(R) \
  case R:               \
    return micro_kernel<K, R, NV, Acc>(a, b, d, c, ldc, ncols);
    HATK_MR_CASE(1) HATK_MR_CASE(2) HATK_MR_CASE(3) HATK_MR_CASE(4) HATK_MR_CASE(5)
    HATK_MR_CASE(6) HATK_MR_CASE(7) HATK_MR_CASE(8) HATK_MR_CASE(9) HATK_MR_CASE(10)
    HATK_MR_CASE(11) HATK_MR_CASE(12)
#undef HATK_MR_CASE
    default:
      return;
  }
}

// C [rows, cols] (leading dimension ldc) from a group's row blocks and a group's strips
// (d: the elements of K::T per row, so d / 4 words of int8 codes for I8); Acc: C += instead.
template <class K = F32, bool Acc = false>
HATK_VNNI inline void panel_gemm(const typename K::T* a, int64_t rows, const typename K::T* b,
                                 int64_t cols, int64_t d, typename K::T* c, int64_t ldc) {
  for (int64_t s0 = 0; s0 < cols; s0 += kNR) {
    const int nc = static_cast<int>(std::min(kNR, cols - s0));
    const typename K::T* strip = b + s0 * d;
    for (int64_t b0 = 0; b0 < rows; b0 += kMR) {
      const int64_t mr = std::min(kMR, rows - b0);
      typename K::T* cb = c + b0 * ldc + s0;
      if (nc > 16)
        micro_dispatch<K, 2, Acc>(mr, a + b0 * d, strip, d, cb, ldc, nc);
      else
        micro_dispatch<K, 1, Acc>(mr, a + b0 * d, strip, d, cb, ldc, nc);
    }
  }
}
#endif

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::max_gemm
