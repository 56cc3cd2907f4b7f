// Fused max pooling on CPU (max over the other side's tokens, then sum or mean): the public
// launchers, which run the instruction-set level chosen at run time (isa.h): raw pointers
// and sizes, no torch.
#pragma once
#include "cpu/common.h"

namespace hatkernels::cpu {

// out [bi, bt] float32.
void max_align_forward(const Problem& p, float* out);

// grad_out [bi, bt]; grad_images [bi, m_max, d] and grad_texts [bt, n_max, d] are written in
// full (zero on padding).
void max_align_backward(const Problem& p, const float* grad_out, float* grad_images,
                        float* grad_texts);

}  // namespace hatkernels::cpu
