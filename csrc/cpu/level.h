// The body of one instruction-set level's translation unit (isa.h): level_<name>.cpp
// defines HATK_CPU_LEVEL (the level's namespace), HATK_CPU_AVX2 and HATK_CPU_AVX512 (0 or 1:
// what the kernel code may use) and, above the baseline, HATK_CPU_TARGET (the compiler's
// target options for the level), then includes this file once.
//
// The standard and intrinsics headers come first, outside the target region: the library
// code that the kernels instantiate (vectors, algorithms) is then compiled for the baseline,
// so the copy of an inline library function that the linker keeps never holds AVX
// instructions. Everything the kernel headers define lives in the level's namespace, so the
// three levels never share a symbol.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if HATK_CPU_AVX2 || HATK_CPU_AVX512
#include <immintrin.h>
#endif

#include "cpu/common.h"
#include "cpu/isa.h"

#define HATK_PRAGMA(text) _Pragma(#text)
#if defined(HATK_CPU_TARGET) && defined(__clang__)
#define HATK_TARGET_BEGIN(t) \
  HATK_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define HATK_TARGET_END HATK_PRAGMA(clang attribute pop)
#elif defined(HATK_CPU_TARGET)
#define HATK_TARGET_BEGIN(t) HATK_PRAGMA(GCC push_options) HATK_PRAGMA(GCC target(t))
#define HATK_TARGET_END HATK_PRAGMA(GCC pop_options)
#else
#define HATK_TARGET_BEGIN(t)
#define HATK_TARGET_END
#endif

HATK_TARGET_BEGIN(HATK_CPU_TARGET)

#include "cpu/max_align_kernel.h"
#include "cpu/scan_align_kernel.h"

namespace hatkernels::cpu::HATK_CPU_LEVEL {
#if HATK_CPU_AVX512
const Kernels kKernels{max_kernel::max_align_forward, max_kernel::max_align_backward,
                       scan_kernel::scan_align_forward, scan_kernel::scan_align_backward,
                       max_kernel::max_align_bounds};
#else
const Kernels kKernels{max_kernel::max_align_forward, max_kernel::max_align_backward,
                       scan_kernel::scan_align_forward, scan_kernel::scan_align_backward,
                       nullptr};
#endif
}  // namespace hatkernels::cpu::HATK_CPU_LEVEL

HATK_TARGET_END
