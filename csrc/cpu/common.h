// Shared, torch-free description of one alignment problem (one level, one pooling) on CPU.
#pragma once
#include <cstdint>

namespace hatkernels::cpu {

enum Direction : int { kT2I = 0, kI2T = 1, kBoth = 2 };

// images [bi, m_max, d] and texts [bt, n_max, d], row-major contiguous float32; only the first
// image_lengths[i] / text_lengths[j] tokens are read (padding may hold NaN).
struct Problem {
  const float* images;
  const float* texts;
  const int64_t* image_lengths;
  const int64_t* text_lengths;
  int64_t bi, m_max, bt, n_max, d;
  int direction;
  bool mean;
  // Max pooling forward: screen with int8 codes where the level supports it (the launchers
  // set it, max_align_screen.h).
  bool screen = false;
  // ... and compute its int8 GEMM on AMX tiles (max_align_amx.h).
  bool amx = false;
};

}  // namespace hatkernels::cpu
