// Pooling loops of the fused CPU max kernel over one similarity tile C [rows, cols] (row-major,
// leading dimension ldc; rows are image tokens, columns words). Plain loops with `omp simd`
// so that -O3 turns them into vector max/blend/FMA instructions of each level (isa.h).
#pragma once
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>

namespace hatkernels::cpu::HATK_CPU_LEVEL::max_pool {

// q[w] = max over the rows of C[r, w] (one image's rows: every word's best image token).
// A winners entry (layout: max_align_kernel.h) for a query token whose maximum is not reached
// by exactly one token (exact ties, or a NaN similarity): the backward recomputes its row.
inline constexpr int32_t kTied = -1;

inline void column_max(const float* c, int64_t ldc, int64_t rows, int64_t cols, float* q) {
  std::memcpy(q, c, sizeof(float) * cols);
  for (int64_t r = 1; r < rows; ++r) {
    const float* cr = c + r * ldc;
#pragma omp simd
    for (int64_t w = 0; w < cols; ++w) q[w] = cr[w] > q[w] ? cr[w] : q[w];
  }
}

// As column_max, also a winning row of every column and how many rows tie with it (the
// gradient is shared among exact ties, as torch's amax does): a max pass, then an equality
// pass, cheaper than carrying index and count through the max.
inline void column_argmax(const float* c, int64_t ldc, int64_t rows, int64_t cols, float* q,
                          int32_t* idx, int32_t* ties) {
  column_max(c, ldc, rows, cols, q);
  std::memset(ties, 0, sizeof(int32_t) * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float* cr = c + r * ldc;
    const int32_t rr = static_cast<int32_t>(r);
#pragma omp simd
    for (int64_t w = 0; w < cols; ++w) {
      if (cr[w] == q[w]) {
        idx[w] = rr;
        ties[w] += 1;
      }
    }
  }
}


// The index of the only entry of x[0, n) equal to m (x's maximum), or kTied when several are
// (or none: NaN); segment_argmax's answer wherever it finds no ties.
inline int32_t sole_argmax(const float* x, int64_t n, float m) {
  int32_t k = kTied;
  int64_t hits = 0;
  for (int64_t l = 0; l < n; ++l) {
    if (x[l] != m) continue;
    k = static_cast<int32_t>(l);
    ++hits;
  }
  return hits == 1 ? k : kTied;
}

// As column_max (the same q, bit for bit), also every column's winner: the only row reaching
// q[w], or kTied where several do (or none: a NaN in row 0). One pass: a row that beats the
// best so far becomes the winner with count 1, one that equals it adds 1 to the count. With
// AVX-512, 64 columns at a time with best, winner and count in registers; otherwise row by
// row with them in L1 (cols entries each; count in win's place until the end).
inline void column_winners(const float* c, int64_t ldc, int64_t rows, int64_t cols, float* q,
                           int32_t* win, int32_t* at) {
#if HATK_CPU_AVX512
  (void)at;
  constexpr int kV = 4;  // vectors per pass: independent chains
  const __m512 none = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t w0 = 0; w0 < cols; w0 += 16 * kV) {
    __mmask16 mask[kV];
    __m512 best[kV];
    __m512i row[kV], count[kV];
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) {
      const int64_t left = std::clamp<int64_t>(cols - w0 - 16 * v, 0, 16);
      mask[v] = static_cast<__mmask16>((1u << left) - 1u);
      best[v] = _mm512_mask_loadu_ps(none, mask[v], c + w0 + 16 * v);
      row[v] = _mm512_setzero_si512();
      count[v] = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(best[v], best[v], _CMP_EQ_OQ), one);
    }
    for (int64_t r = 1; r < rows; ++r) {
      const float* cr = c + r * ldc + w0;
      const __m512i rr = _mm512_set1_epi32(static_cast<int32_t>(r));
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) {
        const __m512 x = _mm512_mask_loadu_ps(none, mask[v], cr + 16 * v);
        const __mmask16 up = _mm512_cmp_ps_mask(x, best[v], _CMP_GT_OQ);
        const __mmask16 same = _mm512_cmp_ps_mask(x, best[v], _CMP_EQ_OQ);
        count[v] = _mm512_mask_mov_epi32(_mm512_mask_add_epi32(count[v], same, count[v], one),
                                         up, one);
        row[v] = _mm512_mask_mov_epi32(row[v], up, rr);
        best[v] = _mm512_mask_mov_ps(best[v], up, x);
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) {
      const __mmask16 sole = _mm512_cmpeq_epi32_mask(count[v], one);
      const __m512i w = _mm512_mask_mov_epi32(_mm512_set1_epi32(kTied), sole, row[v]);
      _mm512_mask_storeu_ps(q + w0 + 16 * v, mask[v], best[v]);
      _mm512_mask_storeu_epi32(win + w0 + 16 * v, mask[v], w);
    }
  }
