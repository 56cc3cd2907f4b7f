// Fused max pooling on CUDA: one CTA per block of whole images x whole captions.
// Captions come packed (their valid words back to back, so padding words are never
// multiplied); the block's similarities are computed 64 x 64 at a time (common.cuh) and
// pooled while in shared memory: a running max per (image, word) for t2i and per (image
// token, caption) for i2t. Nothing of size [Bi, Bt, M, N] is ever written. The backward
// recomputes the same tiles, keeps the argmax, and adds coef * (other side's winning token)
// into float32 gradient buffers with atomics (one winner per query token).
#include "cuda/common.cuh"

namespace hatkernels::cuda {
namespace {

// The block caption holding block column c (toff: packed word offsets of the block's
// captions relative to its first one, toff[ncap] the block's word count).
__device__ __forceinline__ int caption_of(int c, const int* toff, int ncap) {
  int jl = 0;
  while (jl + 1 < ncap && toff[jl + 1] <= c) ++jl;
  return jl;
}

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    max_align_kernel(Problem p, Plan pl, float* out, const float* grad, float* grad_images,
                     float* grad_texts) {
  __shared__ __align__(128) TileSmem<T> sm;
  __shared__ int ilen[kMaxBlockItems];
  __shared__ int tlen[kMaxBlockItems];
  __shared__ int toff[kMaxBlockItems + 1];
  extern __shared__ __align__(16) float dyn_smem[];

  const int tid = threadIdx.x;
  int64_t ib, jb;
  block_coords(blockIdx.x, pl, ib, jb);
  const int64_t i0 = ib * pl.ib, j0 = jb * pl.jb;
  const int IB = pl.ib, JB = pl.jb;
  const int M = static_cast<int>(p.m), N = static_cast<int>(p.n);
  const int R = IB * M, C = JB * N;
  const int64_t D = p.d;
  const int nimg = static_cast<int>(min(int64_t(IB), p.bi - i0));
  const int ncap = static_cast<int>(min(int64_t(JB), p.bt - j0));
  const bool t2i = p.direction != kI2T, i2t = p.direction != kT2I;

  // Pooling state: tmax[il * C + c] best image token of image il for block (packed) column c
  // (t2i), imax[r * JB + jl] best word of caption jl for block row r (i2t); arg* the winners.
  float* tmax = dyn_smem;
  float* imax = tmax + IB * C;
  int* targ = reinterpret_cast<int*>(imax + R * JB);
  int* iarg = targ + IB * C;
  for (int e = tid; e < IB * C; e += kThreads) {
    tmax[e] = -INFINITY;
    if (kBackward) targ[e] = -1;
  }
  for (int e = tid; e < R * JB; e += kThreads) {
    imax[e] = -INFINITY;
    if (kBackward) iarg[e] = -1;
  }
  const int64_t first_word = p.text_offsets[j0];
  for (int e = tid; e <= ncap; e += kThreads) {
    toff[e] = static_cast<int>(p.text_offsets[j0 + e] - first_word);
  }
  load_lengths(p, i0, j0, IB, JB, ilen, tlen);
  const int words = toff[ncap];  // packed columns of this block (<= C)

  const T* images = static_cast<const T*>(p.images);
  const T* texts = static_cast<const T*>(p.texts);
  const T* packed = static_cast<const T*>(p.texts_packed);
  const BlockSide<T> A{images + i0 * M * D, R, M, ilen};
  const BlockSide<T> B{packed + first_word * D, words, 1, nullptr};

  for (int row0 = 0; row0 < R; row0 += kTM) {
    for (int col0 = 0; col0 < words; col0 += kTN) {
      if (!compute_tile<T>(A, B, row0, col0, D, p.vec, sm)) continue;
      const int ncols = min(kTN, words - col0);
      // Running maxima in registers, flushed to the pooling state where an image (t2i) or a
      // caption (i2t) ends inside the tile, or at the tile's end. `arg >= 0` marks a flush
      // that saw a valid token (only those index the state).
      if (t2i && tid < ncols) {  // one thread per column: max over image tokens
        int il = row0 / M, tok = row0 % M, arg = -1;
        float best = -INFINITY;
        for (int r = 0; r < kTM; ++r) {
          if (sm.va[r] && sm.st[r][tid] > best) {
            best = sm.st[r][tid];
            arg = tok;
          }
          const bool wraps = ++tok == M;
          if (wraps || r == kTM - 1) {
            const int e = il * C + col0 + tid;
            if (arg >= 0 && best > tmax[e]) {
              tmax[e] = best;
              if (kBackward) targ[e] = arg;
            }
            best = -INFINITY;
            arg = -1;
          }
          if (wraps) {
            tok = 0;
            ++il;
          }
        }
      }
      const int r = tid - (kThreads - kTM);
      if (i2t && r >= 0 && sm.va[r]) {  // one thread per row: max over each caption's words
        const int lr = row0 + r;
        int jl = caption_of(col0, toff, ncap);
        int w = col0 - toff[jl], arg = -1;
        float best = -INFINITY;
        for (int c = 0; c < ncols; ++c) {
          if (sm.st[r][c] > best) {
            best = sm.st[r][c];
            arg = w;
          }
          const bool wraps = ++w >= tlen[jl];
          if (wraps || c == ncols - 1) {
            const int e = lr * JB + jl;
            if (arg >= 0 && best > imax[e]) {
              imax[e] = best;
              if (kBackward) iarg[e] = arg;
            }
            best = -INFINITY;
            arg = -1;
          }
          if (wraps && c + 1 < ncols) {
            w = 0;
            jl = caption_of(col0 + c + 1, toff, ncap);
          }
        }
      }
      __syncthreads();
    }
  }

  if (!kBackward) {
    for (int q = tid; q < IB * JB; q += kThreads) {
      const int il = q / JB, jl = q % JB;
      if (il >= nimg || jl >= ncap) continue;
      const int m = ilen[il], n = tlen[jl];
      float score = 0.0f;
      if (t2i) {
        float acc = 0.0f;
        for (int c = toff[jl]; c < toff[jl + 1]; ++c) acc += tmax[il * C + c];
        score += p.mean ? acc / n : acc;
      }
      if (i2t) {
        float acc = 0.0f;
        for (int rr = 0; rr < m; ++rr) acc += imax[(il * M + rr) * JB + jl];
        score += p.mean ? acc / m : acc;
      }
      out[(i0 + il) * p.ld_out + j0 + jl] = score;
    }
    return;
  }

  // Backward: every winner adds coef * (the other token) to both tokens' gradients. The loops
  // over winners are uniform across the CTA; threads split the feature dimension.
  if (t2i) {
    for (int il = 0; il < nimg; ++il) {
      int jl = 0;
      for (int c = 0; c < words; ++c) {
        while (c >= toff[jl + 1]) ++jl;
        const int r = targ[il * C + c];
        if (r < 0) continue;
        const int w = c - toff[jl];
        const int64_t i = i0 + il, j = j0 + jl;
        const float coef = grad[i * p.ld_out + j] * (p.mean ? 1.0f / tlen[jl] : 1.0f);
        const T* vrow = images + (i * M + r) * D;
        const T* trow = texts + (j * N + w) * D;
        float* gv = grad_images + (i * M + r) * D;
        float* gt = grad_texts + (j * N + w) * D;
        for (int64_t k = tid; k < D; k += kThreads) {
          atomicAdd(gt + k, coef * Cvt<T>::to_float(vrow[k]));
          atomicAdd(gv + k, coef * Cvt<T>::to_float(trow[k]));
        }
      }
    }
  }
  if (i2t) {
    for (int e = 0; e < R * JB; ++e) {
      const int lr = e / JB, jl = e % JB, il = lr / M, r = lr % M;
      if (il >= nimg || jl >= ncap || r >= ilen[il]) continue;
      const int w = iarg[e];
      if (w < 0) continue;
      const int64_t i = i0 + il, j = j0 + jl;
      const float coef = grad[i * p.ld_out + j] * (p.mean ? 1.0f / ilen[il] : 1.0f);
      const T* vrow = images + (i * M + r) * D;
      const T* trow = texts + (j * N + w) * D;
      float* gv = grad_images + (i * M + r) * D;
      float* gt = grad_texts + (j * N + w) * D;
      for (int64_t k = tid; k < D; k += kThreads) {
        atomicAdd(gt + k, coef * Cvt<T>::to_float(vrow[k]));
        atomicAdd(gv + k, coef * Cvt<T>::to_float(trow[k]));
      }
    }
  }
}

template <typename T, bool kBackward>
Status plan_for(const Problem& p, Plan* pl) {
  DeviceLimits lim;
  Status st = device_limits(&lim);
  if (st.error != cudaSuccess) return st;
  auto kernel = max_align_kernel<T, kBackward>;
  cudaFuncAttributes attr{};
  cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
  if (e != cudaSuccess) return Status{e, "max_align_kernel (attributes)", nullptr};
  const int64_t budget = lim.smem_optin - static_cast<int64_t>(attr.sharedSizeBytes) - 1024;
  // Blocks of up to 256 rows and 256 columns, shrunk until the pooling state fits.
  int64_t cap_r = 256, cap_c = 256;
  for (;;) {
    pl->ib = pick_block(p.m, p.bi, cap_r);
    pl->jb = pick_block(p.n, p.bt, cap_c);
    const int64_t rows = pl->ib * p.m, cols = pl->jb * p.n;
    const int64_t floats = pl->ib * cols + rows * pl->jb;
    pl->dyn_smem = floats * 4 * (kBackward ? 2 : 1);
    if (pl->dyn_smem <= budget) break;
    if (pl->ib == 1 && pl->jb == 1) {
      return Status{cudaSuccess, "max_align",
                    "image and caption token counts too large for the CUDA max_align kernel's "
                    "shared-memory pooling state (M + N must be below about 20000)"};
    }
    if (rows >= cols && pl->ib > 1) cap_r = std::max<int64_t>(p.m, rows / 2);
    else if (pl->jb > 1) cap_c = std::max<int64_t>(p.n, cols / 2);
    else cap_r = std::max<int64_t>(p.m, rows / 2);
  }
  finish_plan(p, sizeof(T), pl);
  pl->grid = pl->items;
  if (pl->grid > 0x7fffffff) return Status{cudaSuccess, "max_align", "too many blocks"};
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(pl->dyn_smem));
  if (e != cudaSuccess) return Status{e, "max_align_kernel (shared memory size)", nullptr};
  return Status{};
}

template <typename T, bool kBackward>
Status launch(const Problem& p, const Plan& pl, float* out, const float* grad, float* gi,
              float* gt, cudaStream_t stream) {
  if (pl.items == 0) return Status{};
  max_align_kernel<T, kBackward><<<static_cast<unsigned>(pl.grid), kThreads,
                                   static_cast<size_t>(pl.dyn_smem), stream>>>(p, pl, out, grad,
                                                                               gi, gt);
  return launch_status(kBackward ? "max_align_kernel (backward)" : "max_align_kernel (forward)");
}

}  // namespace

Status max_align_plan(const Problem& p, DType dtype, bool backward, Plan* plan) {
  return dispatch_dtype(dtype, "max_align", [&](auto t) {
    using T = typename decltype(t)::type;
    return backward ? plan_for<T, true>(p, plan) : plan_for<T, false>(p, plan);
  });
}

Status max_align_forward(const Problem& p, DType dtype, const Plan& plan, float* out,
                         cudaStream_t stream) {
  return dispatch_dtype(dtype, "max_align", [&](auto t) {
    using T = typename decltype(t)::type;
    return launch<T, false>(p, plan, out, nullptr, nullptr, nullptr, stream);
  });
}

Status max_align_backward(const Problem& p, DType dtype, const Plan& plan, const float* grad,
                          float* grad_images, float* grad_texts, cudaStream_t stream) {
  return dispatch_dtype(dtype, "max_align", [&](auto t) {
    using T = typename decltype(t)::type;
    return launch<T, true>(p, plan, nullptr, grad, grad_images, grad_texts, stream);
  });
}

}  // namespace hatkernels::cuda
