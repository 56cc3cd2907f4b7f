// Placeholder until the fused kernel lands: keeps the extension linking.
#include "cpu/scan_align.h"

#include <stdexcept>

namespace hatkernels::cpu {

void scan_align_forward(const Problem&, float, float*) {
  throw std::runtime_error("scan_align_forward: CPU kernel not implemented yet");
}

void scan_align_backward(const Problem&, float, const float*, float*, float*) {
  throw std::runtime_error("scan_align_backward: CPU kernel not implemented yet");
}

}  // namespace hatkernels::cpu
