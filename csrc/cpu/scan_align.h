// Fused HAT scan pooling on CPU (SCAN-style cross-attention, cosine, sum or mean): the public
// launchers, which run the instruction-set level chosen at run time (isa.h): raw pointers
// and sizes, no torch.
#pragma once
#include "cpu/common.h"

namespace hatkernels::cpu {

// out [bi, bt] float32. Both launchers run OpenMP over tiles (MKL single-threaded inside) and
// throw std::invalid_argument for a length outside [1, m_max] / [1, n_max] or a bad direction.
void scan_align_forward(const Problem& p, float lambda_softmax, float* out);

// grad_out [bi, bt]; grad_images [bi, m_max, d] and grad_texts [bt, n_max, d] are written in
// full (zero on padding).
void scan_align_backward(const Problem& p, float lambda_softmax, const float* grad_out,
                         float* grad_images, float* grad_texts);

}  // namespace hatkernels::cpu
