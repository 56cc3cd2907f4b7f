// Placeholder until the fused kernel lands: keeps the extension linking.
#include "cpu/max_align.h"

#include <stdexcept>

namespace hatkernels::cpu {

void max_align_forward(const Problem&, float*) {
  throw std::runtime_error("max_align_forward: CPU kernel not implemented yet");
}

void max_align_backward(const Problem&, const float*, float*, float*) {
  throw std::runtime_error("max_align_backward: CPU kernel not implemented yet");
}

}  // namespace hatkernels::cpu
