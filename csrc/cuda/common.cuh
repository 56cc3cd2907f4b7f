// Shared device code of the CUDA kernels: dtype conversions, CTA block coordinates, and the
// similarity tile S = A B^T of 64 rows x 64 columns (tensor-core WMMA with float32
// accumulation for fp16/bf16, exact float32 FMA for float32), computed from zero-filled
// shared-memory tiles so that padding (which may hold NaN) is never read.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/launchers.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "hatkernels CUDA kernels need sm_80 or newer (set HATKERNELS_CUDA_ARCHS, e.g. 80;90)"
#endif

namespace hatkernels::cuda {

constexpr int kThreads = 128;  // 4 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kTM = 64;        // tile rows (image tokens)
constexpr int kTN = 64;        // tile columns (words)
constexpr int kBK = 32;        // feature slice per step (float32 FMA path)
constexpr int kBKMma = 64;     // feature slice per step (tensor-core path)
constexpr int kLdS = kTN + 4;  // row stride of the float tile (WMMA stores need a multiple of 4)
constexpr int kMaxBlockItems = 256;  // images (or captions) per CTA block, at most
constexpr float kEps = 1e-8f;
constexpr float kSlope = 0.1f;

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float zero() { return 0.0f; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half zero() { return __float2half(0.0f); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __float2bfloat16(0.0f); }
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float leaky(float s) { return s > 0.0f ? s : kSlope * s; }
__device__ __forceinline__ float leaky_grad(float s) { return s > 0.0f ? 1.0f : kSlope; }

// Block coordinates of work item `item`: image blocks are visited in groups of plan.group so
// that a caption block is reused from L2 by the CTAs of one group.
__device__ __forceinline__ void block_coords(int64_t item, const Plan& pl, int64_t& ib,
                                             int64_t& jb) {
  const int64_t per_group = pl.group * pl.n_jb;
  const int64_t g = item / per_group;
  const int64_t first = g * pl.group;
  const int64_t size = min(pl.group, pl.n_ib - first);
  const int64_t local = item - g * per_group;
  ib = first + local % size;
  jb = local / size;
}

// Valid-token counts of the block's images and captions (0 past the batch end), clamped to
// [0, m] / [0, n]. Ends with a barrier.
__device__ __forceinline__ void load_lengths(const Problem& p, int64_t i0, int64_t j0, int nib,
                                             int njb, int* ilen, int* tlen) {
  for (int e = threadIdx.x; e < nib; e += kThreads) {
    const int64_t i = i0 + e;
    ilen[e] = i < p.bi ? static_cast<int>(min(max(p.image_lengths[i], int64_t(0)), p.m)) : 0;
  }
  for (int e = threadIdx.x; e < njb; e += kThreads) {
    const int64_t j = j0 + e;
    tlen[e] = j < p.bt ? static_cast<int>(min(max(p.text_lengths[j], int64_t(0)), p.n)) : 0;
  }
  __syncthreads();
}

// One side of a CTA block: `rows` rows starting at `base`, either items x tokens padded rows
// (`lens`: valid tokens per item, in shared memory) or packed valid rows (`lens` null).
template <typename T>
struct BlockSide {
  const T* base;
  int rows;
  int tokens;
  const int* lens;
  __device__ __forceinline__ bool valid(int row) const {
    return row < rows && (lens == nullptr || (row % tokens) < lens[row / tokens]);
  }
};

// Tensor-core path: two stages of 16-bit A and B slices (cp.async double buffering), sharing
// their bytes with the float tile st, which is only written after the last slice is used.
template <typename T>
struct MmaSmem {
  union {
    float st[kTM][kLdS];
    uint16_t ab[2][2][kTM][kBKMma + 8];  // [stage][A, B][row][feature], raw T bits
  };
  bool va[kTM];
  bool vb[kTN];
  __device__ __forceinline__ T* a(int stage, int row, int k) {
    return reinterpret_cast<T*>(&ab[stage][0][row][k]);
  }
  __device__ __forceinline__ T* b(int stage, int row, int k) {
    return reinterpret_cast<T*>(&ab[stage][1][row][k]);
  }
};

struct FmaSmem {
  float st[kTM][kLdS];
  float a[kBK][kTM + 1];
  float b[kBK][kTN + 1];
  bool va[kTM];
  bool vb[kTN];
};

template <typename T>
using TileSmem = std::conditional_t<std::is_same_v<T, float>, FmaSmem, MmaSmem<T>>;

// Eight consecutive features of one row into shared memory, zeros past d or for invalid rows
// (row == nullptr); the path for feature sizes that are not a multiple of 8.
template <typename T>
__device__ __forceinline__ void load8(T* dst, const T* row, int64_t k, int64_t d) {
#pragma unroll
  for (int e = 0; e < 8; ++e) dst[e] = (row != nullptr && k + e < d) ? row[k + e] : Cvt<T>::zero();
}

// Asynchronous 16-byte global-to-shared copy; zero-fills (reading nothing) when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

constexpr int kChunksPerRow = kBKMma / 8;

// Features [k0, k0 + 64) of the tile's A and B rows into `stage`: cp.async when 16-byte
// vectors are allowed (d % 8 == 0, so a chunk is all in or all out of range), else plain
// loads. Invalid rows and features past d are zeros.
template <typename T>
__device__ __forceinline__ void mma_load_stage(const BlockSide<T>& A, const BlockSide<T>& B,
                                               int row0, int col0, int64_t d, int64_t k0,
                                               bool vec, MmaSmem<T>& sm, int stage) {
  for (int c = threadIdx.x; c < kTM * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow;
    const int kc = (c % kChunksPerRow) * 8;
    const int64_t k = k0 + kc;
    if (vec) {
      const bool in_a = sm.va[row] && k < d, in_b = sm.vb[row] && k < d;
      cp_async16(sm.a(stage, row, kc), in_a ? A.base + (row0 + row) * d + k : A.base, in_a);
      cp_async16(sm.b(stage, row, kc), in_b ? B.base + (col0 + row) * d + k : B.base, in_b);
    } else {
      load8(sm.a(stage, row, kc), sm.va[row] ? A.base + (row0 + row) * d : nullptr, k, d);
      load8(sm.b(stage, row, kc), sm.vb[row] ? B.base + (col0 + row) * d : nullptr, k, d);
    }
  }
  cp_async_commit();
}

template <typename T>
__device__ void tile_mma(const BlockSide<T>& A, const BlockSide<T>& B, int row0, int col0,
                         int64_t d, bool vec, MmaSmem<T>& sm) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  const int wy = warp / 2, wx = warp % 2;  // this warp's 32 x 32 quarter of the tile
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  mma_load_stage(A, B, row0, col0, d, 0, vec, sm, 0);
  int stage = 0;
  for (int64_t k0 = 0; k0 < d; k0 += kBKMma, stage ^= 1) {
    if (k0 + kBKMma < d) {  // prefetch the next slice into the other stage
      mma_load_stage(A, B, row0, col0, d, k0 + kBKMma, vec, sm, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBKMma; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], sm.a(stage, wy * 32 + i * 16, kk), kBKMma + 8);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], sm.b(stage, wx * 32 + j * 16, kk), kBKMma + 8);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // the stage may be refilled (or st written) only after every warp used it
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sm.st[wy * 32 + i * 16][wx * 32 + j * 16], acc[i][j], kLdS,
                              wmma::mem_row_major);
}

