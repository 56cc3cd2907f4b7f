// Exact screened max pooling (AVX-512 VNNI or AMX): the t2i forward of one tile computed first from
// int8 codes of the tokens, then in float32 only for the candidates that can still be a
// word's maximum. The result equals the float32 kernel's up to float32 rounding of the
// winning dot product (same winners), never an approximation.
//
// Codes. Every valid token x of the query ("image") side is coded with one scale per item,
// S = max |x_k| over the item's valid tokens / 127, as c_k = round(x_k / S) in [-127, 127],
// stored as c + 128 (unsigned bytes: vpdpbusd multiplies unsigned by signed bytes). Every word
// y gets its own scale s = max_k |y_k| / 127 and signed codes c'_k. The int32 GEMM of a tile
// gives D = sum_k (c_k + 128) c'_k exactly (|D| <= d * 255 * 127 < 2^31 below d = 66,000), so
// the quantised vectors x' = S c and y' = s c' have the exact dot product
//   <x', y'> = S s (D - 128 sum_k c'_k).
// For one image and one word, S, s and the correction are the same for every image token, so
// the image tokens' order by <x', y'> is their order by the integer D.
//
// The bound. With e_x = |x - x'| (Euclidean norms, computed in double from the actual codes),
// Cauchy-Schwarz gives |<x, y> - <x', y'>| = |<x - x', y> + <x', y - y'>| <= e_x |y| + |x'| e_y.
// A float32 dot product f of <x, y> (d fused multiply-adds in any order) obeys
// |f - <x, y>| <= gamma_d |x| |y|, gamma_d = d u / (1 - d u), u = 2^-24 (plus at most d 2^-149
// from gradual underflow). With N_x = max(|x|, |x'|) and R_x = e_x + (gamma_d / 2) N_x, both
// rounded up, |f - <x', y'>| <= R_x N_y + N_x R_y. Over an image (its largest R and N: one
// bound for all its tokens) and one word: E = max R N_y + max N R_y + 1e-30.
//
// Screening one image and one word. Let r* be the first token with the largest D and v its
// float32 dot product with the word (computed). A token r can only reach v if
// <x'_r, y'> + E >= v, i.e. if D_r >= (v - E) / (S s) + 128 sum c' (the threshold, computed in
// double and rounded down by a margin far above double rounding); every other token r has
// f_r <= <x'_r, y'> + E < v, so it is not the float32 maximum and is dropped. The candidates
// (typically one or two besides r* on random unit tokens) are recomputed in float32 and the
// word takes their maximum. Comparisons of the threshold are in integers; a threshold that is
// not finite (zero scales, overflowing norms) keeps every token a candidate.
//
// Cost. Per image, a max pass and a compare pass over its int32 rows, one float32 dot product
// per word for r* and one per extra candidate; the int8 GEMM runs on AMX tiles where usable
// (max_align_amx.h), else on AVX-512 VNNI (4x the multiply-adds of float32 per instruction).
// The dot products are what remains expensive (two 1 KiB rows each, often from memory: a
// screened tile holds many images so that its words' rows are fetched once for all of them,
// max_align_kernel.h), which is why the bound waits for v: it leaves 0.76 extra candidates per
// word and image of 49 random unit tokens at d = 256, where a bound from the quantised values
// alone leaves 2. A tile that leaves more than one extra candidate per kMaxCandidateShare
// entries (near-ties, huge dynamic range) is given to the float32 kernel, and so is a whole
// call whose probe tiles fall back (max_align_kernel.h).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/max_align_gemm.h"
#include "cpu/max_align_pool.h"

