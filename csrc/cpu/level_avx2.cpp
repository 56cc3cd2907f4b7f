// The kernels for x86-64 with AVX2 and FMA (isa.h); empty on other architectures.
#include "cpu/isa.h"
#if HATK_CPU_X86
#define HATK_CPU_LEVEL avx2
#define HATK_CPU_AVX2 1
#define HATK_CPU_AVX512 0
#define HATK_CPU_TARGET "avx2,fma"
#include "cpu/level.h"
#endif
