// Run-time choice of the kernels' instruction-set level (isa.h) and the public launchers,
// which run the chosen level. Compiled for the baseline only.
#include "cpu/isa.h"

#include <algorithm>
#include <cstdlib>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if HATK_CPU_X86
#include <cpuid.h>
#endif
#include <stdexcept>
#include <string>

#include "cpu/max_align.h"
#include "cpu/scan_align.h"

namespace hatkernels::cpu {

namespace {

constexpr const char* kEnv = "HATKERNELS_CPU_ISA";
constexpr const char* kScreenEnv = "HATKERNELS_CPU_SCREEN";
constexpr Isa kLevels[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512};

bool cpu_runs(Isa isa) {
  if (isa == Isa::kScalar) return true;
#if HATK_CPU_X86
  // libgcc's checks include the operating system's support (XCR0) for the wider registers.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == Isa::kAvx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_vnni() {
#if HATK_CPU_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// HATKERNELS_CPU_SCREEN: "0" (off), "1", unset or empty (on, AMX where usable) or "vnni"
// (on, the int8 GEMM on AVX-512 VNNI even where AMX is usable).
enum class ScreenWanted { kOff, kBest, kVnni };

ScreenWanted screen_wanted() {
  const char* env = std::getenv(kScreenEnv);
  const std::string wanted = env ? env : "";
  if (wanted.empty() || wanted == "1") return ScreenWanted::kBest;
  if (wanted == "0") return ScreenWanted::kOff;
  if (wanted == "vnni") return ScreenWanted::kVnni;
  throw std::invalid_argument(std::string(kScreenEnv) + ": expected 0, 1 or vnni, got '" +
                              wanted + "'");
}

// AMX-INT8 tiles: the CPU has them (CPUID leaf 7: AMX-TILE and AMX-INT8) and Linux lets this
// process use their state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, asked once).
bool amx_usable() {
#if HATK_CPU_X86 && defined(__linux__)
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = edx & (1u << 24), int8 = edx & (1u << 25);
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return tile && int8 && syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

std::string names(const std::vector<Isa>& levels) {
  std::string out;
  for (Isa isa : levels) out += (out.empty() ? "" : ", ") + std::string(isa_name(isa));
  return out;
}

const Kernels& kernels() {
  switch (active_isa()) {
#if HATK_CPU_X86
    case Isa::kAvx512:
      return avx512::kKernels;
    case Isa::kAvx2:
      return avx2::kKernels;
#endif
    default:
      return scalar::kKernels;
  }
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : kLevels)
    if (cpu_runs(isa)) out.push_back(isa);
  return out;
}

Isa active_isa() {
  const std::vector<Isa> supported = supported_isas();
  const char* env = std::getenv(kEnv);
  const std::string wanted = env ? env : "";
  if (wanted.empty() || wanted == "auto") return supported.back();
  for (Isa isa : kLevels) {
    if (wanted != isa_name(isa)) continue;
    if (!cpu_runs(isa)) {
      throw std::invalid_argument(std::string(kEnv) + ": '" + wanted +
                                  "' is not supported by this CPU (it runs: " +
                                  names(supported) + ")");
    }
    return isa;
  }
  throw std::invalid_argument(std::string(kEnv) + ": expected one of auto, " +
                              names({kLevels, kLevels + 3}) + ", got '" + wanted + "'");
}

// How the max forward screens (max_align_screen.h): at the avx512 level on a CPU with AVX-512
// VNNI unless HATKERNELS_CPU_SCREEN says 0, its int8 GEMM on AMX where usable unless it says
// vnni. The variable is read once per call.
enum class ScreenPath { kOff, kVnni, kAmx };

ScreenPath screen_path(ScreenWanted wanted) {
  if (wanted == ScreenWanted::kOff || active_isa() != Isa::kAvx512 || !cpu_has_vnni())
    return ScreenPath::kOff;
  return wanted == ScreenWanted::kBest && amx_usable() ? ScreenPath::kAmx : ScreenPath::kVnni;
}

std::string screening_status() {
  const ScreenWanted wanted = screen_wanted();
  if (wanted == ScreenWanted::kOff) return std::string("off (") + kScreenEnv + "=0)";
  if (active_isa() != Isa::kAvx512) return "off (needs the avx512 level)";
  if (!cpu_has_vnni()) return "off (this CPU has no AVX-512 VNNI)";
  std::string gemm = "AVX-512 VNNI (no usable AMX)";
  if (amx_usable())
    gemm = wanted == ScreenWanted::kBest ? "AMX"
                                         : "AVX-512 VNNI (" + std::string(kScreenEnv) + "=vnni)";
  return "on (max pooling forward: int8 screening on " + gemm +
         ", float32 for the candidates)";
}

int64_t max_align_winners_size(const Problem& p) {
  int64_t rows = 0, words = 0;
  for (int64_t i = 0; i < p.bi; ++i) rows += std::clamp<int64_t>(p.image_lengths[i], 0, p.m_max);
  for (int64_t j = 0; j < p.bt; ++j) words += std::clamp<int64_t>(p.text_lengths[j], 0, p.n_max);
  if (p.direction == kT2I) return p.bi * words + 1;
  if (p.direction == kI2T) return p.bt * rows + 1;
  return p.bi * words + rows * p.bt + 1;
}

void max_align_forward(const Problem& p, float* out, int32_t* winners) {
  const ScreenPath path = screen_path(screen_wanted());
  Problem screened = p;
  screened.screen = path != ScreenPath::kOff;
  screened.amx = path == ScreenPath::kAmx;
  kernels().max_forward(screened, out, winners);
}

bool max_align_bounds(const Problem& p, double* lower, double* upper) {
  const ScreenPath path = screen_path(screen_wanted());
  const Kernels& k = kernels();
  if (path == ScreenPath::kOff || !k.max_bounds || p.direction == kBoth) return false;
  Problem screened = p;
  screened.screen = true;
  screened.amx = path == ScreenPath::kAmx;
  k.max_bounds(screened, lower, upper);
  return true;
}

void max_align_backward(const Problem& p, const float* grad_out, float* grad_images,
                        float* grad_texts, const int32_t* winners) {
  kernels().max_backward(p, grad_out, grad_images, grad_texts, winners);
}

void scan_align_forward(const Problem& p, float lambda_softmax, float* out) {
  kernels().scan_forward(p, lambda_softmax, out);
}

void scan_align_backward(const Problem& p, float lambda_softmax, const float* grad_out,
                         float* grad_images, float* grad_texts) {
  kernels().scan_backward(p, lambda_softmax, grad_out, grad_images, grad_texts);
}

}  // namespace hatkernels::cpu