namespace hatkernels::cpu::HATK_CPU_LEVEL::max_screen {

#if HATK_CPU_AVX512

using max_gemm::I8;

// Feature sizes below this are not screened: there the candidates' float32 dot products and
// the screening passes cost more than the float32 GEMM they save (W1's sizes: 0.63x the float32
// kernel's speed at d = 32, 0.97x at 64, 1.29x at 96, 1.47x at 128).
constexpr int64_t kMinDim = 96;

// A tile falls back to float32 when it has more than one extra candidate per this many
// entries (a candidate's dot product costs a few entries of the GEMM).
constexpr int64_t kMaxCandidateShare = 8;

// One side's valid tokens as int8 codes, four per int32, row-major [rows][d4]; per token its
// code scale, N and R of the bound (see above) and the sum of its codes.
struct Codes {
  std::vector<int32_t> words;
  std::vector<float> scale, norm, radius;
  std::vector<int32_t> sum;
  int64_t d4 = 0;
  int64_t d = 0;  // words per row, for max_gemm::pack_* (= d4)
  const int32_t* row(int64_t r) const { return words.data() + r * d4; }
};

// Codes of one token x (d floats) at scale s into bytes (plus offset); fills the bound terms.
inline void code_token(const float* x, int64_t d, float s, int offset, uint8_t* bytes,
                       int64_t padded, Codes& q, int64_t r) {
  const double u = std::ldexp(1.0, -24), gamma = d * u / (1 - d * u);
  // Rounded up past the double rounding of the norms and their conversion to float.
  const double up = 1 + 1e-6;
  const float inv = s > 0.f ? 1.f / s : 0.f;
  double xx = 0, qq = 0, ee = 0;
  int32_t sum = 0;
  for (int64_t k = 0; k < d; ++k) {
    // x * (1 / s) may round differently from x / s: any code is fine, e is measured exactly.
    const int code = static_cast<int>(std::clamp(std::nearbyint(x[k] * inv), -127.f, 127.f));
    const double xq = static_cast<double>(s) * code;
    xx += static_cast<double>(x[k]) * x[k];
    qq += xq * xq;
    ee += (x[k] - xq) * (x[k] - xq);
    sum += code;
    bytes[k] = static_cast<uint8_t>(code + offset);
  }
  for (int64_t k = d; k < padded; ++k) bytes[k] = static_cast<uint8_t>(offset);
  const double n = std::max(std::sqrt(xx), std::sqrt(qq)) * up;
  q.scale[r] = s;
  q.norm[r] = static_cast<float>(n * up);
  q.radius[r] = static_cast<float>((std::sqrt(ee) * up + gamma / 2 * n) * up);
  q.sum[r] = sum;
}

inline float code_scale(float amax) {
  const float s = amax / 127.f;
  return s > 0.f && std::isfinite(s) && std::isfinite(1.f / s) ? s : 0.f;
}

// Codes of packed rows [0, rows) of src. items_off (item offsets into the packed rows, n_items
// items) gives one scale per item, with the unsigned offset 128 (the image side); null gives
// one scale per token, signed (the word side). Rows hold d4 = ceil(d / 4) words rounded up to
// words_multiple, and extra_rows rows of zeros follow them (read, never used, by AMX tiles).
inline Codes quantise(const max_gemm::Rows& src, int64_t rows, const int64_t* items_off,
                      int64_t n_items, int64_t words_multiple = 1, int64_t extra_rows = 0) {
  Codes q;
  const int64_t d = src.d;
  const int64_t d4 = ((d + 3) / 4 + words_multiple - 1) / words_multiple * words_multiple;
  q.d4 = q.d = d4;
  q.words.assign((rows + extra_rows) * d4, 0);
  q.scale.resize(rows);
  q.norm.resize(rows);
  q.radius.resize(rows);
  q.sum.resize(rows);
  const auto amax = [&](int64_t r) {
    const float* x = src.row(r);
    float a = 0.f;
#pragma omp simd reduction(max : a)
    for (int64_t k = 0; k < d; ++k) a = std::max(a, std::fabs(x[k]));
    return a;
  };
  const auto bytes = [&](int64_t r) { return reinterpret_cast<uint8_t*>(q.words.data() + r * d4); };
  if (items_off) {
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t i = 0; i < n_items; ++i) {
      float a = 0.f;
      for (int64_t r = items_off[i]; r < items_off[i + 1]; ++r) a = std::max(a, amax(r));
      const float s = code_scale(a);
      for (int64_t r = items_off[i]; r < items_off[i + 1]; ++r)
        code_token(src.row(r), d, s, 128, bytes(r), 4 * d4, q, r);
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) code_token(src.row(r), d, code_scale(amax(r)), 0, bytes(r), 4 * d4, q, r);
  }
  return q;
}

// The first min(n, 16) lanes of a 16-lane vector (the tail of a row).
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
}

// Horizontal sums of four vectors: lanes 0-3 of the result.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 e) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 ce = _mm512_add_ps(_mm512_unpacklo_ps(c, e), _mm512_unpackhi_ps(c, e));
  // Per 128-bit lane: a, b, c, e partial sums in lanes 0-3.
  const __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, ce, 0x44), _mm512_shuffle_ps(ab, ce, 0xee));
  const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(x),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
}

