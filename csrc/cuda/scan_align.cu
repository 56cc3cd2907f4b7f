// Fused HAT scan pooling on CUDA. A persistent CTA takes blocks of whole images x
// whole captions; it computes the block's similarities 64 x 64 at a time (common.cuh) into
// its scratch (shared memory when it fits, else its slice of a global buffer), then one warp
// per (image, caption) pair pools the pair's block. The attended context is never formed:
// <x, c> = sum alpha S and |c|^2 = alpha^T G alpha with G the Gram matrix of the attended side
// (the Gram identity), precomputed by the caller.
//
// The backward recomputes each pair's similarities and attention, forms dS in scratch,
// accumulates the Gram and norm gradients (d_gram, d_norm, applied by the caller), and adds
// dV = dS T and dT = dS^T V into float32 buffers with atomics.
#include "cuda/common.cuh"

namespace hatkernels::cuda {
namespace {

// One direction of one pair, seen as queries attending over keys: element (q, k) of the
// pair's similarities is s[q * sq + k * sk] (i2t: queries are image tokens, keys words; t2i
// the reverse). gram is the keys' Gram matrix with row stride ldg.
struct DirView {
  const float* s;
  float* ds;
  int64_t sq, sk;
  int nq, nk;
  const float* gram;
  int ldg;
  const float* qnorm;
  float* dqnorm;
  float* dgram;
  __device__ __forceinline__ float at(int q, int k) const { return s[q * sq + k * sk]; }
  __device__ __forceinline__ float& dat(int q, int k) const { return ds[q * sq + k * sk]; }
};

// Attention of query q over the keys (scan steps 2-4, kn = key norms + eps) into
// alpha[0, nk), and the warp-wide sums num = sum_k alpha S and c2 = alpha^T G alpha. When ga
// is not null it receives G alpha (the backward reuses it).
__device__ __forceinline__ void attend_row(const DirView& v, int q, float lam, const float* kn,
                                           float* alpha, float* ga, int lane, float& num,
                                           float& c2) {
  float mx = -INFINITY;
  for (int k = lane; k < v.nk; k += 32) {
    const float x = lam * leaky(v.at(q, k)) / kn[k];
    alpha[k] = x;
    mx = fmaxf(mx, x);
  }
  mx = warp_max(mx);
  float se = 0.0f;
  for (int k = lane; k < v.nk; k += 32) {
    const float e = expf(alpha[k] - mx);
    alpha[k] = e;
    se += e;
  }
  const float inv = 1.0f / warp_sum(se);
  num = 0.0f;
  for (int k = lane; k < v.nk; k += 32) {
    const float a = alpha[k] * inv;
    alpha[k] = a;
    num = fmaf(a, v.at(q, k), num);
  }
  num = warp_sum(num);
  __syncwarp();
  c2 = 0.0f;
  for (int k = lane; k < v.nk; k += 32) {
    float g = 0.0f;
    for (int k2 = 0; k2 < v.nk; ++k2) g = fmaf(v.gram[k2 * v.ldg + k], alpha[k2], g);
    if (ga != nullptr) ga[k] = g;
    c2 = fmaf(alpha[k], g, c2);
  }
  c2 = warp_sum(c2);
}

// Sum over queries [q0, q1) of the cosine q (scan steps 1-4; the key norms span every
// query); wb holds 2 * L floats of this warp.
__device__ float scan_dir_forward(const DirView& v, float lam, float* wb, int L, int lane, int q0,
                                  int q1) {
  float* kn = wb;         // key norms (+ eps)
  float* alpha = wb + L;  // attention of the current query
  for (int k = lane; k < v.nk; k += 32) {
    float ss = 0.0f;
    for (int q = 0; q < v.nq; ++q) {
      const float a = leaky(v.at(q, k));
      ss = fmaf(a, a, ss);
    }
    kn[k] = sqrtf(ss) + kEps;
  }
  __syncwarp();
  float total = 0.0f;
  for (int q = q0; q < q1; ++q) {
    float num, c2;
    attend_row(v, q, lam, kn, alpha, nullptr, lane, num, c2);
    total += num / fmaxf(v.qnorm[q] * sqrtf(fmaxf(c2, 0.0f)), kEps);
    __syncwarp();
  }
  return total;
}

// Gradient of gq * (sum over queries of q) with respect to the pair's similarities (added
// into v.ds), the query norms (atomically into v.dqnorm) and the keys' Gram matrix
// (atomically into v.dgram). wb holds 5 * L + L * L floats of this warp.
__device__ void scan_dir_backward(const DirView& v, float lam, float gq, float* wb, int L,
                                  int lane) {
  float* kn = wb;             // sqrt(ss) + eps
  float* ssr = wb + L;        // sqrt(ss)
  float* dkn = wb + 2 * L;    // gradient of kn
  float* alpha = wb + 3 * L;  // attention of the current query
  float* ga = wb + 4 * L;     // G alpha
  float* dgl = wb + 5 * L;    // this pair's Gram gradient, [k2 * ldg + k]
  for (int k = lane; k < v.nk; k += 32) {
    float ss = 0.0f;
    for (int q = 0; q < v.nq; ++q) {
      const float a = leaky(v.at(q, k));
      ss = fmaf(a, a, ss);
    }
    ssr[k] = sqrtf(ss);
    kn[k] = ssr[k] + kEps;
    dkn[k] = 0.0f;
    for (int k2 = 0; k2 < v.nk; ++k2) dgl[k2 * v.ldg + k] = 0.0f;
  }
  __syncwarp();
  for (int q = 0; q < v.nq; ++q) {
    float num, c2;
    attend_row(v, q, lam, kn, alpha, ga, lane, num, c2);
    // q = num / max(|x| |c|, eps) with |c| = sqrt(max(c2, 0)).
    const float cn = sqrtf(fmaxf(c2, 0.0f));
    const float xn = v.qnorm[q];
    const float prod = xn * cn;
    const float den = fmaxf(prod, kEps);
    const float dnum = gq / den;
    const float dden = -gq * num / (den * den);
    const float dxn = prod >= kEps ? dden * cn : 0.0f;
    const float dcn = prod >= kEps ? dden * xn : 0.0f;
    const float dc2 = c2 > 0.0f ? dcn / (2.0f * cn) : 0.0f;
    if (lane == 0 && dxn != 0.0f) atomicAdd(v.dqnorm + q, dxn);
    // dalpha = dnum S + 2 dc2 G alpha; softmax backward needs sum_k alpha dalpha.
    float dot = 0.0f;
    for (int k = lane; k < v.nk; k += 32) {
      dot = fmaf(alpha[k], fmaf(dnum, v.at(q, k), 2.0f * dc2 * ga[k]), dot);
    }
    dot = warp_sum(dot);
    for (int k = lane; k < v.nk; k += 32) {
      const float s = v.at(q, k);
      const float da = fmaf(dnum, s, 2.0f * dc2 * ga[k]);
      const float db = lam * alpha[k] * (da - dot);  // d(b) with b = a / kn
      dkn[k] -= db * leaky(s) / (kn[k] * kn[k]);
      v.dat(q, k) += dnum * alpha[k] + (db / kn[k]) * leaky_grad(s);
      if (dc2 != 0.0f) {
        const float f = dc2 * alpha[k];
        for (int k2 = 0; k2 < v.nk; ++k2) dgl[k2 * v.ldg + k] = fmaf(f, alpha[k2], dgl[k2 * v.ldg + k]);
      }
    }
    __syncwarp();
  }
  // kn = sqrt(sum_q a^2) + eps: da = dkn a / sqrt(ss); then flush the Gram gradient.
  for (int k = lane; k < v.nk; k += 32) {
    if (ssr[k] > 0.0f) {
      const float f = dkn[k] / ssr[k];
      for (int q = 0; q < v.nq; ++q) {
        const float s = v.at(q, k);
        v.dat(q, k) += f * leaky(s) * leaky_grad(s);
      }
    }
    for (int k2 = 0; k2 < v.nk; ++k2) {
      const float g = dgl[k2 * v.ldg + k];
      if (g != 0.0f) atomicAdd(v.dgram + k2 * v.ldg + k, g);
    }
  }
  __syncwarp();
}

// dV[i] += dS T[j] and dT[j] += dS^T V[i] over the block's valid tokens, 8 output tokens per
// pass, threads over the feature dimension.
template <typename T>
__device__ void apply_ds(const Problem& p, const float* dsb, int ldb, int64_t i0, int64_t j0,
                         int nimg, int ncap, const int* ilen, const int* tlen, float* gi,
                         float* gt) {
  const T* images = static_cast<const T*>(p.images);
  const T* texts = static_cast<const T*>(p.texts);
  const int M = static_cast<int>(p.m), N = static_cast<int>(p.n);
  const int64_t D = p.d;
  for (int il = 0; il < nimg; ++il) {
    const int m = ilen[il];
    for (int r0 = 0; r0 < m; r0 += 8) {
      const int rows = min(8, m - r0);
      const float* dsr = dsb + (il * M + r0) * ldb;
      for (int64_t d = threadIdx.x; d < D; d += kThreads) {
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int jl = 0; jl < ncap; ++jl) {
          const T* tcol = texts + (j0 + jl) * N * D + d;
          for (int w = 0; w < tlen[jl]; ++w) {
            const float t = Cvt<T>::to_float(tcol[w * D]);
            const int c = jl * N + w;
#pragma unroll
            for (int k = 0; k < 8; ++k)
              if (k < rows) acc[k] = fmaf(dsr[k * ldb + c], t, acc[k]);
          }
        }
        float* g = gi + ((i0 + il) * M + r0) * D + d;
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if (k < rows) atomicAdd(g + k * D, acc[k]);
      }
    }
  }
  for (int jl = 0; jl < ncap; ++jl) {
    const int n = tlen[jl];
    for (int w0 = 0; w0 < n; w0 += 8) {
      const int cols = min(8, n - w0);
      for (int64_t d = threadIdx.x; d < D; d += kThreads) {
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int il = 0; il < nimg; ++il) {
          const T* vcol = images + (i0 + il) * M * D + d;
          const float* dsc = dsb + (il * M) * ldb + jl * N + w0;
          for (int r = 0; r < ilen[il]; ++r) {
            const float x = Cvt<T>::to_float(vcol[r * D]);
#pragma unroll
            for (int k = 0; k < 8; ++k)
              if (k < cols) acc[k] = fmaf(dsc[r * ldb + k], x, acc[k]);
          }
        }
        float* g = gt + ((j0 + jl) * N + w0) * D + d;
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if (k < cols) atomicAdd(g + k * D, acc[k]);
      }
    }
  }
}