__device__ inline void tile_fma(const BlockSide<float>& A, const BlockSide<float>& B, int row0,
                                int col0, int64_t d, FmaSmem& sm) {
  const int tid = threadIdx.x;
  const int ty = tid / 16, tx = tid % 16;  // rows ty + 8 i, columns tx + 16 j
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (int64_t k0 = 0; k0 < d; k0 += kBK) {
    for (int e = tid; e < kTM * kBK; e += kThreads) {
      const int row = e / kBK, k = e % kBK;
      const bool in_d = k0 + k < d;
      sm.a[k][row] = (sm.va[row] && in_d) ? A.base[static_cast<int64_t>(row0 + row) * d + k0 + k] : 0.0f;
      sm.b[k][row] = (sm.vb[row] && in_d) ? B.base[static_cast<int64_t>(col0 + row) * d + k0 + k] : 0.0f;
    }
    __syncthreads();
    // Two-level sum (each slice from zero, then added): the rounding error grows with
    // sqrt(32) + sqrt(d / 32) instead of sqrt(d), closer to what a blocked GEMM gives.
    float part[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) part[i][j] = 0.0f;
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
      float av[8], bv[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) av[i] = sm.a[k][ty + 8 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = sm.b[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[i][j] = fmaf(av[i], bv[j], part[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += part[i][j];
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) sm.st[ty + 8 * i][tx + 16 * j] = acc[i][j];
}

// S tile rows [row0, row0 + 64) of A x columns [col0, col0 + 64) of B into sm.st, with
// sm.va / sm.vb telling which rows / columns are valid tokens. Returns false (and computes
// nothing) when the tile has no valid row or no valid column. All threads must call it; the
// caller must be done reading sm.st / sm.va / sm.vb of the previous tile.
template <typename T>
__device__ bool compute_tile(const BlockSide<T>& A, const BlockSide<T>& B, int row0, int col0,
                             int64_t d, bool vec, TileSmem<T>& sm) {
  const int tid = threadIdx.x;
  bool mine = false;
  if (tid < kTM) {
    mine = A.valid(row0 + tid);
    sm.va[tid] = mine;
  }
  const int any_a = __syncthreads_or(mine);
  mine = false;
  if (tid < kTN) {
    mine = B.valid(col0 + tid);
    sm.vb[tid] = mine;
  }
  const int any_b = __syncthreads_or(mine);
  if (!any_a || !any_b) return false;
  if constexpr (std::is_same_v<T, float>) {
    tile_fma(A, B, row0, col0, d, sm);
  } else {
    tile_mma<T>(A, B, row0, col0, d, vec, sm);
  }
  __syncthreads();
  return true;
}

// ---- host-side planning helpers (shared by both operators) ----

// Items per block so that items * tokens rows fill 64-row tiles best (ties: more items), with
// at most max(tokens, cap) rows and at most `count` items.
inline int pick_block(int64_t tokens, int64_t count, int64_t cap) {
  const int64_t most = std::min<int64_t>({std::max<int64_t>(1, cap / tokens), count,
                                          int64_t(kMaxBlockItems)});
  int best = 1;
  double best_eff = 0.0;
  for (int64_t b = 1; b <= most; ++b) {
    const int64_t rows = b * tokens;
    const double eff = static_cast<double>(rows) / (((rows + kTM - 1) / kTM) * kTM);
    if (eff >= best_eff - 1e-9) {
      best = static_cast<int>(b);
      best_eff = eff;
    }
  }
  return best;
}

inline void finish_plan(const Problem& p, int64_t bytes_per_elem, Plan* pl) {
  pl->n_ib = (p.bi + pl->ib - 1) / pl->ib;
  pl->n_jb = (p.bt + pl->jb - 1) / pl->jb;
  pl->items = pl->n_ib * pl->n_jb;
  // A group's image blocks (about 8 MB of tokens) stay in L2 while caption blocks stream.
  const int64_t block_bytes = std::max<int64_t>(1, pl->ib * p.m * p.d * bytes_per_elem);
  pl->group = std::clamp<int64_t>((int64_t(8) << 20) / block_bytes, 1, pl->n_ib);
}

inline int64_t dtype_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

struct DeviceLimits {
  int sms = 1;
  int64_t smem_optin = 48 << 10;
};

inline Status device_limits(DeviceLimits* out) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  int sms = 0, optin = 0;
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return Status{e, "device attributes", nullptr};
  out->sms = sms;
  out->smem_optin = optin;
  return Status{};
}

// Status of the kernel launch just issued: its launch error, if any, tagged with `where`.
inline Status launch_status(const char* where) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return Status{e, where, nullptr};
  return Status{};
}

// Calls f(std::type_identity<T>{}) with T the element type of `dtype` (float, __half or
// __nv_bfloat16); `op` names the caller in the "unsupported dtype" status.
template <typename F>
Status dispatch_dtype(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(std::type_identity<float>{});
    case DType::kFloat16:
      return f(std::type_identity<__half>{});
    case DType::kBFloat16:
      return f(std::type_identity<__nv_bfloat16>{});
  }
  return Status{cudaSuccess, op, "unsupported dtype"};
}

}  // namespace hatkernels::cuda