// <x_i, y_i> for four pairs of rows over d floats: lanes 0-3 (independent chains, one
// horizontal reduction for the four).
inline __m128 dot4(const float* const* x, const float* const* y, int64_t d) {
  __m512 acc[8];
  for (int v = 0; v < 8; ++v) acc[v] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= d; k += 32)
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 4; ++i)
        acc[2 * i + h] = _mm512_fmadd_ps(_mm512_loadu_ps(x[i] + k + 16 * h),
                                         _mm512_loadu_ps(y[i] + k + 16 * h), acc[2 * i + h]);
  for (; k < d; k += 16) {
    const __mmask16 m = first_lanes(d - k);
    for (int i = 0; i < 4; ++i)
      acc[2 * i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x[i] + k),
                                   _mm512_maskz_loadu_ps(m, y[i] + k), acc[2 * i]);
  }
  return sum4(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]),
              _mm512_add_ps(acc[4], acc[5]), _mm512_add_ps(acc[6], acc[7]));
}

// Float32 dot products of n pairs of rows, four at a time (dot4): pair(i, x, y) names pair
// i's rows, and out(i, value) takes the results in order of i.
template <class Pair, class Out>
inline void dots(int64_t n, int64_t d, Pair pair, Out out) {
  for (int64_t c = 0; c < n; c += 4) {
    const float* x[4];
    const float* y[4];
    for (int64_t i = 0; i < 4; ++i) pair(std::min(c + i, n - 1), x[i], y[i]);
    float v[4];
    _mm_storeu_ps(v, dot4(x, y, d));
    for (int64_t i = 0; i < std::min<int64_t>(4, n - c); ++i) out(c + i, v[i]);
  }
}

// Per-thread buffers of a screened tile.
struct Scratch {
  std::vector<int32_t> c;      // int32 similarities [rows, cols]
  std::vector<int32_t> win;    // cols: every word's winning row within the image, or kTied
  std::vector<int32_t> thr;    // cols: every word's threshold on D
  std::vector<int32_t> first;  // [images, cols]: every word's first row with the largest D
  std::vector<float> best;     // [images, cols]: the float32 dot products of those rows
  std::vector<int32_t> cand;   // one image's candidates in 16 words (image rows x 16, + 16)
};

// One image of a screened tile: its int32 similarities ci [m, cols] (leading dimension ldc),
// its packed rows from r0, the tile's words from w0.
struct Image {
  const int32_t* ci;
  int64_t m, ldc, r0;
};

// Every word's largest D over one image (top) and the first row reaching it (first): 64 words
// at a time down the image's rows, their running maxima in registers.
inline void largest_d(const Image& im, int64_t cols, int32_t* top, int32_t* first) {
  constexpr int kV = 4;
  for (int64_t w = 0; w < cols; w += 16 * kV) {
    __mmask16 m16[kV];
    __m512i best[kV], arg[kV];
    for (int v = 0; v < kV; ++v) {
      m16[v] = first_lanes(std::max<int64_t>(cols - w - 16 * v, 0));
      best[v] = _mm512_maskz_loadu_epi32(m16[v], im.ci + w + 16 * v);
      arg[v] = _mm512_setzero_si512();
    }
    for (int64_t r = 1; r < im.m; ++r) {
      const int32_t* cr = im.ci + r * im.ldc + w;
      const __m512i row = _mm512_set1_epi32(static_cast<int32_t>(r));
      for (int v = 0; v < kV; ++v) {
        const __m512i x = _mm512_maskz_loadu_epi32(m16[v], cr + 16 * v);
        const __mmask16 gt = _mm512_cmpgt_epi32_mask(x, best[v]);
        best[v] = _mm512_mask_mov_epi32(best[v], gt, x);
        arg[v] = _mm512_mask_mov_epi32(arg[v], gt, row);
      }
    }
    for (int v = 0; v < kV; ++v) {
      _mm512_mask_storeu_epi32(top + w + 16 * v, m16[v], best[v]);
      _mm512_mask_storeu_epi32(first + w + 16 * v, m16[v], arg[v]);
    }
  }
}

