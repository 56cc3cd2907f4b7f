// Pooling loops of the fused CPU max kernel over one similarity tile C [rows, cols] (row-major,
// leading dimension ldc; rows are image tokens, columns words). Plain loops with `omp simd`
// so that -O3 -march=native turns them into vector max/blend/FMA instructions.
#pragma once
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>

namespace hatkernels::cpu::max_pool {

// q[w] = max over the rows of C[r, w] (one image's rows: every word's best image token).
inline void column_max(const float* c, int64_t ldc, int64_t rows, int64_t cols, float* q) {
  std::memcpy(q, c, sizeof(float) * cols);
  for (int64_t r = 1; r < rows; ++r) {
    const float* cr = c + r * ldc;
#pragma omp simd
    for (int64_t w = 0; w < cols; ++w) q[w] = cr[w] > q[w] ? cr[w] : q[w];
  }
}

// As column_max, also the first winning row of every column and how many rows tie with it
// (the gradient is shared among exact ties, as torch's amax does).
inline void column_argmax(const float* c, int64_t ldc, int64_t rows, int64_t cols, float* q,
                          int32_t* idx, int32_t* ties) {
  std::memcpy(q, c, sizeof(float) * cols);
  std::memset(idx, 0, sizeof(int32_t) * cols);
  std::fill(ties, ties + cols, 1);
  for (int64_t r = 1; r < rows; ++r) {
    const float* cr = c + r * ldc;
    const int32_t rr = static_cast<int32_t>(r);
#pragma omp simd
    for (int64_t w = 0; w < cols; ++w) {
      const bool better = cr[w] > q[w];
      ties[w] = better ? 1 : ties[w] + (cr[w] == q[w] ? 1 : 0);
      q[w] = better ? cr[w] : q[w];
      idx[w] = better ? rr : idx[w];
    }
  }
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

}  // namespace hatkernels::cpu::max_pool
