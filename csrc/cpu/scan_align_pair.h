// Scan pooling of ONE (image, caption) pair in one direction, forward and backward, on a
// small local similarity block that sits in L1. Written direction-free: "rows attend over
// columns". For i2t the rows are the image tokens and the columns the words (P = S); for
// t2i the rows are the words and the columns the image tokens (P = S^T).
//
//   a = LeakyReLU_0.1(P);  den_c = sqrt(sum_r a[r,c]^2) + eps;  z = lambda * a / den
//   alpha_r = softmax_c(z_r);  num_r = sum_c alpha[r,c] P[r,c]
//   |c_r|^2 = alpha_r^T G alpha_r      (Gram mode, G = X_cols X_cols^T, width = qp)
//           = |alpha_r X_cols|^2       (context mode, width = padded D)
//   q_r = num_r / max(|x_r| sqrt(max(|c_r|^2, 0)), eps),  result = sum_r q_r
//
// Layout: P is [p, qp] row-major with qp = q rounded up to 16 and zeros in the padded
// columns; every vector loop runs over whole 16-float vectors (scan_align_simd.h). The
// forward also has a lanes layout (pair_forward_lanes): P^T [q, pad(p)], the attending
// tokens in the vector lanes, where the softmax and the Gram form need no horizontal sums.
//
// Sweeps. The pair's work besides the similarity GEMM is a few sweeps over P: the column
// sums of squares; per row, z and its exp in one sweep (shifted by |lambda|, which bounds
// |z|, so no row maximum is needed while |lambda| <= kFixedShift); the normalisation of alpha
// with num; alpha G (small_gemm) and |c|^2, or in the forward for long attended items
// alpha^T H alpha in one pass over half the Gram matrix (half_gram_rows). What is summed per
// row (the softmax denominator, num, |c|^2, the backward's <alpha, d alpha>) stays a vector
// until a sweep ends, and 16 rows
// are then summed at once (row_sums): separate horizontal sums per row cost more than the
// row's exp. The vector exp, sqrt and division make the rest; the cosine quotients are
// formed 16 rows at a time.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/scan_align_simd.h"

