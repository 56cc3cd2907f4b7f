// Max pooling backward from saved winners (layout: max_align_kernel.h): two passes, each
// parallel over the gradient rows it writes. Entries marked kTied are left out (the caller
// adds their gradients from their tiles' recomputed similarities).
//
// A section of winners gives, for every key item k and query token q (a valid token of the
// other side), the row win(k, q) of item k that q's maximum comes from. With a(k, q) the
// output gradient of (k, q's item) over the mean's count:
//   gather:  dQ[q]            = sum over key items k of a(k, q) K[k][win(k, q)]
//   scatter: dK[k][win(k, q)] = sum over query tokens q of a(k, q) Q[q]
// t2i is one section (keys: images, queries: words; i2t runs as t2i of (texts, images));
// both adds a second one with the roles swapped (keys: captions, queries: image tokens).
//
// Gather: a task owns a block of whole query items (kQueryBytes of query rows) and runs it
// against blocks of key items (kKeyBytes); both blocks stay in L2, and each query token's sum
// runs in registers, kChunk floats at a time, over the key block's items in order.
// Scatter: a task owns a block of whole key items and runs it against blocks of query tokens;
// per key item and query block, the tokens are counting-sorted by winner (stable), and each
// winner row's bucket is summed in registers and added to its gradient row once.
// Each pair thus reads one row of each side, from L2, and stores nothing. No gradient row is
// written by two tasks (no partials, no atomics), and every sum runs in an order fixed by the
// inputs alone, so the gradients are bit-identical at any thread count. Pairs whose output
// gradient is zero are skipped.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/max_align_gemm.h"
#include "cpu/max_align_pool.h"
#include "cpu/max_align_tiles.h"

namespace hatkernels::cpu::HATK_CPU_LEVEL::max_scatter {

using max_tiles::Packed;
using max_tiles::RowDest;

// A running sum is kVectors vectors of kLanes floats kept in registers, added to with fused
// multiply-adds (the build turns off contraction, and the passes are bound by the FMA ports
// once their rows come from L2).
#if HATK_CPU_AVX512
using Vec = __m512;
constexpr int64_t kLanes = 16, kVectors = 4;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vmadd(float a, const float* x, Vec acc) {
  return _mm512_fmadd_ps(_mm512_set1_ps(a), _mm512_loadu_ps(x), acc);
}
#elif HATK_CPU_AVX2
using Vec = __m256;
constexpr int64_t kLanes = 8, kVectors = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vmadd(float a, const float* x, Vec acc) {
  return _mm256_fmadd_ps(_mm256_set1_ps(a), _mm256_loadu_ps(x), acc);
}
#else
typedef float Vec __attribute__((vector_size(16), aligned(4)));
constexpr int64_t kLanes = 4, kVectors = 8;
inline Vec vzero() { return Vec{}; }
inline Vec vload(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void vstore(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
inline Vec vmadd(float a, const float* x, Vec acc) { return acc + a * vload(x); }
#endif
constexpr int64_t kChunk = kLanes * kVectors;
// Block sizes (bytes of float32 rows) kept in L2 together: key items and query tokens.
constexpr int64_t kKeyBytes = int64_t{768} << 10, kQueryBytes = int64_t{640} << 10;

// One side of a section: its valid rows and their gradient rows (direct).
struct Side {
  const max_gemm::Rows* rows;
  const Packed* packed;
  RowDest grad;
};

struct Section {
  Side keys, queries;
  const int32_t* win;  // win(k, q) = win[k * win_k + q * win_q]
  int64_t win_k, win_q;
  const float* g;  // output gradient of (key item k, query item j) at g[k * g_k + j * g_q]
  int64_t g_k, g_q;
  bool mean;  // divide by the query item's length
  bool add;   // add into the gradients; else overwrite them (padding rows zeroed)

  int64_t winner(int64_t k, int64_t q) const { return win[k * win_k + q * win_q]; }
  float coef(int64_t k, int64_t j) const {
    const float a = g[k * g_k + j * g_q];
    if (!mean) return a;
    const std::vector<int64_t>& off = queries.packed->off;
    return a / static_cast<float>(off[j + 1] - off[j]);
  }
};

// out = (overwrite ? 0 : out) + sum over p < n of c[p] x[p], summed in order, kChunk floats at
// a time in registers.
inline void sum_rows(float* __restrict out, int64_t n, const float* const* x, const float* c,
                     int64_t d, bool overwrite) {
  int64_t k0 = 0;
  for (; k0 + kChunk <= d; k0 += kChunk) {
    Vec acc[kVectors];
    for (int64_t v = 0; v < kVectors; ++v)
      acc[v] = overwrite ? vzero() : vload(out + k0 + kLanes * v);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t v = 0; v < kVectors; ++v) acc[v] = vmadd(c[p], x[p] + k0 + kLanes * v, acc[v]);
    for (int64_t v = 0; v < kVectors; ++v) vstore(out + k0 + kLanes * v, acc[v]);
  }
  if (k0 == d) return;
  const int64_t len = d - k0;
  float acc[kChunk];
  for (int64_t k = 0; k < len; ++k) acc[k] = overwrite ? 0.f : out[k0 + k];
  for (int64_t p = 0; p < n; ++p)
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) acc[k] += c[p] * x[p][k0 + k];
  for (int64_t k = 0; k < len; ++k) out[k0 + k] = acc[k];
}

// Runs of whole items holding at most `bytes` of float32 rows (at least one item each).
inline std::vector<int64_t> blocks(const Packed& packed, int64_t bytes, int64_t d) {
  return max_tiles::group_items(packed.off, std::max<int64_t>(1, bytes / (4 * d)));
}

// The first valid row of every item of a side (an item's valid rows are contiguous).
inline std::vector<const float*> first_rows(const Side& side) {
  std::vector<const float*> first(side.packed->off.size() - 1);
  for (size_t k = 0; k < first.size(); ++k) first[k] = side.rows->row(side.packed->off[k]);
  return first;
}

// dQ of one section (see the top of this file).
inline void gather(const Section& s, int64_t d) {
  const Packed& kp = *s.keys.packed;
  const Packed& qp = *s.queries.packed;
  const std::vector<int64_t> kb = blocks(kp, kKeyBytes, d), qb = blocks(qp, kQueryBytes, d);
  const int64_t n_qb = static_cast<int64_t>(qb.size()) - 1;
  int64_t most_keys = 1;
  for (size_t b = 0; b + 1 < kb.size(); ++b) most_keys = std::max(most_keys, kb[b + 1] - kb[b]);
  const std::vector<const float*> key_row = first_rows(s.keys);
#pragma omp parallel
  {
    std::vector<float> coef(most_keys), c(most_keys);
    std::vector<const float*> x(most_keys);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < n_qb; ++b) {
      if (!s.add) {
        for (int64_t j = qb[b]; j < qb[b + 1]; ++j) {
          const int64_t len = qp.off[j + 1] - qp.off[j];
          float* item = s.queries.grad.base + j * s.queries.grad.max_len * d;
          std::fill(item + len * d, item + s.queries.grad.max_len * d, 0.f);
        }
      }
      for (size_t kk = 0; kk + 1 < kb.size(); ++kk) {
        const int64_t k0 = kb[kk], k1 = kb[kk + 1];
        for (int64_t j = qb[b]; j < qb[b + 1]; ++j) {
          for (int64_t k = k0; k < k1; ++k) coef[k - k0] = s.coef(k, j);
          for (int64_t q = qp.off[j]; q < qp.off[j + 1]; ++q) {
            int64_t n = 0;
            for (int64_t k = k0; k < k1; ++k) {
              const int64_t r = s.winner(k, q);
              if (coef[k - k0] == 0.f || r == max_pool::kTied) continue;
              x[n] = key_row[k] + r * d;
              c[n++] = coef[k - k0];
            }
            sum_rows(s.queries.grad.row(q), n, x.data(), c.data(), d, kk == 0 && !s.add);
          }
        }
      }
    }
  }
}