// Floats of scratch per CTA: the block's S (and dS) with odd row stride, then per warp 2 L
// (forward) or 5 L + L^2 (backward) floats, L = max(M, N).
__host__ __device__ inline int64_t block_ld(int jb, int64_t n) { return (jb * n) | 1; }
__host__ __device__ inline int64_t warp_floats(bool backward, int64_t L) {
  return backward ? 5 * L + L * L : 2 * L;
}
inline int64_t scratch_floats(bool backward, int ib, int jb, int64_t m, int64_t n) {
  const int64_t blk = ib * m * block_ld(jb, n);
  return blk * (backward ? 2 : 1) + kWarps * warp_floats(backward, std::max(m, n));
}

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    scan_align_kernel(Problem p, Plan pl, ScanAux aux, float* out, const float* grad,
                      float* grad_images, float* grad_texts) {
  __shared__ __align__(128) TileSmem<T> sm;
  __shared__ int ilen[kMaxBlockItems];
  __shared__ int tlen[kMaxBlockItems];
  __shared__ float partial[kWarps];  // per-warp partial scores of split pairs
  extern __shared__ __align__(16) float dyn_smem[];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int IB = pl.ib, JB = pl.jb;
  const int M = static_cast<int>(p.m), N = static_cast<int>(p.n);
  const int R = IB * M, C = JB * N;
  const int ldb = static_cast<int>(block_ld(JB, N));
  const int L = max(M, N);
  const int64_t D = p.d;
  const bool t2i = p.direction != kI2T, i2t = p.direction != kT2I;
  float* scratch = pl.global_scratch ? aux.scratch + blockIdx.x * pl.scratch_floats : dyn_smem;
  float* sblk = scratch;
  float* dsblk = sblk + static_cast<int64_t>(R) * ldb;
  float* wb = (kBackward ? dsblk + static_cast<int64_t>(R) * ldb : dsblk) +
              warp * warp_floats(kBackward, L);
  const T* images = static_cast<const T*>(p.images);
  const T* texts = static_cast<const T*>(p.texts);

  for (int64_t item = blockIdx.x; item < pl.items; item += gridDim.x) {
    int64_t ib, jb;
    block_coords(item, pl, ib, jb);
    const int64_t i0 = ib * IB, j0 = jb * JB;
    const int nimg = static_cast<int>(min(int64_t(IB), p.bi - i0));
    const int ncap = static_cast<int>(min(int64_t(JB), p.bt - j0));
    load_lengths(p, i0, j0, IB, JB, ilen, tlen);
    const BlockSide<T> A{images + i0 * M * D, R, M, ilen};
    const BlockSide<T> B{texts + j0 * N * D, C, N, tlen};
    for (int row0 = 0; row0 < R; row0 += kTM) {
      for (int col0 = 0; col0 < C; col0 += kTN) {
        if (!compute_tile<T>(A, B, row0, col0, D, p.vec, sm)) continue;
        for (int e = tid; e < kTM * kTN; e += kThreads) {
          const int r = e / kTN, c = e % kTN;
          if (sm.va[r] && sm.vb[c]) sblk[(row0 + r) * ldb + col0 + c] = sm.st[r][c];
        }
        __syncthreads();
      }
    }
    if (kBackward) {
      for (int64_t e = tid; e < static_cast<int64_t>(R) * ldb; e += kThreads) dsblk[e] = 0.0f;
    }
    __syncthreads();

    // One warp per (image, caption) pair; in the forward, with fewer pairs than warps, the
    // warps of a pair split its queries and their partial scores are summed in order below.
    const int pairs = IB * JB;
    const int split = kBackward ? 1 : max(1, kWarps / pairs);
    for (int u = warp; u < pairs * split; u += kWarps) {
      const int q = u / split, part = u % split;
      const int il = q / JB, jl = q % JB;
      if (il >= nimg || jl >= ncap) continue;
      const int m = ilen[il], n = tlen[jl];
      const int64_t i = i0 + il, j = j0 + jl;
      const float* sp = sblk + il * M * ldb + jl * N;
      float* dsp = dsblk + il * M * ldb + jl * N;
      const float g = kBackward ? grad[i * p.ld_out + j] : 0.0f;
      float score = 0.0f;
      if (t2i) {  // words (columns) attend over image tokens (rows)
        DirView v{sp, dsp, 1, ldb, n, m, aux.gram_img + i * M * M, M, aux.txt_norm + j * N,
                  nullptr, nullptr};
        if (kBackward) {
          v.dqnorm = aux.d_txt_norm + j * N;
          v.dgram = aux.d_gram_img + i * M * M;
          scan_dir_backward(v, aux.lambda_softmax, p.mean ? g / n : g, wb, L, lane);
        } else {
          const float s = scan_dir_forward(v, aux.lambda_softmax, wb, L, lane,
                                           part * n / split, (part + 1) * n / split);
          score += p.mean ? s / n : s;
        }
      }
      if (i2t) {  // image tokens (rows) attend over words (columns)
        DirView v{sp, dsp, ldb, 1, m, n, aux.gram_txt + j * N * N, N, aux.img_norm + i * M,
                  nullptr, nullptr};
        if (kBackward) {
          v.dqnorm = aux.d_img_norm + i * M;
          v.dgram = aux.d_gram_txt + j * N * N;
          scan_dir_backward(v, aux.lambda_softmax, p.mean ? g / m : g, wb, L, lane);
        } else {
          const float s = scan_dir_forward(v, aux.lambda_softmax, wb, L, lane,
                                           part * m / split, (part + 1) * m / split);
          score += p.mean ? s / m : s;
        }
      }
      if (!kBackward && lane == 0) {
        if (split == 1) {
          out[i * p.ld_out + j] = score;
        } else {
          partial[u] = score;
        }
      }
    }
    __syncthreads();
    if (!kBackward && split > 1 && tid < pairs) {
      const int il = tid / JB, jl = tid % JB;
      if (il < nimg && jl < ncap) {
        float score = 0.0f;
        for (int k = 0; k < split; ++k) score += partial[tid * split + k];
        out[(i0 + il) * p.ld_out + j0 + jl] = score;
      }
    }
    if (!kBackward) __syncthreads();
    if (kBackward) {
      apply_ds<T>(p, dsblk, ldb, i0, j0, nimg, ncap, ilen, tlen, grad_images, grad_texts);
      __syncthreads();
    }
  }
}

