// Instruction-set levels of the CPU kernels.
//
// The kernels (max_align_kernel.h, scan_align_kernel.h and the headers they include) are
// compiled once per level: level_scalar.cpp (the compiler's baseline, e.g. plain x86-64 with
// SSE2, or any other architecture), level_avx2.cpp (AVX2 + FMA) and level_avx512.cpp
// (AVX-512 F/BW/DQ/VL). Each level TU includes level.h, which puts the kernels in their own
// namespace hatkernels::cpu::<level> under that level's target options, so the same source
// becomes three sets of functions with distinct names. The public launchers (max_align.h,
// scan_align.h, defined in isa.cpp) run the best level this CPU supports, or the one that
// the environment variable HATKERNELS_CPU_ISA names ("scalar", "avx2", "avx512"; empty or
// "auto": the best). The extension is therefore safe to load on any x86-64 CPU: nothing
// outside the avx2 / avx512 namespaces uses instructions beyond the baseline.
#pragma once
#include <string>
#include <vector>

#include "cpu/common.h"

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#define HATK_CPU_X86 1
#else
#define HATK_CPU_X86 0
#endif

namespace hatkernels::cpu {

// Ascending: a level runs only where every level below it runs too.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The launchers of one level (signatures as in max_align.h and scan_align.h).
struct Kernels {
  void (*max_forward)(const Problem&, float*, int32_t*);
  void (*max_backward)(const Problem&, const float*, float*, float*, const int32_t*);
  void (*scan_forward)(const Problem&, float, float*);
  void (*scan_backward)(const Problem&, float, const float*, float*, float*);
  // Null below the avx512 level (max_align_bounds needs the screening's int8 GEMM).
  void (*max_bounds)(const Problem&, double*, double*);
};

namespace scalar {
extern const Kernels kKernels;
}
#if HATK_CPU_X86
namespace avx2 {
extern const Kernels kKernels;
}
namespace avx512 {
extern const Kernels kKernels;
}
#endif

// "scalar", "avx2" or "avx512".
const char* isa_name(Isa isa);

// The levels this CPU (and its operating system) can run, lowest first.
std::vector<Isa> supported_isas();

// The level the launchers use now: HATKERNELS_CPU_ISA if set (read on every call), else the
// best supported one. Throws std::invalid_argument, its message starting with
// "HATKERNELS_CPU_ISA", for an unknown level or one this CPU cannot run.
Isa active_isa();

// One line for reports: whether the max forward screens with int8 codes (max_align_screen.h),
// on which GEMM, and why not: at the avx512 level on a CPU with AVX-512 VNNI, unless
// HATKERNELS_CPU_SCREEN is "0" ("1", unset or empty: yes, its int8 GEMM on AMX where usable;
// "vnni": yes, on VNNI; read on every call). Throws std::invalid_argument, its message starting
// with "HATKERNELS_CPU_SCREEN", for another value.
std::string screening_status();

}  // namespace hatkernels::cpu
