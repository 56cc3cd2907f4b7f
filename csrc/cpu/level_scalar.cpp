// The kernels for the compiler's baseline (any CPU this extension is built for; isa.h).
#define HATK_CPU_LEVEL scalar
#define HATK_CPU_AVX2 0
#define HATK_CPU_AVX512 0
#include "cpu/level.h"
