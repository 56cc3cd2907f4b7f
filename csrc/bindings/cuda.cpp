// The only CUDA-side source that includes torch: checks tensors, prepares the scan pooling's
// Gram matrices and token norms (torch ops, chunked), calls the plain launchers of csrc/cuda
// on the current stream, turns their status into Python exceptions naming the kernel, and
// exposes them to Python. c10/cuda headers only (ATen/cuda/CUDAContext.h pulls cusparse.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>

#include "cuda/launchers.cuh"

namespace {

namespace hc = hatkernels::cuda;

void check(const hc::Status& st) {
  TORCH_CHECK_VALUE(st.message == nullptr, "hatkernels cuda (", st.where, "): ",
                    st.message ? st.message : "");
  TORCH_CHECK(st.error == cudaSuccess, "hatkernels cuda: ", st.where, " failed: ",
              cudaGetErrorString(st.error));
}

struct Prepared {
  torch::Tensor images, texts, image_lengths, text_lengths;
  hc::Problem problem;
  hc::DType dtype;
};

hc::DType dtype_of(const torch::Tensor& x) {
  switch (x.scalar_type()) {
    case torch::kFloat32:
      return hc::DType::kFloat32;
    case torch::kFloat16:
      return hc::DType::kFloat16;
    case torch::kBFloat16:
      return hc::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "images: dtype float32, float16 or bfloat16 expected, got ",
                       x.scalar_type());
  }
  return hc::DType::kFloat32;
}

bool aligned16(const torch::Tensor& x) {
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
}

Prepared prepare(const torch::Tensor& images, const torch::Tensor& texts,
                 const torch::Tensor& image_lengths, const torch::Tensor& text_lengths,
                 int64_t direction, bool mean) {
  TORCH_CHECK_VALUE(images.is_cuda() && texts.is_cuda(),
                    "images/texts: CUDA tensors expected, got ", images.device(), " and ",
                    texts.device());
  TORCH_CHECK_VALUE(images.device() == texts.device(), "texts: expected on ", images.device(),
                    ", got ", texts.device());
  TORCH_CHECK_VALUE(images.dim() == 3 && texts.dim() == 3,
                    "images/texts: 3-D tensors [B, tokens, D] expected, got ", images.dim(),
                    "-D and ", texts.dim(), "-D");
  TORCH_CHECK_TYPE(images.scalar_type() == texts.scalar_type(),
                   "texts: same dtype as images expected, got ", texts.scalar_type(), " and ",
                   images.scalar_type());
  TORCH_CHECK_VALUE(images.size(2) == texts.size(2), "texts: feature size ", texts.size(2),
                    " differs from the images' ", images.size(2));
  TORCH_CHECK_VALUE(images.size(1) >= 1 && texts.size(1) >= 1 && images.size(2) >= 1,
                    "images/texts: token and feature dimensions must be >= 1");
  TORCH_CHECK_VALUE(images.size(1) <= (1 << 20) && texts.size(1) <= (1 << 20),
                    "images/texts: at most 2^20 tokens per item");
  TORCH_CHECK_VALUE(image_lengths.dim() == 1 && image_lengths.numel() == images.size(0),
                    "image_lengths: shape [", images.size(0), "] expected, got ",
                    image_lengths.sizes());
  TORCH_CHECK_VALUE(text_lengths.dim() == 1 && text_lengths.numel() == texts.size(0),
                    "text_lengths: shape [", texts.size(0), "] expected, got ",
                    text_lengths.sizes());
  TORCH_CHECK_VALUE(direction >= 0 && direction <= 2,
                    "direction: code 0 (t2i), 1 (i2t) or 2 (both) expected, got ", direction);
  Prepared p;
  p.dtype = dtype_of(images);
  p.images = images.contiguous();
  p.texts = texts.contiguous();
  p.image_lengths = image_lengths.to(images.device(), torch::kInt64).contiguous();
  p.text_lengths = text_lengths.to(images.device(), torch::kInt64).contiguous();
  const int64_t d = images.size(2);
  p.problem = hc::Problem{p.images.data_ptr(),
                          p.texts.data_ptr(),
                          p.image_lengths.data_ptr<int64_t>(),
                          p.text_lengths.data_ptr<int64_t>(),
                          images.size(0),
                          images.size(1),
                          texts.size(0),
                          texts.size(1),
                          d,
                          texts.size(0),
                          static_cast<int>(direction),
                          mean,
                          d % 8 == 0 && aligned16(p.images) && aligned16(p.texts)};
  return p;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

torch::Tensor float_zeros(const torch::Tensor& like, at::IntArrayRef sizes) {
  return torch::zeros(sizes, like.options().dtype(torch::kFloat32));
}

torch::Tensor grad_float(const torch::Tensor& grad, const Prepared& p) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == p.problem.bi && grad.size(1) == p.problem.bt,
                    "grad: shape [", p.problem.bi, ", ", p.problem.bt, "] expected, got ",
                    grad.sizes());
  return grad.to(p.images.device(), torch::kFloat32).contiguous();
}

