// The only CPU source that includes torch: checks tensors, converts them to contiguous
// float32, calls the plain launchers of csrc/cpu, and exposes them to Python.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu/isa.h"
#include "cpu/max_align.h"
#include "cpu/scan_align.h"

namespace {

using hatkernels::cpu::Problem;

struct Prepared {
  torch::Tensor images, texts, image_lengths, text_lengths;
  Problem problem;
};

Prepared prepare(const torch::Tensor& images, const torch::Tensor& texts,
                 const torch::Tensor& image_lengths, const torch::Tensor& text_lengths,
                 int64_t direction, bool mean) {
  TORCH_CHECK(images.device().is_cpu() && texts.device().is_cpu(), "hatkernels cpu: CPU tensors expected");
  TORCH_CHECK(images.dim() == 3 && texts.dim() == 3, "hatkernels cpu: images/texts must be 3-D");
  TORCH_CHECK(images.size(2) == texts.size(2), "hatkernels cpu: feature sizes differ");
  TORCH_CHECK(image_lengths.numel() == images.size(0) && text_lengths.numel() == texts.size(0),
              "hatkernels cpu: lengths do not match the batch sizes");
  TORCH_CHECK(direction >= 0 && direction <= 2, "hatkernels cpu: bad direction code");
  Prepared p;
  p.images = images.to(torch::kFloat32).contiguous();
  p.texts = texts.to(torch::kFloat32).contiguous();
  p.image_lengths = image_lengths.to(torch::kInt64).contiguous();
  p.text_lengths = text_lengths.to(torch::kInt64).contiguous();
  p.problem = Problem{p.images.data_ptr<float>(),
                      p.texts.data_ptr<float>(),
                      p.image_lengths.data_ptr<int64_t>(),
                      p.text_lengths.data_ptr<int64_t>(),
                      p.images.size(0),
                      p.images.size(1),
                      p.texts.size(0),
                      p.texts.size(1),
                      p.images.size(2),
                      static_cast<int>(direction),
                      mean};
  return p;
}

torch::Tensor max_align_forward(const torch::Tensor& images, const torch::Tensor& texts,
                                const torch::Tensor& image_lengths,
                                const torch::Tensor& text_lengths, int64_t direction, bool mean) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  auto out = torch::empty({images.size(0), texts.size(0)}, images.options().dtype(torch::kFloat32));
  hatkernels::cpu::max_align_forward(p.problem, out.data_ptr<float>());
  return out;
}

// Scores and the winners (int32, max_align_kernel.h) when they take at most max_bytes, else
// an empty int32 tensor (and the plain forward).
std::tuple<torch::Tensor, torch::Tensor> max_align_forward_winners(
    const torch::Tensor& images, const torch::Tensor& texts, const torch::Tensor& image_lengths,
    const torch::Tensor& text_lengths, int64_t direction, bool mean, int64_t max_bytes) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  auto out = torch::empty({images.size(0), texts.size(0)}, images.options().dtype(torch::kFloat32));
  const int64_t size = hatkernels::cpu::max_align_winners_size(p.problem);
  const bool keep = size <= max_bytes / static_cast<int64_t>(sizeof(int32_t));
  auto winners = torch::empty({keep ? size : 0}, images.options().dtype(torch::kInt32));
  hatkernels::cpu::max_align_forward(p.problem, out.data_ptr<float>(),
                                     keep ? winners.data_ptr<int32_t>() : nullptr);
  return {out, winners};
}

// Bounds of max_align_forward's scores (lower, upper; float64 [bi, bt]), or two empty tensors
// where the CPU or the level cannot compute them (max_align.h).
std::tuple<torch::Tensor, torch::Tensor> max_align_bounds(
    const torch::Tensor& images, const torch::Tensor& texts, const torch::Tensor& image_lengths,
    const torch::Tensor& text_lengths, int64_t direction, bool mean) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  const auto options = images.options().dtype(torch::kFloat64);
  auto lower = torch::empty({images.size(0), texts.size(0)}, options);
  auto upper = torch::empty_like(lower);
  if (!hatkernels::cpu::max_align_bounds(p.problem, lower.data_ptr<double>(),
                                         upper.data_ptr<double>()))
    return {torch::empty({0}, options), torch::empty({0}, options)};
  return {lower, upper};
}

