// Exact screened max pooling (AVX-512 VNNI): the t2i forward of one tile computed first from
// int8 codes of the tokens, then in float32 only for the candidates that can still be a
// word's maximum. The result equals the float32 kernel's up to float32 rounding of the
// winning dot product (same winners), never an approximation.
//
// Codes. Each valid token x (d floats) gets a scale s = max_k |x_k| / 127 and integer codes
// c_k = round(x_k / s) in [-127, 127]; its quantised vector is x' = s c. Image tokens are
// stored as c + 128 (unsigned bytes: vpdpbusd multiplies unsigned by signed bytes), words as
// c; the int32 GEMM of a tile gives sum_k (c_q + 128) c_k exactly (|.| <= d * 255 * 127, no
// overflow below d = 66,000), minus 128 sum_k c_k (per word) = <c_q, c_k>, and
// s' = <q', k'> = s_q s_k <c_q, c_k>, rounded to float32 in two steps (relative error <= 3u,
// u = 2^-24; the conversion to float is exact while |<c_q, c_k>| < 2^24).
//
// The bound. For an image token q and a word k, with e_q = |q - q'| and e_k = |k - k'|
// (Euclidean norms, computed in double from the actual codes), Cauchy-Schwarz gives
//   |<q, k> - <q', k'>| = |<q - q', k> + <q', k - k'>| <= e_q |k| + |q'| e_k.
// The float32 kernel's value s_f of <q, k> (d fused multiply-adds in some order) obeys
//   |s_f - <q, k>| <= gamma_d sum_k |q_k k_k| <= gamma_d |q| |k|, gamma_d = d u / (1 - d u),
// plus at most d * 2^-149 from gradual underflow. With N_x = max(|x|, |x'|) rounded up and
// R_x = e_x + c N_x, c = (gamma_d + 8u) / 2, the computed s' satisfies
//   |s_f - s'| <= E = R_q N_k + N_q R_k + 1e-30,
// where the 8u N_q N_k inside E covers the rounding of s' and of the few float32 operations
// that form E, s' - E and s' + E (each below 2u N_q N_k), and 1e-30 the underflow terms.
// So for one word and one image, with L = max_r (s'_r - E_r), every image token r with
// s'_r + E_r < L has s_f,r < L <= s_f,r* for the token r* reaching L: it is not the float32
// maximum and is dropped. The float32 maximum is among the others (the candidates), which are
// recomputed in float32 (row-major dot products), and the word takes their maximum.
// Comparisons are written so that NaN keeps a token a candidate; a tile whose norms could
// overflow (N_q N_k >= 1e30) or that leaves more than one candidate in kMaxCandidateShare of
// its entries (near-ties, huge dynamic range) is computed by the float32 kernel instead.
//
// Random unit tokens at d = 256 leave about 2.5 candidates per word and image of 49 tokens.
// Cost on W1 (256 images x 49 tokens, 1,280 captions, d = 256, 2-core AVX-512 Xeon): the int8
// GEMM takes about 0.28 of the float32 GEMM's time, but screening and the candidates' dot
// products take as much again, so the tile costs about what the float32 kernel does; a tile
// that falls back costs about 1.5x. Hence off by default (isa.h).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/max_align_gemm.h"

namespace hatkernels::cpu::HATK_CPU_LEVEL::max_screen {

#if HATK_CPU_AVX512

using max_gemm::I8;

// A tile falls back to float32 when it has more than one candidate per this many entries (a
// candidate's row-major dot product costs about as much as three entries of the GEMM).
constexpr int64_t kMaxCandidateShare = 6;

// One side's valid tokens as int8 codes, four per int32, row-major [rows][d4]; and per token
// the code scale, N and R of the bound (see above) and the sum of its codes.
struct Codes {
  std::vector<int32_t> words;
  std::vector<float> scale, norm, radius;
  std::vector<int32_t> sum;
  int64_t d4 = 0;
  int64_t d = 0;  // words per row, for max_gemm::pack_* (= d4)
  const int32_t* row(int64_t r) const { return words.data() + r * d4; }
};

// Codes of packed rows [0, rows) of src (offset: 128 for the unsigned image side, else 0).
inline Codes quantise(const max_gemm::Rows& src, int64_t rows, int offset) {
  Codes q;
  const int64_t d = src.d, d4 = (d + 3) / 4;
  q.d4 = q.d = d4;
  q.words.assign(rows * d4, 0);
  q.scale.resize(rows);
  q.norm.resize(rows);
  q.radius.resize(rows);
  q.sum.resize(rows);
  const double u = std::ldexp(1.0, -24), gamma = d * u / (1 - d * u), c = (gamma + 8 * u) / 2;
  // Rounded up past the double rounding of the norms and their conversion to float.
  const double up = 1 + 1e-6;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src.row(r);
    float amax = 0.f;
    for (int64_t k = 0; k < d; ++k) amax = std::max(amax, std::fabs(x[k]));
    float s = amax / 127.f;
    if (!(s > 0.f) || !std::isfinite(s) || !std::isfinite(127.f / s)) s = 0.f;
    auto* bytes = reinterpret_cast<uint8_t*>(q.words.data() + r * d4);
    double xx = 0, qq = 0, ee = 0;
    int32_t sum = 0;
    for (int64_t k = 0; k < d; ++k) {
      const int code =
          s > 0.f ? static_cast<int>(std::clamp(std::nearbyint(x[k] / s), -127.f, 127.f)) : 0;
      const double xq = static_cast<double>(s) * code;
      xx += static_cast<double>(x[k]) * x[k];
      qq += xq * xq;
      ee += (x[k] - xq) * (x[k] - xq);
      sum += code;
      bytes[k] = static_cast<uint8_t>(code + offset);
    }
    for (int64_t k = d; k < 4 * d4; ++k) bytes[k] = static_cast<uint8_t>(offset);
    const double n = std::max(std::sqrt(xx), std::sqrt(qq)) * up;
    q.scale[r] = s;
    q.norm[r] = static_cast<float>(n * up);
    q.radius[r] = static_cast<float>((std::sqrt(ee) * up + c * n) * up);
    q.sum[r] = sum;
  }
  return q;
}