// ---- scan pooling helpers: float32 copies with padding zeroed, in chunks of ~256 MB ----

torch::Tensor masked_float(const torch::Tensor& x, const torch::Tensor& lengths) {
  auto mask = torch::arange(x.size(1), lengths.options()).unsqueeze(0) < lengths.unsqueeze(1);
  return torch::where(mask.unsqueeze(-1), x.to(torch::kFloat32),
                      torch::zeros({}, x.options().dtype(torch::kFloat32)));
}

template <typename F>
void for_chunks(const torch::Tensor& x, F&& f) {
  const int64_t per_item = std::max<int64_t>(1, x.size(1) * std::max(x.size(1), x.size(2)) * 4);
  const int64_t step = std::max<int64_t>(1, (int64_t(1) << 28) / per_item);
  for (int64_t b0 = 0; b0 < x.size(0); b0 += step) f(b0, std::min(step, x.size(0) - b0));
}

torch::Tensor token_norms(const torch::Tensor& x, const torch::Tensor& lengths) {
  auto out = torch::empty({x.size(0), x.size(1)}, x.options().dtype(torch::kFloat32));
  for_chunks(x, [&](int64_t b0, int64_t n) {
    auto xm = masked_float(x.narrow(0, b0, n), lengths.narrow(0, b0, n));
    out.narrow(0, b0, n).copy_(at::linalg_vector_norm(xm, 2, {-1}));
  });
  return out;
}

torch::Tensor gram(const torch::Tensor& x, const torch::Tensor& lengths) {
  auto out = torch::empty({x.size(0), x.size(1), x.size(1)}, x.options().dtype(torch::kFloat32));
  for_chunks(x, [&](int64_t b0, int64_t n) {
    auto xm = masked_float(x.narrow(0, b0, n), lengths.narrow(0, b0, n));
    auto dst = out.narrow(0, b0, n);
    torch::bmm_out(dst, xm, xm.transpose(1, 2));
  });
  return out;
}

// grad += 2 d_gram x (the Gram matrix G = x x^T is symmetric, and so is its gradient's use).
void add_gram_grad(torch::Tensor grad, const torch::Tensor& x, const torch::Tensor& lengths,
                   const torch::Tensor& d_gram) {
  for_chunks(x, [&](int64_t b0, int64_t n) {
    auto xm = masked_float(x.narrow(0, b0, n), lengths.narrow(0, b0, n));
    grad.narrow(0, b0, n).baddbmm_(d_gram.narrow(0, b0, n), xm, 1.0, 2.0);
  });
}

// grad += d_norm x / |x| (zero where |x| = 0, as torch's norm backward).
void add_norm_grad(torch::Tensor grad, const torch::Tensor& x, const torch::Tensor& lengths,
                   const torch::Tensor& norms, const torch::Tensor& d_norms) {
  for_chunks(x, [&](int64_t b0, int64_t n) {
    auto xm = masked_float(x.narrow(0, b0, n), lengths.narrow(0, b0, n));
    auto nrm = norms.narrow(0, b0, n);
    auto scale = torch::where(nrm > 0, d_norms.narrow(0, b0, n) / nrm, torch::zeros_like(nrm));
    grad.narrow(0, b0, n).add_(xm * scale.unsqueeze(-1));
  });
}

// ---- max pooling ----

// The captions' valid words back to back ([sum n, D]) and where each caption starts
// ([Bt + 1], int64): the max kernels never multiply padding words.
struct PackedTexts {
  torch::Tensor words, offsets;
};

PackedTexts pack_texts(Prepared& p) {
  const int64_t bt = p.problem.bt, n = p.problem.n;
  auto lengths = p.text_lengths.clamp(0, n);
  auto mask = torch::arange(n, lengths.options()).unsqueeze(0) < lengths.unsqueeze(1);
  PackedTexts packed;
  packed.words = p.texts.reshape({bt * n, p.problem.d}).index({mask.reshape({-1})}).contiguous();
  packed.offsets = torch::zeros({bt + 1}, lengths.options());
  packed.offsets.narrow(0, 1, bt).copy_(lengths.cumsum(0));
  p.problem.texts_packed = packed.words.data_ptr();
  p.problem.text_offsets = packed.offsets.data_ptr<int64_t>();
  p.problem.vec = p.problem.vec && aligned16(packed.words);
  return packed;
}

