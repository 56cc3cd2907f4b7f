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

// A winners entry (layout: max_align_kernel.h) for a query token whose maximum is not reached
// by exactly one token (exact ties, or a NaN similarity): the backward recomputes its row.
inline constexpr int32_t kTied = -1;

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
