// Host-side interface of the CUDA kernels: plain structs, raw pointers, sizes and a stream.
// No torch, no device code: csrc/bindings/cuda.cpp (the only torch-facing file) includes it.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace hatkernels::cuda {

enum Direction : int { kT2I = 0, kI2T = 1, kBoth = 2 };
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One level of one call. images [bi, m, d] and texts [bt, n, d] are contiguous, of `dtype`;
// only the first image_lengths[i] / text_lengths[j] tokens are read (padding may hold NaN).
// out / grad are [bi, *] float32 with row stride ld_out (the caller may pass a chunk of
// images: pointers offset to its first image, bi its size, ld_out the full caption count).
struct Problem {
  const void* images;
  const void* texts;
  const int64_t* image_lengths;  // device, [bi]
  const int64_t* text_lengths;   // device, [bt]
  int64_t bi, m, bt, n, d;
  int64_t ld_out;
  int direction;
  bool mean;
  bool vec;  // 16-byte vector loads are allowed (d % 8 == 0 and aligned pointers)
  // max pooling only: the captions' valid words packed back to back ([sum n, d], same dtype)
  // and text_offsets [bt + 1] (device, int64) where caption j's words start; the kernels
  // then never multiply padding words.
  const void* texts_packed = nullptr;
  const int64_t* text_offsets = nullptr;
};

// How a call is cut: blocks of `ib` whole images x `jb` whole captions, visited in groups of
// `group` image blocks (for L2 reuse of the caption blocks); `grid` CTAs (persistent kernels
// loop over `items`); `dyn_smem` bytes of dynamic shared memory; scan kernels work in
// `scratch_floats` floats per CTA, in shared memory or, when `global_scratch`, in a buffer of
// grid * scratch_floats floats the caller allocates.
struct Plan {
  int ib = 1, jb = 1;
  int64_t n_ib = 0, n_jb = 0, items = 0;
  int64_t group = 1;
  int64_t grid = 0;
  int64_t dyn_smem = 0;
  int64_t scratch_floats = 0;
  bool global_scratch = false;
};

// A launch result: `error` from the CUDA runtime with the kernel (or step) it came from, or
// a `message` for a call the kernels cannot serve (sizes out of range).
struct Status {
  cudaError_t error = cudaSuccess;
  const char* where = "";
  const char* message = nullptr;
};

// Extra inputs of scan pooling. Gram matrices of the side that is attended over, float32,
// zero on padding: gram_img [bi, m, m] (t2i), gram_txt [bt, n, n] (i2t); token norms of the
// side that queries: img_norm [bi, m] (i2t), txt_norm [bt, n] (t2i). The backward adds into
// the d_* buffers (same shapes, zero-initialised by the caller): the caller then applies
// d_gram (grad += 2 d_gram x) and d_norm (grad += d_norm x / |x|).
struct ScanAux {
  const float* gram_img = nullptr;
  const float* gram_txt = nullptr;
  const float* img_norm = nullptr;
  const float* txt_norm = nullptr;
  float* d_gram_img = nullptr;
  float* d_gram_txt = nullptr;
  float* d_img_norm = nullptr;
  float* d_txt_norm = nullptr;
  float* scratch = nullptr;  // grid * scratch_floats floats when plan.global_scratch
  float lambda_softmax = 9.0f;
};

Status max_align_plan(const Problem& p, DType dtype, bool backward, Plan* plan);
// out [bi, ld_out] float32 (columns [0, bt) written).
Status max_align_forward(const Problem& p, DType dtype, const Plan& plan, float* out,
                         cudaStream_t stream);
// grad [bi, ld_out]; grad_images [bi, m, d], grad_texts [bt, n, d] float32, zero-initialised
// by the caller; the kernel adds into them (atomics), so padding stays exactly zero.
Status max_align_backward(const Problem& p, DType dtype, const Plan& plan, const float* grad,
                          float* grad_images, float* grad_texts, cudaStream_t stream);

Status scan_align_plan(const Problem& p, DType dtype, bool backward, Plan* plan);
Status scan_align_forward(const Problem& p, DType dtype, const Plan& plan, const ScanAux& aux,
                          float* out, cudaStream_t stream);
Status scan_align_backward(const Problem& p, DType dtype, const Plan& plan, const ScanAux& aux,
                           const float* grad, float* grad_images, float* grad_texts,
                           cudaStream_t stream);

}  // namespace hatkernels::cuda