// The largest radius R and norm N over an image's tokens (one bound for all of them).
inline void image_bound_terms(const Image& im, const Codes& qv, float& rbar, float& nbar) {
  rbar = nbar = 0.f;
  for (int64_t r = im.r0; r < im.r0 + im.m; ++r) {
    rbar = std::max(rbar, qv.radius[r]);
    nbar = std::max(nbar, qv.norm[r]);
  }
}

// Eight words at a time in double: the mask of the ones below n, their floats and int32s
// widened, and the bound's error term E = rbar |y| + nbar rho_y (+ 1e-30) of words [x, x + 8).
inline __mmask8 first_octet(int64_t n) {
  return static_cast<__mmask8>(n >= 8 ? 0xffu : (1u << n) - 1u);
}
inline __m512d widen(__mmask8 m8, const float* p) {
  return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m8, p));
}
inline __m512d widen(__mmask8 m8, const int32_t* p) {
  return _mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(m8, p));
}
inline __m512d error_term(__m512d r_v, __m512d n_v, const Codes& qt, int64_t x, __mmask8 m8) {
  return _mm512_add_pd(_mm512_fmadd_pd(r_v, widen(m8, qt.norm.data() + x),
                                       _mm512_mul_pd(n_v, widen(m8, qt.radius.data() + x))),
                       _mm512_set1_pd(1e-30));
}

// Bounds of every word's float32 maximum over one image, from its int32 similarities alone:
// with P = S s (Dmax - 128 sum c') the largest quantised dot product and E the bound above,
// every float32 dot product f of an image token with the word has |f - <x', y'>| <= E, so the
// maximum of the f lies in [P - E, P + E] (the first token with the largest D reaches P - E,
// none passes P + E). lo and hi per word, in double, widened past the double rounding of P
// and E; top and first are scratch (cols entries each).
inline void bound_image(const Image& im, int64_t cols, int64_t w0, const Codes& qv,
                        const Codes& qt, int32_t* top, int32_t* first, double* lo, double* hi) {
  float rbar, nbar;
  image_bound_terms(im, qv, rbar, nbar);
  largest_d(im, cols, top, first);
  const __m512d scale_v = _mm512_set1_pd(qv.scale[im.r0]);
  const __m512d r_v = _mm512_set1_pd(rbar), n_v = _mm512_set1_pd(nbar);
  const __m512d up = _mm512_set1_pd(1 + 1e-12);
  const __m512d rel = _mm512_set1_pd(1e-12), c128 = _mm512_set1_pd(128.0);
  for (int64_t w = 0; w < cols; w += 8) {
    const __mmask8 m8 = first_octet(cols - w);
    const int64_t x = w0 + w;
    // P = S s (D - 128 sum c') and E, each in double; P - E and P + E widened past their
    // rounding.
    const __m512d p = _mm512_mul_pd(_mm512_mul_pd(scale_v, widen(m8, qt.scale.data() + x)),
                                    _mm512_fnmadd_pd(c128, widen(m8, qt.sum.data() + x),
                                                     widen(m8, top + w)));
    const __m512d e = error_term(r_v, n_v, qt, x, m8);
    const __m512d margin = _mm512_fmadd_pd(e, up, _mm512_mul_pd(_mm512_abs_pd(p), rel));
    _mm512_mask_storeu_pd(lo + w, m8, _mm512_sub_pd(p, margin));
    _mm512_mask_storeu_pd(hi + w, m8, _mm512_add_pd(p, margin));
  }
}

// Pass 1 of screening for n images of a tile (ims) against its words: every word's first row
// with the largest D in each image (first: [n, cols]) and that row's float32 dot product with
// the word (best: [n, cols]); top is scratch (cols int32). The dot products run word by word
// across the images (dots).
inline void best_rows(const Image* ims, int64_t n, int64_t cols, int64_t w0,
                      const max_gemm::Rows& v_rows, const max_gemm::Rows& t_rows, int32_t* top,
                      int32_t* first, float* best) {
  const int64_t d = v_rows.d;
  for (int64_t k = 0; k < n; ++k) largest_d(ims[k], cols, top, first + k * cols);
  for (int64_t w = 0; w < cols; ++w) {
    const float* word = t_rows.row(w0 + w);
    dots(
        n, d,
        [&](int64_t k, const float*& x, const float*& y) {
          x = v_rows.row(ims[k].r0 + first[k * cols + w]);
          y = word;
        },
        [&](int64_t k, float v) { best[k * cols + w] = v; });
  }
}