// dK of one section (see the top of this file).
inline void scatter(const Section& s, int64_t d) {
  const Packed& kp = *s.keys.packed;
  const Packed& qp = *s.queries.packed;
  const std::vector<int64_t> kb = blocks(kp, kKeyBytes, d), qb = blocks(qp, kQueryBytes, d);
  const std::vector<const float*> query_row = first_rows(s.queries);
  const int64_t n_kb = static_cast<int64_t>(kb.size()) - 1;
  int64_t most_rows = 1;
  for (size_t b = 0; b + 1 < qb.size(); ++b)
    most_rows = std::max(most_rows, qp.off[qb[b + 1]] - qp.off[qb[b]]);
#pragma omp parallel
  {
    std::vector<int64_t> start(s.keys.grad.max_len + 1);
    std::vector<float> coef(qp.off.size()), c(most_rows);
    std::vector<const float*> x(most_rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < n_kb; ++b) {
      if (!s.add) {
        float* first = s.keys.grad.base + kb[b] * s.keys.grad.max_len * d;
        std::fill(first, first + (kb[b + 1] - kb[b]) * s.keys.grad.max_len * d, 0.f);
      }
      for (size_t qq = 0; qq + 1 < qb.size(); ++qq) {
        const int64_t j0 = qb[qq], j1 = qb[qq + 1];
        for (int64_t k = kb[b]; k < kb[b + 1]; ++k) {
          const int64_t m = kp.off[k + 1] - kp.off[k];
          bool any = false;
          for (int64_t j = j0; j < j1; ++j) {
            coef[j] = s.coef(k, j);
            any = any || coef[j] != 0.f;
          }
          if (!any) continue;
          // Stable counting sort of the block's tokens by winner, straight into the rows and
          // coefficients sum_rows takes: bucket r is [start[r], start[r + 1]).
          std::fill(start.begin(), start.begin() + m + 1, 0);
          for (int64_t j = j0; j < j1; ++j) {
            if (coef[j] == 0.f) continue;
            for (int64_t q = qp.off[j]; q < qp.off[j + 1]; ++q) {
              const int64_t r = s.winner(k, q);
              if (r != max_pool::kTied) ++start[r + 1];
            }
          }
          for (int64_t r = 0; r < m; ++r) start[r + 1] += start[r];
          for (int64_t j = j0; j < j1; ++j) {
            if (coef[j] == 0.f) continue;
            for (int64_t q = qp.off[j]; q < qp.off[j + 1]; ++q) {
              const int64_t r = s.winner(k, q);
              if (r == max_pool::kTied) continue;
              x[start[r]] = query_row[j] + (q - qp.off[j]) * d;
              c[start[r]++] = coef[j];
            }
          }
          // start[r] is now the end of bucket r.
          for (int64_t r = 0, begin = 0; r < m; begin = start[r++]) {
            if (start[r] == begin) continue;
            sum_rows(s.keys.grad.row(kp.off[k] + r), start[r] - begin, x.data() + begin,
                     c.data() + begin, d, false);
          }
        }
      }
    }
  }
}

inline void backward(const Section& s, int64_t d) {
  gather(s, d);
  scatter(s, d);
}

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::max_scatter