torch::Tensor max_align_forward(const torch::Tensor& images, const torch::Tensor& texts,
                                const torch::Tensor& image_lengths,
                                const torch::Tensor& text_lengths, int64_t direction, bool mean) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  c10::cuda::CUDAGuard guard(p.images.device());
  auto out = torch::empty({p.problem.bi, p.problem.bt}, p.images.options().dtype(torch::kFloat32));
  if (out.numel() == 0) return out;
  const PackedTexts packed = pack_texts(p);
  hc::Plan plan;
  check(hc::max_align_plan(p.problem, p.dtype, false, &plan));
  check(hc::max_align_forward(p.problem, p.dtype, plan, out.data_ptr<float>(), stream()));
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> max_align_backward(
    const torch::Tensor& grad, const torch::Tensor& images, const torch::Tensor& texts,
    const torch::Tensor& image_lengths, const torch::Tensor& text_lengths, int64_t direction,
    bool mean) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  c10::cuda::CUDAGuard guard(p.images.device());
  auto g = grad_float(grad, p);
  auto gi = float_zeros(p.images, p.images.sizes());
  auto gt = float_zeros(p.texts, p.texts.sizes());
  if (g.numel() > 0) {
    const PackedTexts packed = pack_texts(p);
    hc::Plan plan;
    check(hc::max_align_plan(p.problem, p.dtype, true, &plan));
    check(hc::max_align_backward(p.problem, p.dtype, plan, g.data_ptr<float>(),
                                 gi.data_ptr<float>(), gt.data_ptr<float>(), stream()));
  }
  return {gi.to(images.scalar_type()), gt.to(texts.scalar_type())};
}

// ---- scan pooling ----

// The scan kernels run over chunks of images so that the images' Gram matrices (t2i) take
// at most about 256 MB at a time.
int64_t image_chunk(const Prepared& p) {
  if (p.problem.direction == hc::kI2T) return std::max<int64_t>(1, p.problem.bi);
  const int64_t per_image = p.problem.m * p.problem.m * 4;
  return std::max<int64_t>(1, (int64_t(1) << 28) / per_image);
}

hc::Problem chunk_problem(const Prepared& p, int64_t i0, int64_t count) {
  hc::Problem sub = p.problem;
  sub.images = static_cast<const char*>(p.problem.images) +
               i0 * p.problem.m * p.problem.d * p.images.element_size();
  sub.image_lengths = p.problem.image_lengths + i0;
  sub.bi = count;
  return sub;
}

