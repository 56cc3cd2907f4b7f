// 16-float vectors (GCC/Clang vector extensions: one zmm register at the AVX-512 level, two
// ymm registers at AVX2, four xmm registers at the x86-64 baseline), an exp accurate to ~1 ulp,
// a 16 x 16 transpose, the horizontal sums of 16 vectors at once, and a register-blocked small
// matrix product for the scan pooling loops (scan_align_pair.h).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

// Below AVX-512, GCC notes (at the end of the file that includes this) that 64-byte vector
// returns change the ABI; these functions are all inline, so no ABI is crossed.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace hatkernels::cpu::HATK_CPU_LEVEL::scan {

constexpr int64_t kLanes = 16;  // floats per vector; buffers are padded to and aligned on it

using V16 = float __attribute__((vector_size(64)));
using I16 = int32_t __attribute__((vector_size(64)));

inline int64_t pad_lanes(int64_t x) { return (x + kLanes - 1) / kLanes * kLanes; }

// Every lane x (a broadcast: `V16{} + x` would first add 0 to x, a scalar add that the
// compiler must keep because -0 + 0 = +0).
inline V16 splat(float x) { return V16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// The lanes below n (all for n >= 16, none for n <= 0), as a mask for a select.
inline I16 lanes_below(int64_t n) {
  I16 lane;
  for (int i = 0; i < 16; ++i) lane[i] = i;
  return lane < static_cast<int32_t>(n < 16 ? n : 16);
}

inline V16 load(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof(V16));
  return v;
}

inline void store(float* p, V16 v) { std::memcpy(p, &v, sizeof(V16)); }

// a * b + c, fused (one rounding) where the level has FMA instructions.
inline V16 fmadd(V16 a, V16 b, V16 c) {
#if HATK_CPU_AVX512
  return _mm512_fmadd_ps(a, b, c);
#elif HATK_CPU_AVX2
  const __m256 lo = _mm256_fmadd_ps(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7),
                                    __builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7),
                                    __builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 hi = _mm256_fmadd_ps(__builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15),
                                    __builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15),
                                    __builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return a * b + c;
#endif
}

