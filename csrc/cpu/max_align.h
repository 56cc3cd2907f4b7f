// Fused max pooling on CPU (max over the other side's tokens, then sum or mean): the public
// launchers, which run the instruction-set level chosen at run time (isa.h): raw pointers
// and sizes, no torch.
#pragma once
#include "cpu/common.h"

namespace hatkernels::cpu {

// How many int32 entries the winners of p take (layout: max_align_kernel.h): one per query
// token and pair, valid tokens only, and a last one saying whether any is tied. Lengths
// outside [1, max] count as clamped (the launchers reject them). Baseline code (isa.cpp),
// also called by the kernels.
int64_t max_align_winners_size(const Problem& p);

// out [bi, bt] float32. With winners (max_align_winners_size(p) entries), also every query
// token's winner, for a backward without similarities.
void max_align_forward(const Problem& p, float* out, int32_t* winners = nullptr);

// Bounds of the scores [bi, bt] (lower, upper; double) that max_align_forward computes for p,
// from int8 codes alone (no float32 dot product): for hier_topk's pruning. t2i and i2t only,
// where the forward can screen (the avx512 level on a CPU with AVX-512 VNNI, screening not
// turned off); returns false, writing nothing, otherwise.
bool max_align_bounds(const Problem& p, double* lower, double* upper);

// grad_out [bi, bt]; grad_images [bi, m_max, d] and grad_texts [bt, n_max, d] are written in
// full (zero on padding). winners: what max_align_forward wrote for the same inputs, or null
// (the similarities are then recomputed).
void max_align_backward(const Problem& p, const float* grad_out, float* grad_images,
                        float* grad_texts, const int32_t* winners = nullptr);

}  // namespace hatkernels::cpu