template <typename T, bool kBackward>
Status plan_for(const Problem& p, Plan* pl) {
  DeviceLimits lim;
  Status st = device_limits(&lim);
  if (st.error != cudaSuccess) return st;
  auto kernel = scan_align_kernel<T, kBackward>;
  cudaFuncAttributes attr{};
  cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
  if (e != cudaSuccess) return Status{e, "scan_align_kernel (attributes)", nullptr};
  const int64_t smem_budget = lim.smem_optin - static_cast<int64_t>(attr.sharedSizeBytes) - 1024;
  // Blocks of up to 128 rows and 128 columns (several pairs per CTA), shrunk until the
  // scratch fits in shared memory; past one pair per CTA it goes to global memory.
  int64_t cap_r = 128, cap_c = 128;
  for (;;) {
    pl->ib = pick_block(p.m, p.bi, cap_r);
    pl->jb = pick_block(p.n, p.bt, cap_c);
    pl->scratch_floats = scratch_floats(kBackward, pl->ib, pl->jb, p.m, p.n);
    if (pl->scratch_floats * 4 <= smem_budget || (pl->ib == 1 && pl->jb == 1)) break;
    const int64_t rows = pl->ib * p.m, cols = pl->jb * p.n;
    if (rows >= cols && pl->ib > 1) cap_r = std::max<int64_t>(p.m, rows / 2);
    else if (pl->jb > 1) cap_c = std::max<int64_t>(p.n, cols / 2);
    else cap_r = std::max<int64_t>(p.m, rows / 2);
  }
  finish_plan(p, sizeof(T), pl);
  pl->global_scratch = pl->scratch_floats * 4 > smem_budget;
  pl->dyn_smem = pl->global_scratch ? 0 : pl->scratch_floats * 4;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(pl->dyn_smem));
  if (e != cudaSuccess) return Status{e, "scan_align_kernel (shared memory size)", nullptr};
  int per_sm = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                    static_cast<size_t>(pl->dyn_smem));
  if (e != cudaSuccess) return Status{e, "scan_align_kernel (occupancy)", nullptr};
  int64_t grid = static_cast<int64_t>(lim.sms) * std::max(1, per_sm);
  if (pl->global_scratch) {  // keep the global scratch under about 1 GiB
    grid = std::min<int64_t>(grid, std::max<int64_t>(1, (int64_t(1) << 28) / pl->scratch_floats));
  }
  pl->grid = std::max<int64_t>(1, std::min(grid, pl->items));
  return Status{};
}