#else
  std::memcpy(q, c, sizeof(float) * cols);
  int32_t* count = win;
#pragma omp simd
  for (int64_t w = 0; w < cols; ++w) {
    at[w] = 0;
    count[w] = q[w] == q[w] ? 1 : 0;
  }
  for (int64_t r = 1; r < rows; ++r) {
    const float* cr = c + r * ldc;
    const int32_t rr = static_cast<int32_t>(r);
#pragma omp simd
    for (int64_t w = 0; w < cols; ++w) {
      const bool up = cr[w] > q[w];
      count[w] = up ? 1 : count[w] + (cr[w] == q[w] ? 1 : 0);
      at[w] = up ? rr : at[w];
      q[w] = up ? cr[w] : q[w];
    }
  }
#pragma omp simd
  for (int64_t w = 0; w < cols; ++w) win[w] = count[w] == 1 ? at[w] : kTied;
#endif
}

inline float segment_sum(const float* x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k];
  return s;
}

inline float segment_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) m = x[k] > m ? x[k] : m;
  return m;
}

// Index of the first maximum of x[0, n); ties gets how many entries equal that maximum.
inline int64_t segment_argmax(const float* x, int64_t n, int64_t& ties) {
  const float m = segment_max(x, n);
  int64_t k = 0;
  while (k + 1 < n && x[k] != m) ++k;
  ties = 1;
  for (int64_t l = k + 1; l < n; ++l) ties += x[l] == m ? 1 : 0;
  return k;
}

// y += a * x over d floats.
inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) y[k] += a * x[k];
}

// y1 += a * x1 and y2 += a * x2 in one pass (a winner's two gradient rows).
inline void axpy2(float* __restrict y1, const float* __restrict x1, float* __restrict y2,
                  const float* __restrict x2, float a, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    y1[k] += a * x1[k];
    y2[k] += a * x2[k];
  }
}

// One word's t2i winners over a tile's images (pair p: coefficient a[p], winner rows
// v[p] / dv[p]): dv[p] += a[p] t and dt += sum_p a[p] v[p]. Chunks of 64 floats keep t and
// the running sum in registers, so dt is read and written once per tile.
inline void scatter_word(float* __restrict dt, const float* __restrict t, int64_t pairs,
                         float* const* dv, const float* const* v, const float* a, int64_t d) {
  constexpr int64_t kChunk = 64;
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    if (k0 + kChunk > d) {
      for (int64_t p = 0; p < pairs; ++p) axpy2(dv[p] + k0, t + k0, dt + k0, v[p] + k0, a[p], d - k0);
      return;
    }
    float tk[kChunk], acc[kChunk];
#pragma omp simd
    for (int64_t k = 0; k < kChunk; ++k) {
      tk[k] = t[k0 + k];
      acc[k] = 0.f;
    }
    for (int64_t p = 0; p < pairs; ++p) {
      float* __restrict y = dv[p] + k0;
      const float* __restrict x = v[p] + k0;
      const float ap = a[p];
#pragma omp simd
      for (int64_t k = 0; k < kChunk; ++k) {
        y[k] += ap * tk[k];
        acc[k] += ap * x[k];
      }
    }
#pragma omp simd
    for (int64_t k = 0; k < kChunk; ++k) dt[k0 + k] += acc[k];
  }
}

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::max_pool