std::tuple<torch::Tensor, torch::Tensor> max_align_backward(
    const torch::Tensor& grad, const torch::Tensor& images, const torch::Tensor& texts,
    const torch::Tensor& image_lengths, const torch::Tensor& text_lengths, int64_t direction,
    bool mean, const std::optional<torch::Tensor>& winners) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  auto g = grad.to(torch::kFloat32).contiguous();
  auto gi = torch::empty_like(p.images);
  auto gt = torch::empty_like(p.texts);
  const int32_t* win = nullptr;
  if (winners) {
    TORCH_CHECK(winners->device().is_cpu() && winners->scalar_type() == torch::kInt32 &&
                    winners->is_contiguous() &&
                    winners->numel() == hatkernels::cpu::max_align_winners_size(p.problem),
                "hatkernels cpu: winners must be what max_align_forward_winners kept for "
                "these inputs (contiguous int32)");
    win = winners->data_ptr<int32_t>();
  }
  hatkernels::cpu::max_align_backward(p.problem, g.data_ptr<float>(), gi.data_ptr<float>(),
                                      gt.data_ptr<float>(), win);
  return {gi.to(images.scalar_type()), gt.to(texts.scalar_type())};
}

torch::Tensor scan_align_forward(const torch::Tensor& images, const torch::Tensor& texts,
                                 const torch::Tensor& image_lengths,
                                 const torch::Tensor& text_lengths, int64_t direction, bool mean,
                                 double lambda_softmax) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  auto out = torch::empty({images.size(0), texts.size(0)}, images.options().dtype(torch::kFloat32));
  hatkernels::cpu::scan_align_forward(p.problem, static_cast<float>(lambda_softmax),
                                      out.data_ptr<float>());
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> scan_align_backward(
    const torch::Tensor& grad, const torch::Tensor& images, const torch::Tensor& texts,
    const torch::Tensor& image_lengths, const torch::Tensor& text_lengths, int64_t direction,
    bool mean, double lambda_softmax) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  auto g = grad.to(torch::kFloat32).contiguous();
  auto gi = torch::empty_like(p.images);
  auto gt = torch::empty_like(p.texts);
  hatkernels::cpu::scan_align_backward(p.problem, static_cast<float>(lambda_softmax),
                                       g.data_ptr<float>(), gi.data_ptr<float>(),
                                       gt.data_ptr<float>());
  return {gi.to(images.scalar_type()), gt.to(texts.scalar_type())};
}

std::string cpu_isa() { return hatkernels::cpu::isa_name(hatkernels::cpu::active_isa()); }

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> out;
  for (auto isa : hatkernels::cpu::supported_isas()) out.emplace_back(hatkernels::cpu::isa_name(isa));
  return out;
}

std::string cpu_screen() { return hatkernels::cpu::screening_status(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hatkernels fused CPU kernels (max and scan alignment)";
  m.def("max_align_forward", &max_align_forward);
  m.def("max_align_forward_winners", &max_align_forward_winners,
        "max_align_forward that also returns every query token's winner (int32) when they "
        "take at most max_bytes, else an empty int32 tensor.");
  m.def("max_align_backward", &max_align_backward, py::arg("grad"), py::arg("images"),
        py::arg("texts"), py::arg("image_lengths"), py::arg("text_lengths"),
        py::arg("direction"), py::arg("mean"), py::arg("winners") = py::none());
  m.def("max_align_bounds", &max_align_bounds,
        "Bounds (lower, upper; float64) of max_align_forward's scores from int8 codes alone, "
        "or two empty tensors where this CPU cannot screen.");
  m.def("scan_align_forward", &scan_align_forward);
  m.def("scan_align_backward", &scan_align_backward);
  m.def("cpu_isa", &cpu_isa,
        "The instruction-set level the kernels run at: HATKERNELS_CPU_ISA if set, else the best "
        "this CPU supports (ValueError for a bad HATKERNELS_CPU_ISA).");
  m.def("cpu_screen", &cpu_screen,
        "Whether the max pooling forward screens with int8 codes before float32, and why not "
        "(HATKERNELS_CPU_SCREEN=1 turns it on; ValueError for a bad value).");
  m.def("supported_cpu_isas", &supported_cpu_isas,
        "The instruction-set levels this CPU can run, lowest first.");
}