// Screens one image against the tile's words, after best_rows: q and first hold every word's
// best row r* and its float32 value, q then its float32 maximum; writes its winning row
// (within the image) to win (max_pool::kTied when candidates tie exactly), and returns the
// number of extra candidates (tokens recomputed besides each word's r*). cand: scratch for
// (m + 1) x 16 entries (m: the image's rows, below 2^27).
inline int64_t screen_image(const Image& im, int64_t cols, int64_t w0, const Codes& qv,
                            const Codes& qt, const max_gemm::Rows& v_rows,
                            const max_gemm::Rows& t_rows, float* q, int32_t* win,
                            int32_t* thr, const int32_t* first, int32_t* cand) {
  const int64_t d = v_rows.d;
  float rbar, nbar;
  image_bound_terms(im, qv, rbar, nbar);
  const auto lanes = [&](int64_t w) { return first_lanes(cols - w); };
  // Every word's best row r* (first) and its float32 value (q) come from best_rows.
  for (int64_t w = 0; w < cols; ++w) win[w] = first[w];
  // Every word's threshold on D.
  const __m512d scale_v = _mm512_set1_pd(qv.scale[im.r0]);
  const __m512d r_v = _mm512_set1_pd(rbar), n_v = _mm512_set1_pd(nbar);
  for (int64_t w = 0; w < cols; w += 8) {
    const __mmask8 m8 = first_octet(cols - w);
    const int64_t x = w0 + w;
    const __m512d e = error_term(r_v, n_v, qt, x, m8);
    const __m512d t = _mm512_fmadd_pd(
        _mm512_set1_pd(128.0), widen(m8, qt.sum.data() + x),
        _mm512_div_pd(_mm512_sub_pd(widen(m8, q + w), e),
                      _mm512_mul_pd(scale_v, widen(m8, qt.scale.data() + x))));
    // Rounded down by far more than the double rounding of t. A value that is not finite or
    // past the int32 range converts to INT32_MIN: the word keeps every row.
    const __m512d low = _mm512_sub_pd(
        _mm512_sub_pd(t, _mm512_set1_pd(1.0)), _mm512_mul_pd(_mm512_abs_pd(t), _mm512_set1_pd(1e-9)));
    _mm256_mask_storeu_epi32(thr + w, m8,
                             _mm512_cvt_roundpd_epi32(low, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
  }
  // Every other row at or above its word's threshold is recomputed: 16 words at a time down
  // the image's rows, their thresholds and best rows in registers. The rows' hits are gathered
  // first without a branch (row << 4 | lane, in row order), then recomputed four at a time:
  // a branch per row and 16 words, taken about once in four on random data, mispredicts often
  // (W1: 1.12x faster this way).
  int64_t extra = 0;
  const __m512i lane_ids = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t w = 0; w < cols; w += 16) {
    const __mmask16 m16 = lanes(w);
    const __m512i thr_v = _mm512_maskz_loadu_epi32(m16, thr + w);
    const __m512i first_v = _mm512_maskz_loadu_epi32(m16, first + w);
    int64_t n = 0;
    for (int64_t r = 0; r < im.m; ++r) {
      const __m512i x = _mm512_maskz_loadu_epi32(m16, im.ci + r * im.ldc + w);
      const __m512i row = _mm512_set1_epi32(static_cast<int32_t>(r));
      const __mmask16 hits = _mm512_mask_cmpge_epi32_mask(m16, x, thr_v) &
                             ~_mm512_cmpeq_epi32_mask(first_v, row);
      _mm512_storeu_si512(cand + n, _mm512_maskz_compress_epi32(
                                        hits, _mm512_or_si512(_mm512_slli_epi32(row, 4), lane_ids)));
      n += __builtin_popcount(hits);
    }
    extra += n;
    dots(
        n, d,
        [&](int64_t c, const float*& x, const float*& y) {
          x = v_rows.row(im.r0 + (cand[c] >> 4));
          y = t_rows.row(w0 + w + (cand[c] & 15));
        },
        [&](int64_t c, float v) {
          const int64_t l = w + (cand[c] & 15);
          if (v > q[l]) {
            q[l] = v;
            win[l] = cand[c] >> 4;
          } else if (v == q[l]) {
            win[l] = max_pool::kTied;
          }
        });
  }
  return extra;
}

#endif

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::max_screen