// Horizontal sum / max by halving (a tree, as the vector reductions of omp simd).
inline float hsum(V16 v) {
  using V8 = float __attribute__((vector_size(32)));
  using V4 = float __attribute__((vector_size(16)));
  const V8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 b =
      __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float hmax(V16 v) {
  using V8 = float __attribute__((vector_size(32)));
  using V4 = float __attribute__((vector_size(16)));
  const V8 a0 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const V8 a1 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V8 a = a0 > a1 ? a0 : a1;
  const V4 b0 = __builtin_shufflevector(a, a, 0, 1, 2, 3);
  const V4 b1 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const V4 b = b0 > b1 ? b0 : b1;
  const float c0 = b[0] > b[2] ? b[0] : b[2], c1 = b[1] > b[3] ? b[1] : b[3];
  return c0 > c1 ? c0 : c1;
}

inline V16 vmax(V16 a, V16 b) { return a > b ? a : b; }

// The transpose of a 16 x 16 block held as 16 row vectors, in place: four rounds of
// interleaving vector i with vector i + 8 (a perfect shuffle), 64 two-source shuffles.
inline void transpose16(V16* v) {
  for (int round = 0; round < 4; ++round) {
    V16 out[16];
    for (int i = 0; i < 8; ++i) {
      out[2 * i] = __builtin_shufflevector(v[i], v[i + 8], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5,
                                           21, 6, 22, 7, 23);
      out[2 * i + 1] = __builtin_shufflevector(v[i], v[i + 8], 8, 24, 9, 25, 10, 26, 11, 27, 12,
                                               28, 13, 29, 14, 30, 15, 31);
    }
    for (int i = 0; i < 16; ++i) v[i] = out[i];
  }
}

// The horizontal sums of 16 vectors at once: lane i of the result is the sum of v[i]'s lanes.
// A transposing tree (8 + 4 + 2 + 1 shuffle-and-add steps instead of 16 separate hsums);
// every step pairs a vector's lanes with each other only, so each lane is the sum of its own
// vector in a fixed order, whatever the other vectors hold.
inline V16 hsum16(const V16* v) {
  V16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

// out[r] = the sum of the 16 lanes of vecs[r] (vecs: [n] vectors), 16 rows at a time. vecs
// is read in whole groups of 16 (it holds pad_lanes(n) vectors; the ones past n only reach
// their own lanes, which are not stored).
inline void row_sums(const float* vecs, int64_t n, float* out) {
  for (int64_t r0 = 0; r0 < n; r0 += 16) {
    V16 v[16];
    for (int i = 0; i < 16; ++i) v[i] = load(vecs + (r0 + i) * 16);
    float sums[16];
    store(sums, hsum16(v));
    std::memcpy(out + r0, sums, static_cast<size_t>(n - r0 < 16 ? n - r0 : 16) * 4);
  }
}

// Square roots, correctly rounded (as std::sqrt).
inline V16 vsqrt(V16 x) {
#if HATK_CPU_AVX512
  return _mm512_sqrt_ps(x);
#elif HATK_CPU_AVX2
  const __m256 lo = _mm256_sqrt_ps(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 hi = _mm256_sqrt_ps(__builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  for (int i = 0; i < 16; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}

// LeakyReLU with slope 0.1 and its derivative (x > 0: 1, else 0.1, as torch's backward).
inline V16 leaky(V16 x) { return x > 0.f ? x : x * 0.1f; }
inline V16 leaky_slope(V16 x) { return x > 0.f ? splat(1.f) : splat(0.1f); }

// exp(x) within ~1 ulp for x <= 88 (the softmax's arguments are <= 0) (Cephes expf: n =
// round(x / ln 2) read from the mantissa of x / ln 2 + 1.5 * 2^23, Cody-Waite reduction,
// degree-6 polynomial, 2^n from exponent bits); exactly 0 below -87.3, where expf is
// subnormal (so exp(-inf) = 0: the lanes below -87.3 are replaced at the end, whatever the
// steps before made of them).
inline V16 exp16(V16 x) {
  const V16 low = splat(-87.3f), shift = splat(12582912.f);
  const V16 t = fmadd(x, splat(1.44269504088896341f), shift);
  const V16 n = t - shift;
  V16 r = fmadd(n, splat(-0.693359375f), x);
  r = fmadd(n, splat(2.12194440e-4f), r);
  V16 y = splat(1.9875691500e-4f);
  y = fmadd(y, r, splat(1.3981999507e-3f));
  y = fmadd(y, r, splat(8.3334519073e-3f));
  y = fmadd(y, r, splat(4.1665795894e-2f));
  y = fmadd(y, r, splat(1.6666665459e-1f));
  y = fmadd(y, r, splat(5.0000001201e-1f));
  y = fmadd(y, r * r, r) + 1.f;
  const I16 bits = ((__builtin_bit_cast(I16, t) - 0x4B400000) + 127) << 23;
  const V16 scale = __builtin_bit_cast(V16, bits);
  return x < low ? splat(0.f) : y * scale;
}

// C[i, :w] (=|+=) sum_k a(i, k) * s(k) * B[k, :w] for R rows i and C vectors of columns,
// a(i, k) = a[i * a_i + k * a_k], s(k) = scale[k] (or 1): the accumulators stay in registers.
template <int R, int NV, bool Scale>
inline void micro(const float* a, int64_t a_i, int64_t a_k, const float* scale, int64_t kn,
                  const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  V16 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V16{};
  for (int64_t k = 0; k < kn; ++k) {
    V16 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + v * kLanes);
    const float sk = Scale ? scale[k] : 1.f;
    for (int i = 0; i < R; ++i) {
      const V16 ai = splat(Scale ? a[i * a_i + k * a_k] * sk : a[i * a_i + k * a_k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = fmadd(ai, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < NV; ++v) {
      float* out = c + i * ldc + v * kLanes;
      store(out, accumulate ? load(out) + acc[i][v] : acc[i][v]);
    }
  }
}

// The same for one strip of NV vectors of columns, over `rows` rows: blocks of 8 rows (NV <= 2)
// or 4, then single rows.
template <int NV, bool Scale>
inline void strip_gemm(int64_t rows, const float* a, int64_t a_i, int64_t a_k,
                       const float* scale, int64_t kn, const float* b, int64_t ldb, float* c,
                       int64_t ldc, bool accumulate) {
  int64_t i = 0;
  if constexpr (NV <= 2) {
    for (; i + 8 <= rows; i += 8)
      micro<8, NV, Scale>(a + i * a_i, a_i, a_k, scale, kn, b, ldb, c + i * ldc, ldc, accumulate);
  }
  for (; i + 4 <= rows; i += 4)
    micro<4, NV, Scale>(a + i * a_i, a_i, a_k, scale, kn, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i < rows; ++i)
    micro<1, NV, Scale>(a + i * a_i, a_i, a_k, scale, kn, b, ldb, c + i * ldc, ldc, accumulate);
}

// The same over `rows` rows and `width` (a multiple of 16) columns, in strips of up to 4
// vectors (64 columns).
template <bool Scale>
inline void small_gemm(int64_t rows, int64_t width, const float* a, int64_t a_i, int64_t a_k,
                       const float* scale, int64_t kn, const float* b, int64_t ldb, float* c,
                       int64_t ldc, bool accumulate) {
  for (int64_t v = 0; v < width; v += 4 * kLanes) {
    const int64_t nv = (width - v) / kLanes;
    if (nv >= 4)
      strip_gemm<4, Scale>(rows, a, a_i, a_k, scale, kn, b + v, ldb, c + v, ldc, accumulate);
    else if (nv == 3)
      strip_gemm<3, Scale>(rows, a, a_i, a_k, scale, kn, b + v, ldb, c + v, ldc, accumulate);
    else if (nv == 2)
      strip_gemm<2, Scale>(rows, a, a_i, a_k, scale, kn, b + v, ldb, c + v, ldc, accumulate);
    else
      strip_gemm<1, Scale>(rows, a, a_i, a_k, scale, kn, b + v, ldb, c + v, ldc, accumulate);
  }
}

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::scan