// <x, y> over d floats (the candidates' float32 recomputation).
inline float dot(const float* x, const float* y, int64_t d) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 64 <= d; k += 64)
    for (int v = 0; v < 4; ++v)
      acc[v] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16 * v), _mm512_loadu_ps(y + k + 16 * v),
                               acc[v]);
  for (; k < d; k += 16) {
    const __mmask16 m = static_cast<__mmask16>(d - k >= 16 ? 0xffffu : (1u << (d - k)) - 1u);
    acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_maskz_loadu_ps(m, y + k),
                             acc[0]);
  }
  return _mm512_reduce_add_ps(
      _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// Per-thread buffers of a screened tile.
struct Scratch {
  std::vector<int32_t> c;           // int32 similarities [rows, cols]
  std::vector<float> lower;         // cols floats
  std::vector<int32_t> candidates;  // (tile row, tile column) pairs
};

// Screens one image's rows [r0, r0 + m) of the tile (int32 similarities ci, leading
// dimension cols; tile rows from row t_r0, words from w0) and appends its candidates; returns
// false as soon as the tile holds more than `limit` candidates. Row by row, so that C is read
// in order: the first pass overwrites each int32 entry with its upper bound s' + E (a float)
// and keeps every word's best lower bound s' - E in lower (cols floats), the second compares.
inline bool screen_image(int32_t* ci, int64_t m, int64_t cols, int64_t r0, int64_t w0,
                         const Codes& qv, const Codes& qt, int64_t limit, float* lower,
                         std::vector<int32_t>& out) {
  const __m512 tiny = _mm512_set1_ps(1e-30f);
  float* upper = reinterpret_cast<float*>(ci);
  std::fill(lower, lower + cols, -std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < m; ++r) {
    const __m512 sq = _mm512_set1_ps(qv.scale[r0 + r]);
    const __m512 nq = _mm512_set1_ps(qv.norm[r0 + r]);
    const __m512 rq = _mm512_set1_ps(qv.radius[r0 + r]);
    for (int64_t w = 0; w < cols; w += 16) {
      const __mmask16 m16 =
          static_cast<__mmask16>(cols - w >= 16 ? 0xffffu : (1u << (cols - w)) - 1u);
      const int64_t x = w0 + w;
      const __m512i corr =
          _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m16, qt.sum.data() + x), 7);
      const __m512i dots =
          _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m16, ci + r * cols + w), corr);
      const __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(dots),
                                     _mm512_mul_ps(sq, _mm512_maskz_loadu_ps(m16, qt.scale.data() + x)));
      const __m512 e = _mm512_add_ps(
          _mm512_fmadd_ps(rq, _mm512_maskz_loadu_ps(m16, qt.norm.data() + x),
                          _mm512_mul_ps(nq, _mm512_maskz_loadu_ps(m16, qt.radius.data() + x))),
          tiny);
      _mm512_mask_storeu_ps(lower + w, m16,
                            _mm512_max_ps(_mm512_maskz_loadu_ps(m16, lower + w),
                                          _mm512_sub_ps(s, e)));
      _mm512_mask_storeu_ps(upper + r * cols + w, m16, _mm512_add_ps(s, e));
    }
  }
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t w = 0; w < cols; w += 16) {
      const __mmask16 m16 =
          static_cast<__mmask16>(cols - w >= 16 ? 0xffffu : (1u << (cols - w)) - 1u);
      // Not (upper < lower): NaN keeps the entry a candidate.
      uint32_t hits = static_cast<uint32_t>(_mm512_mask_cmp_ps_mask(
          m16, _mm512_maskz_loadu_ps(m16, upper + r * cols + w),
          _mm512_maskz_loadu_ps(m16, lower + w), _CMP_NLT_UQ));
      while (hits) {
        const int lane = __builtin_ctz(hits);
        hits &= hits - 1;
        out.push_back(static_cast<int32_t>(r0 + r));
        out.push_back(static_cast<int32_t>(w0 + w + lane));
      }
    }
    if (static_cast<int64_t>(out.size()) > 2 * limit) return false;
  }
  return true;
}

#endif

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::max_screen