namespace hatkernels::cpu::HATK_CPU_LEVEL::scan {

constexpr float kEps = 1e-8f;

// The forward's half Gram mode is taken from this padded length on (three column vectors):
// below it, the product alpha G in strips of two vectors keeps the FMA pipes busier than
// half_gram_rows' one-vector strips (measured per pair on the AMD EPYC: q = 8 and 20, the
// whole Gram 8-20% faster; q = 49, the half one 10-20% faster).
constexpr int64_t kHalfGramFrom = 48;

// The attended side of a pair: its Gram matrix (z = G [q, qp], gram = true), or its tokens
// (z = X [q, ld], width = padded D, gram = false). half: z holds H, G's lower triangle with
// half its diagonal (zeros above), so that alpha^T G alpha = 2 alpha^T H alpha and the product
// alpha H skips H's zero blocks above the diagonal: about half the Gram mode's FMAs. The
// forward only: the backward needs alpha G itself.
struct Attended {
  const float* z;
  int64_t ld;
  int64_t width;
  bool gram;
  bool half = false;
};

// Per-thread scratch, each at least as large as noted for the largest pair, 64-byte
// aligned. Sized by the caller (Workspace in scan_align_kernel.h).
struct PairScratch {
  float* alpha;  // [pad_lanes(p), qp]: the rows past p are slack (half_gram_rows)
  float* y;      // [p, width]: alpha G (Gram) or the contexts c_r (context mode)
  float* work;   // [p, qp]: backward only
  float* col;    // [qp] x 3: sum of squares, lambda / den, the padding's bias (then the
                 // backward's den sums)
  float* row;    // [p] x 5: num, |c|^2, the softmax sums and shifts, then the backward's
                 // per-row terms
  float* lanes;  // [pad_lanes(p), 16]: one vector per row, before its horizontal sum
};

// The softmax's shift. |a[r, c]| <= den_c, so |z| <= |lambda|: exp(z - |lambda|) cannot
// overflow, and while |lambda| <= kFixedShift it stays a normal float (>= exp(-80)), so the
// row maximum (a horizontal reduction per row) is needed only for larger |lambda|.
constexpr float kFixedShift = 40.f;

// For 8 rows r of alpha (row stride qp; 8 sums cover the FMA latency): lanes[r] = the lane
// sums of alpha_r^T H alpha_r (att.half), one column vector v of alpha_r H at a time, over the
// rows k >= v of H only (H is zero above its diagonal), and never stored: its product with
// alpha_r is taken at once. Not inlined: inside pair_attention the compiler spilled two of its
// 16 sums to the stack.
__attribute__((noinline)) inline void half_gram_rows(const float* a, int64_t qp, int64_t q,
                                                     const Attended& att, float* lanes) {
  constexpr int R = 8;
  V16 tot[R];
  for (int i = 0; i < R; ++i) tot[i] = V16{};
  for (int64_t v = 0; v < qp; v += kLanes) {
    V16 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = V16{};
    for (int64_t k = v; k < q; ++k) {
      const V16 hk = load(att.z + k * att.ld + v);
      for (int i = 0; i < R; ++i) acc[i] = fmadd(splat(a[i * qp + k]), hk, acc[i]);
    }
    for (int i = 0; i < R; ++i) tot[i] = fmadd(acc[i], load(a + i * qp + v), tot[i]);
  }
  for (int i = 0; i < R; ++i) store(lanes + i * kLanes, tot[i]);
}

// inv[c] = lambda / (sqrt(sumsq[c]) + eps), 16 columns at a time (n rounded up to 16: the
// slack past n is computed too).
inline void lambda_over_den(const float* sumsq, int64_t n, float lam, float* inv) {
  for (int64_t c = 0; c < n; c += kLanes)
    store(inv + c, splat(lam) / (vsqrt(load(sumsq + c)) + kEps));
}

// 16 rows' q_r = num_r / max(|x_r| sqrt(max(|c_r|^2, 0)), eps).
inline V16 cosine_quotients(V16 num, V16 c2, V16 xnorm) {
  const V16 prod = xnorm * vsqrt(c2 > 0.f ? c2 : splat(0.f));
  return num / (prod > kEps ? prod : splat(kEps));
}

// Column statistics and the attention of every row; fills s.alpha, s.y (not in half mode),
// num = s.row, c2 = s.row + p. Columns >= q get alpha = 0. The per-row sums (softmax
// denominator, num, |c|^2) are kept as vectors and summed 16 rows at a time (row_sums).
inline void pair_attention(const float* P, int64_t p, int64_t q, int64_t qp,
                           const Attended& att, float lam, const PairScratch& s) {
  float* sumsq = s.col;
  float* inv = s.col + qp;
  float* bias = s.col + 2 * qp;  // 0 on the q columns, -inf on the padding
  float* num = s.row;
  float* c2 = s.row + p;
  float* rsum = s.row + 2 * p;
  float* shift = s.row + 3 * p;
  // Four rows at a time into separate sums: one chain of dependent FMAs per column vector
  // would wait for the FMA latency at every row.
  for (int64_t c = 0; c < qp; c += kLanes) {
    V16 acc[4] = {};
    int64_t r = 0;
    for (; r + 4 <= p; r += 4) {
      for (int k = 0; k < 4; ++k) {
        const V16 a = leaky(load(P + (r + k) * qp + c));
        acc[k] = fmadd(a, a, acc[k]);
      }
    }
    for (; r < p; ++r) {
      const V16 a = leaky(load(P + r * qp + c));
      acc[0] = fmadd(a, a, acc[0]);
    }
    store(sumsq + c, (acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < qp; ++c) bias[c] = c < q ? 0.f : neg_inf;
  lambda_over_den(sumsq, qp, lam, inv);
  // z = a * inv + bias: exactly a * inv on the q columns, -inf (exp: 0) on the padding.
  const auto z = [&](const float* pr, int64_t c) {
    return fmadd(leaky(load(pr + c)), load(inv + c), load(bias + c));
  };
  const float abs_lam = std::fabs(lam);
  for (int64_t r = 0; r < p; ++r) {
    if (abs_lam <= kFixedShift) {
      shift[r] = abs_lam;
    } else {
      V16 mx = splat(neg_inf);
      for (int64_t c = 0; c < qp; c += kLanes) mx = vmax(mx, z(P + r * qp, c));
      shift[r] = hmax(mx);
    }
  }
  // The exponentials, with no branch in the row loop but its own (qp >= 16, so the column
  // loop runs at least once and is written so): the constants of exp16 stay in registers.
  for (int64_t r = 0; r < p; ++r) {
    const float* pr = P + r * qp;
    float* al = s.alpha + r * qp;
    const V16 sh = splat(shift[r]);
    V16 sum{};
    int64_t c = 0;
    do {
      const V16 e = exp16(z(pr, c) - sh);
      store(al + c, e);
      sum += e;
      c += kLanes;
    } while (c < qp);
    store(s.lanes + r * kLanes, sum);
  }
  row_sums(s.lanes, p, rsum);
  for (int64_t r = 0; r < p; ++r) {
    const float* pr = P + r * qp;
    float* al = s.alpha + r * qp;
    const V16 rs = splat(1.f / rsum[r]);
    V16 nm{};
    for (int64_t c = 0; c < qp; c += kLanes) {
      const V16 a = load(al + c) * rs;
      store(al + c, a);
      nm = fmadd(a, load(pr + c), nm);
    }
    store(s.lanes + r * kLanes, nm);
  }
  row_sums(s.lanes, p, num);
  if (att.half) {  // |c|^2 = 2 alpha^T H alpha, alpha H never stored
    // Whole blocks of 8 rows: the rows past p read alpha's slack and reach only their own
    // lanes, which row_sums does not store.
    for (int64_t r = 0; r < p; r += 8)
      half_gram_rows(s.alpha + r * qp, qp, q, att, s.lanes + r * kLanes);
    row_sums(s.lanes, p, c2);
    for (int64_t r = 0; r < p; ++r) c2[r] *= 2.f;
    return;
  }
  // y = alpha Z, then |c|^2 = <y, alpha> (Gram) or <y, y> (contexts).
  const int64_t w = att.width;
  small_gemm<false>(p, w, s.alpha, qp, 1, nullptr, q, att.z, att.ld, s.y, w, false);
  for (int64_t r = 0; r < p; ++r) {
    const float* yr = s.y + r * w;
    const float* other = att.gram ? s.alpha + r * qp : yr;
    V16 acc{};
    for (int64_t c = 0; c < w; c += kLanes) acc = fmadd(load(yr + c), load(other + c), acc);
    store(s.lanes + r * kLanes, acc);
  }
  row_sums(s.lanes, p, c2);
}

// Sum over the rows of q_r = num_r / max(|x_r| |c_r|, eps) (the pair's unreduced score in
// this direction), 16 rows at a time.
inline float pair_forward(const float* P, int64_t p, int64_t q, int64_t qp, const float* xnorm,
                          const Attended& att, float lam, const PairScratch& s) {
  pair_attention(P, p, q, qp, att, lam, s);
  const float* num = s.row;
  const float* c2 = s.row + p;
  V16 total{};
  for (int64_t r0 = 0; r0 < p; r0 += kLanes) {
    const size_t bytes = static_cast<size_t>(std::min(kLanes, p - r0)) * 4;
    float nm[kLanes] = {}, cc[kLanes] = {}, xn[kLanes] = {};  // zeros past p: q = 0 there
    std::memcpy(nm, num + r0, bytes);
    std::memcpy(cc, c2 + r0, bytes);
    std::memcpy(xn, xnorm + r0, bytes);
    total += cosine_quotients(load(nm), load(cc), load(xn));
  }
  return hsum(total);
}

// The same pair score from the transposed block Pt [q, pad_lanes(p)] (row c: column c of P,
// lanes r, zeros past p), Gram mode only: the attending rows are the lanes, so the softmax
// over c, num and |c_r|^2 run lane by lane, and only the column statistics need horizontal
// sums. |c_r|^2 from G's lower triangle, two columns at a time over up to four lane vectors
// (eight independent sums), with a_c = alpha[r, c]:
//   alpha_r^T G alpha_r = 2 sum_c a_c (G_cc a_c / 2 + sum_{b < c} G_cb a_b)
// which is about half the FMAs of pair_forward's alpha G for short attended items, and none of
// its per-row horizontal sums.
template <int S>
inline V16 lanes_strip(const float* Pt, int64_t pp, int64_t q, int64_t v0, int64_t p,
                       const float* xnorm, const Attended& att, const float* inv, float shift,
                       bool fixed_shift, float* e) {
  const float* pt = Pt + v0 * kLanes;
  const auto x = [&](int64_t c, int k) { return load(pt + c * pp + k * kLanes); };
  const auto alpha = [&](int64_t c, int k) { return load(e + (c * S + k) * kLanes); };
  // -shift per lane vector: |lambda|, or the lanes' own maxima of z.
  V16 neg_shift[S];
  for (int k = 0; k < S; ++k) neg_shift[k] = splat(-shift);
  if (!fixed_shift) {
    V16 mx[S];
    for (int k = 0; k < S; ++k) mx[k] = splat(-std::numeric_limits<float>::infinity());
    for (int64_t c = 0; c < q; ++c)
      for (int k = 0; k < S; ++k) mx[k] = vmax(mx[k], leaky(x(c, k)) * splat(inv[c]));
    for (int k = 0; k < S; ++k) neg_shift[k] = -mx[k];
  }
  // e = exp(z - shift) into e [q, S vectors], its sums and num = sum_c e P; then alpha = e / sum.
  V16 rs[S], nm[S];
  for (int k = 0; k < S; ++k) rs[k] = nm[k] = V16{};
  for (int64_t c = 0; c < q; ++c) {
    const V16 ic = splat(inv[c]);
    for (int k = 0; k < S; ++k) {
      const V16 xv = x(c, k);
      const V16 ex = exp16(fmadd(leaky(xv), ic, neg_shift[k]));
      store(e + (c * S + k) * kLanes, ex);
      rs[k] += ex;
      nm[k] = fmadd(ex, xv, nm[k]);
    }
  }
  V16 ir[S];
  for (int k = 0; k < S; ++k) ir[k] = splat(1.f) / rs[k];
  for (int64_t c = 0; c < q; ++c)
    for (int k = 0; k < S; ++k) store(e + (c * S + k) * kLanes, alpha(c, k) * ir[k]);
  // |c_r|^2 / 2 = sum_c alpha_c (h_cc alpha_c + sum_{b < c} G_cb alpha_b), h_cc = G_cc / 2 (H_cc
  // when att.half), for columns c and c + 1 at once.
  const auto diag = [&](int64_t c) {
    const float g = att.z[c * att.ld + c];
    return splat(att.half ? g : 0.5f * g);
  };
  V16 c2[S];
  for (int k = 0; k < S; ++k) c2[k] = V16{};
  int64_t c = 0;
  for (; c + 2 <= q; c += 2) {
    const float* g0 = att.z + c * att.ld;
    const float* g1 = g0 + att.ld;
    V16 t0[S], t1[S];
    const V16 d0 = diag(c), d1 = diag(c + 1), o1 = splat(g1[c]);
    for (int k = 0; k < S; ++k) {
      t0[k] = d0 * alpha(c, k);
      t1[k] = fmadd(d1, alpha(c + 1, k), o1 * alpha(c, k));
    }
    for (int64_t b = 0; b < c; ++b) {
      const V16 h0 = splat(g0[b]), h1 = splat(g1[b]);
      for (int k = 0; k < S; ++k) {
        const V16 ab = alpha(b, k);
        t0[k] = fmadd(h0, ab, t0[k]);
        t1[k] = fmadd(h1, ab, t1[k]);
      }
    }
    for (int k = 0; k < S; ++k)
      c2[k] = fmadd(alpha(c + 1, k), t1[k], fmadd(alpha(c, k), t0[k], c2[k]));
  }
  if (c < q) {
    const float* g0 = att.z + c * att.ld;
    V16 t0[S];
    const V16 d0 = diag(c);
    for (int k = 0; k < S; ++k) t0[k] = d0 * alpha(c, k);
    for (int64_t b = 0; b < c; ++b) {
      const V16 h0 = splat(g0[b]);
      for (int k = 0; k < S; ++k) t0[k] = fmadd(h0, alpha(b, k), t0[k]);
    }
    for (int k = 0; k < S; ++k) c2[k] = fmadd(alpha(c, k), t0[k], c2[k]);
  }
  // q_r = num_r / max(|x_r| |c_r|, eps) on the lanes r < p.
  V16 total{};
  for (int k = 0; k < S; ++k) {
    const int64_t r0 = (v0 + k) * kLanes;
    float xn[kLanes] = {};
    std::memcpy(xn, xnorm + r0, static_cast<size_t>(std::min(kLanes, p - r0)) * 4);
    const V16 qr = cosine_quotients(nm[k] * ir[k], c2[k] + c2[k], load(xn));
    total += lanes_below(p - r0) ? qr : splat(0.f);
  }
  return total;
}

// The pair's unreduced score from Pt, in strips of up to four lane vectors (s.alpha holds
// the strip's alpha [q, strip]; s.col the column statistics).
inline float pair_forward_lanes(const float* Pt, int64_t p, int64_t q, const float* xnorm,
                                const Attended& att, float lam, const PairScratch& s) {
  const int64_t pp = pad_lanes(p), nv = pp / kLanes;
  float* sumsq = s.col;
  float* inv = s.col + pad_lanes(q);
  for (int64_t c = 0; c < q; ++c) {
    V16 acc{};
    for (int64_t v = 0; v < nv; ++v) {
      const V16 a = leaky(load(Pt + c * pp + v * kLanes));
      acc = fmadd(a, a, acc);
    }
    store(s.lanes + c * kLanes, acc);
  }
  row_sums(s.lanes, q, sumsq);  // sumsq past q: slack, never used
  lambda_over_den(sumsq, q, lam, inv);
  const float shift = std::fabs(lam);
  const bool fixed = shift <= kFixedShift;
  V16 total{};
  for (int64_t v0 = 0; v0 < nv; v0 += 4) {
    const int64_t strip = std::min<int64_t>(4, nv - v0);
    const auto run = [&](auto width) {
      total += lanes_strip<decltype(width)::value>(Pt, pp, q, v0, p, xnorm, att, inv, shift,
                                                   fixed, s.alpha);
    };
    if (strip == 4) run(std::integral_constant<int, 4>{});
    else if (strip == 3) run(std::integral_constant<int, 3>{});
    else if (strip == 2) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
  }
  return hsum(total);
}

// Whether pair_forward_lanes is estimated cheaper than pair_forward for p attending rows over q
// columns (Gram mode): counted in vector operations, an exp as kExpOps of them, the Gram
// products as FMAs (pair_forward: alpha G over whole vectors of columns, or alpha H).
inline bool prefer_lanes(int64_t p, int64_t q, bool half) {
  constexpr int64_t kExpOps = 20;
  const int64_t vq = pad_lanes(q) / kLanes, vp = pad_lanes(p) / kLanes;
  int64_t gram_rows = p * q * vq;
  if (half) {
    gram_rows = 0;
    for (int64_t v = 0; v < vq; ++v) gram_rows += p * (q - v * kLanes);
  }
  const int64_t rows = p * vq * kExpOps + gram_rows;
  const int64_t lanes = q * vp * kExpOps + q * (q + 1) / 2 * vp;
  return lanes < rows;
}

// Backward of gq * sum_r q_r. Writes dP [p, qp] (over P's buffer: P is read first), adds
// d|x_r| / |x_r| to kx[r] (the caller adds kx[r] * x_r to x_r's gradient), and accumulates the
// attended side's term: Gram mode dgram[k, c] += sum_r dc2_r alpha[r,k] alpha[r,c] (the
// caller adds 2 dgram X to dX); context mode datt[k, :] += sum_r 2 dc2_r alpha[r,k] c_r.
inline void pair_backward(float* P, int64_t p, int64_t q, int64_t qp, const float* xnorm,
                          const Attended& att, float lam, float gq, const PairScratch& s,
                          float* kx, float* dacc, int64_t dacc_ld) {
  pair_attention(P, p, q, qp, att, lam, s);
  const int64_t w = att.width;
  const float* num = s.row;
  const float* c2 = s.row + p;
  float* dnum = s.row + 2 * p;
  float* wrow = s.row + 3 * p;  // dc2_r (Gram) or 2 dc2_r (contexts)
  const float* sumsq = s.col;
  const float* inv = s.col + qp;
  float* tden = s.col + 2 * qp;
  float* dot = s.row + 4 * p;  // <alpha_r, d alpha_r>
  for (int64_t c = 0; c < qp; c += kLanes) store(tden + c, V16{});
  // d alpha, row by row, into s.work.
  for (int64_t r = 0; r < p; ++r) {
    const float cn = std::sqrt(c2[r] > 0.f ? c2[r] : 0.f);
    const float prod = xnorm[r] * cn;
    const float den2 = prod > kEps ? prod : kEps;
    const float dn = gq / den2;
    const float dden2 = -gq * num[r] / (den2 * den2);
    const bool active = prod >= kEps;
    const float dxn = active ? dden2 * cn : 0.f;
    const float dcn = active ? dden2 * xnorm[r] : 0.f;
    const float dc2 = c2[r] > 0.f ? dcn / (2.f * cn) : 0.f;
    kx[r] += xnorm[r] > 0.f ? dxn / xnorm[r] : 0.f;
    dnum[r] = dn;
    const float* pr = P + r * qp;
    const float* al = s.alpha + r * qp;
    const float* yr = s.y + r * w;
    float* dalpha = s.work + r * qp;
    const V16 vdn = splat(dn), vdc2 = splat(2.f * dc2);
    if (att.gram) {
      wrow[r] = dc2;
      for (int64_t c = 0; c < qp; c += kLanes)
        store(dalpha + c, fmadd(vdc2, load(yr + c), vdn * load(pr + c)));
    } else {  // d alpha[r, c] gets 2 dc2 <c_r, x_c>
      wrow[r] = 2.f * dc2;
      for (int64_t c = 0; c < qp; ++c) {
        float dot_c = 0.f;
        if (c < q) {
          V16 acc{};
          for (int64_t d = 0; d < w; d += kLanes)
            acc = fmadd(load(yr + d), load(att.z + c * att.ld + d), acc);
          dot_c = hsum(acc);
        }
        dalpha[c] = dn * pr[c] + 2.f * dc2 * dot_c;
      }
    }
    V16 acc{};
    for (int64_t c = 0; c < qp; c += kLanes) acc = fmadd(load(al + c), load(dalpha + c), acc);
    store(s.lanes + r * kLanes, acc);
  }
  row_sums(s.lanes, p, dot);
  // Through the softmax: dz = alpha (d alpha - <alpha, d alpha>); s.work becomes d a.
  for (int64_t r = 0; r < p; ++r) {
    const float* pr = P + r * qp;
    const float* al = s.alpha + r * qp;
    float* wr = s.work + r * qp;
    const V16 vdot = splat(dot[r]);
    for (int64_t c = 0; c < qp; c += kLanes) {
      const V16 dz = load(al + c) * (load(wr + c) - vdot);
      store(tden + c, fmadd(dz, leaky(load(pr + c)), load(tden + c)));
      store(wr + c, dz * load(inv + c));  // d a through z = lambda a / den
    }
  }
  // 2 d sumsq_c = d den_c / sqrt(sumsq_c) with d den_c = -lambda sum_r dz a / den^2.
  for (int64_t c = 0; c < qp; ++c) {
    const float nrm = std::sqrt(sumsq[c]);
    const float den = nrm + kEps;
    tden[c] = nrm > 0.f ? -lam * tden[c] / (den * den) / nrm : 0.f;
  }
  // One row (a one-word caption in t2i, a one-token image in i2t): b = a / (|a| + eps) has
  // the derivative eps / den^2, which the general form above reaches only as the difference
  // of two terms lambda dz / den that cancel, leaving their rounding error (up to
  // ~1e-7 lambda |dz| / |a|) in place of a tiny exact value. Use it directly.
  if (p == 1) {
    for (int64_t c = 0; c < qp; ++c) {
      s.work[c] *= kEps / (std::sqrt(sumsq[c]) + kEps);
      tden[c] = 0.f;
    }
  }
  // The attended side's term: dacc[k, :] += sum_r wrow[r] alpha[r, k] right[r, :].
  if (att.gram) {
    small_gemm<true>(q, qp, s.alpha, 1, qp, wrow, p, s.alpha, qp, dacc, dacc_ld, true);
  } else {
    small_gemm<true>(q, w, s.alpha, 1, qp, wrow, p, s.y, w, dacc, dacc_ld, true);
  }
  for (int64_t r = 0; r < p; ++r) {
    float* pr = P + r * qp;
    const float* al = s.alpha + r * qp;
    const float* wr = s.work + r * qp;
    const V16 dn = splat(dnum[r]);
    for (int64_t c = 0; c < qp; c += kLanes) {
      const V16 x = load(pr + c);
      const V16 da = fmadd(load(tden + c), leaky(x), load(wr + c));
      store(pr + c, fmadd(da, leaky_slope(x), dn * load(al + c)));
    }
  }
}

}  // namespace hatkernels::cpu::HATK_CPU_LEVEL::scan