template <typename T, bool kBackward>
Status launch(const Problem& p, const Plan& pl, const ScanAux& aux, float* out,
              const float* grad, float* gi, float* gt, cudaStream_t stream) {
  if (pl.items == 0) return Status{};
  scan_align_kernel<T, kBackward><<<static_cast<unsigned>(pl.grid), kThreads,
                                    static_cast<size_t>(pl.dyn_smem), stream>>>(p, pl, aux, out,
                                                                                grad, gi, gt);
  return launch_status(kBackward ? "scan_align_kernel (backward)" : "scan_align_kernel (forward)");
}

}  // namespace

Status scan_align_plan(const Problem& p, DType dtype, bool backward, Plan* plan) {
  return dispatch_dtype(dtype, "scan_align", [&](auto t) {
    using T = typename decltype(t)::type;
    return backward ? plan_for<T, true>(p, plan) : plan_for<T, false>(p, plan);
  });
}

Status scan_align_forward(const Problem& p, DType dtype, const Plan& plan, const ScanAux& aux,
                          float* out, cudaStream_t stream) {
  return dispatch_dtype(dtype, "scan_align", [&](auto t) {
    using T = typename decltype(t)::type;
    return launch<T, false>(p, plan, aux, out, nullptr, nullptr, nullptr, stream);
  });
}

Status scan_align_backward(const Problem& p, DType dtype, const Plan& plan, const ScanAux& aux,
                           const float* grad, float* grad_images, float* grad_texts,
                           cudaStream_t stream) {
  return dispatch_dtype(dtype, "scan_align", [&](auto t) {
    using T = typename decltype(t)::type;
    return launch<T, true>(p, plan, aux, nullptr, grad, grad_images, grad_texts, stream);
  });
}

}  // namespace hatkernels::cuda
