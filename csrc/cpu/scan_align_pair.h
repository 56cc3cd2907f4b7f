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
// columns; every vector loop runs over whole 16-float vectors (scan_align_simd.h).
//
// Sweeps. The pair's work besides the similarity GEMM is a few sweeps over P: the column
// sums of squares; per row, z and its exp in one sweep (shifted by |lambda|, which bounds
// |z|, so no row maximum is needed while |lambda| <= kFixedShift); the normalisation of alpha
// with num; alpha G (small_gemm) and |c|^2. What is summed per row (the softmax denominator,
// num, |c|^2, the backward's <alpha, d alpha>) stays a vector until a sweep ends, and 16 rows
// are then summed at once (row_sums): separate horizontal sums per row cost more than the
// row's exp. The vector exp, sqrt and division make the rest; the cosine quotients are
// formed 16 rows at a time.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/scan_align_simd.h"

namespace hatkernels::cpu::HATK_CPU_LEVEL::scan {

constexpr float kEps = 1e-8f;

// The attended side of a pair: either its Gram matrix (z = G [q, qp], gram = true) or its
// tokens (z = X [q, ld], width = padded D, gram = false).
struct Attended {
  const float* z;
  int64_t ld;
  int64_t width;
  bool gram;
};

// Per-thread scratch, each at least as large as noted for the largest pair, 64-byte
// aligned. Sized by the caller (Workspace in scan_align_kernel.h).
struct PairScratch {
  float* alpha;  // [p, qp]
  float* y;      // [p, width]: alpha G (Gram) or the contexts c_r (context mode)
  float* work;   // [p, qp]: backward only
  float* col;    // [qp] x 3: sum of squares, lambda / den, backward den sums
  float* row;    // [p] x 5: num, |c|^2, then row sums and the backward's per-row terms
  float* lanes;  // [pad_lanes(p), 16]: one vector per row, before its horizontal sum
};

// The softmax's shift. |a[r, c]| <= den_c, so |z| <= |lambda|: exp(z - |lambda|) cannot
// overflow, and while |lambda| <= kFixedShift it stays a normal float (>= exp(-80)), so the
// row maximum (a horizontal reduction per row) is needed only for larger |lambda|.
constexpr float kFixedShift = 40.f;

// Column statistics and the attention of every row; fills s.alpha, s.y, num = s.row,
// c2 = s.row + p. Columns >= q get alpha = 0. The per-row sums (softmax denominator, num,
// |c|^2) are kept as vectors and summed 16 rows at a time (row_sums).
inline void pair_attention(const float* P, int64_t p, int64_t q, int64_t qp,
                           const Attended& att, float lam, const PairScratch& s) {
  float* sumsq = s.col;
  float* inv = s.col + qp;
  float* num = s.row;
  float* c2 = s.row + p;
  float* rsum = s.row + 2 * p;
  for (int64_t c = 0; c < qp; c += kLanes) {
    V16 acc{};
    for (int64_t r = 0; r < p; ++r) {
      const V16 a = leaky(load(P + r * qp + c));
      acc = fmadd(a, a, acc);
    }
    store(sumsq + c, acc);
  }
  for (int64_t c = 0; c < qp; c += kLanes)
    store(inv + c, splat(lam) / (vsqrt(load(sumsq + c)) + kEps));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float abs_lam = std::fabs(lam);
  const bool fixed_shift = abs_lam <= kFixedShift;
  const V16 tail = splat(neg_inf);  // for the padded columns
  const int64_t last = qp - kLanes;  // the only chunk that may hold padded columns
  I16 lane;
  for (int i = 0; i < 16; ++i) lane[i] = i;
  const I16 valid = lane < static_cast<int32_t>(q - last);
  for (int64_t r = 0; r < p; ++r) {
    const float* pr = P + r * qp;
    float* al = s.alpha + r * qp;
    const auto z = [&](int64_t c) {
      const V16 zc = leaky(load(pr + c)) * load(inv + c);
      return c == last ? (valid ? zc : tail) : zc;
    };
    V16 shift = splat(abs_lam);
    if (!fixed_shift) {
      V16 mx = splat(neg_inf);
      for (int64_t c = 0; c < qp; c += kLanes) mx = vmax(mx, z(c));
      shift = splat(hmax(mx));
    }
    V16 sum{};
    for (int64_t c = 0; c < qp; c += kLanes) {
      const V16 e = exp16(z(c) - shift);
      store(al + c, e);
      sum += e;
    }
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
    const V16 c = load(cc);
    const V16 prod = load(xn) * vsqrt(c > 0.f ? c : splat(0.f));
    total += load(nm) / (prod > kEps ? prod : splat(kEps));
  }
  return hsum(total);
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
