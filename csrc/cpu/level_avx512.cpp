// The kernels for x86-64 with AVX-512 F/BW/DQ/VL (isa.h); empty on other architectures.
#include "cpu/isa.h"
#if HATK_CPU_X86
#define HATK_CPU_LEVEL avx512
#define HATK_CPU_AVX2 1
#define HATK_CPU_AVX512 1
#define HATK_CPU_TARGET "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl"
#include "cpu/level.h"
#endif