torch::Tensor scan_align_forward(const torch::Tensor& images, const torch::Tensor& texts,
                                 const torch::Tensor& image_lengths,
                                 const torch::Tensor& text_lengths, int64_t direction, bool mean,
                                 double lambda_softmax) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  c10::cuda::CUDAGuard guard(p.images.device());
  auto out = torch::empty({p.problem.bi, p.problem.bt}, p.images.options().dtype(torch::kFloat32));
  if (out.numel() == 0) return out;
  const bool t2i = direction != hc::kI2T, i2t = direction != hc::kT2I;
  torch::Tensor img_norm, gram_txt, txt_norm;
  if (i2t) {
    img_norm = token_norms(p.images, p.image_lengths);
    gram_txt = gram(p.texts, p.text_lengths);
  }
  if (t2i) txt_norm = token_norms(p.texts, p.text_lengths);
  const int64_t chunk = image_chunk(p);
  for (int64_t i0 = 0; i0 < p.problem.bi; i0 += chunk) {
    const int64_t count = std::min(chunk, p.problem.bi - i0);
    const hc::Problem sub = chunk_problem(p, i0, count);
    hc::Plan plan;
    check(hc::scan_align_plan(sub, p.dtype, false, &plan));
    hc::ScanAux aux;
    aux.lambda_softmax = static_cast<float>(lambda_softmax);
    torch::Tensor gram_img, scratch;
    if (t2i) {
      gram_img = gram(p.images.narrow(0, i0, count), p.image_lengths.narrow(0, i0, count));
      aux.gram_img = gram_img.data_ptr<float>();
      aux.txt_norm = txt_norm.data_ptr<float>();
    }
    if (i2t) {
      aux.gram_txt = gram_txt.data_ptr<float>();
      aux.img_norm = img_norm.data_ptr<float>() + i0 * p.problem.m;
    }
    if (plan.global_scratch) {
      scratch = torch::empty({plan.grid * plan.scratch_floats}, out.options());
      aux.scratch = scratch.data_ptr<float>();
    }
    check(hc::scan_align_forward(sub, p.dtype, plan, aux,
                                 out.data_ptr<float>() + i0 * p.problem.bt, stream()));
  }
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> scan_align_backward(
    const torch::Tensor& grad, const torch::Tensor& images, const torch::Tensor& texts,
    const torch::Tensor& image_lengths, const torch::Tensor& text_lengths, int64_t direction,
    bool mean, double lambda_softmax) {
  auto p = prepare(images, texts, image_lengths, text_lengths, direction, mean);
  c10::cuda::CUDAGuard guard(p.images.device());
  auto g = grad_float(grad, p);
  auto gi = float_zeros(p.images, p.images.sizes());
  auto gt = float_zeros(p.texts, p.texts.sizes());
  if (g.numel() == 0) return {gi.to(images.scalar_type()), gt.to(texts.scalar_type())};
  const bool t2i = direction != hc::kI2T, i2t = direction != hc::kT2I;
  const int64_t m = p.problem.m, n = p.problem.n;
  torch::Tensor img_norm, gram_txt, d_img_norm, d_gram_txt, txt_norm, d_txt_norm;
  if (i2t) {
    img_norm = token_norms(p.images, p.image_lengths);
    gram_txt = gram(p.texts, p.text_lengths);
    d_img_norm = float_zeros(p.images, {p.problem.bi, m});
    d_gram_txt = float_zeros(p.texts, {p.problem.bt, n, n});
  }
  if (t2i) {
    txt_norm = token_norms(p.texts, p.text_lengths);
    d_txt_norm = float_zeros(p.texts, {p.problem.bt, n});
  }
  const int64_t chunk = image_chunk(p);
  for (int64_t i0 = 0; i0 < p.problem.bi; i0 += chunk) {
    const int64_t count = std::min(chunk, p.problem.bi - i0);
    const hc::Problem sub = chunk_problem(p, i0, count);
    hc::Plan plan;
    check(hc::scan_align_plan(sub, p.dtype, true, &plan));
    hc::ScanAux aux;
    aux.lambda_softmax = static_cast<float>(lambda_softmax);
    torch::Tensor gram_img, d_gram_img, scratch;
    auto chunk_images = p.images.narrow(0, i0, count);
    auto chunk_lengths = p.image_lengths.narrow(0, i0, count);
    if (t2i) {
      gram_img = gram(chunk_images, chunk_lengths);
      d_gram_img = float_zeros(p.images, {count, m, m});
      aux.gram_img = gram_img.data_ptr<float>();
      aux.d_gram_img = d_gram_img.data_ptr<float>();
      aux.txt_norm = txt_norm.data_ptr<float>();
      aux.d_txt_norm = d_txt_norm.data_ptr<float>();
    }
    if (i2t) {
      aux.gram_txt = gram_txt.data_ptr<float>();
      aux.d_gram_txt = d_gram_txt.data_ptr<float>();
      aux.img_norm = img_norm.data_ptr<float>() + i0 * m;
      aux.d_img_norm = d_img_norm.data_ptr<float>() + i0 * m;
    }
    if (plan.global_scratch) {
      scratch = torch::empty({plan.grid * plan.scratch_floats}, g.options());
      aux.scratch = scratch.data_ptr<float>();
    }
    check(hc::scan_align_backward(sub, p.dtype, plan, aux, g.data_ptr<float>() + i0 * p.problem.bt,
                                  gi.data_ptr<float>() + i0 * m * p.problem.d,
                                  gt.data_ptr<float>(), stream()));
    if (t2i) add_gram_grad(gi.narrow(0, i0, count), chunk_images, chunk_lengths, d_gram_img);
  }
  if (i2t) {
    add_gram_grad(gt, p.texts, p.text_lengths, d_gram_txt);
    add_norm_grad(gi, p.images, p.image_lengths, img_norm, d_img_norm);
  }
  if (t2i) add_norm_grad(gt, p.texts, p.text_lengths, txt_norm, d_txt_norm);
  return {gi.to(images.scalar_type()), gt.to(texts.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hatkernels CUDA kernels (max and scan alignment), compiled ahead of time";
  m.def("max_align_forward", &max_align_forward);
  m.def("max_align_backward", &max_align_backward);
  m.def("scan_align_forward", &scan_align_forward);
  m.def("scan_align_backward", &scan_align_backward);
}
