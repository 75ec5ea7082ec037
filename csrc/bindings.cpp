// Torch binding of csrc's kernels as the Python module ffc_kernels._C (TORCH_EXTENSION_NAME).
//
// spectral_mix(spec, weight, bias, relu) -> Tensor: see spectral_mix.h for the math. Every check
// names what was expected. The device checks come last, so that every other check also runs
// (and is tested) on a machine without a GPU. The current stream comes from c10/cuda (what
// at::cuda::getCurrentCUDAStream returns) so that the build needs no cuBLAS/cuSPARSE headers.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <optional>

#include "spectral_mix.h"

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

at::Tensor spectral_mix(const at::Tensor& spec, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, bool relu) {
  TORCH_CHECK(spec.scalar_type() == at::kComplexFloat,
              "spectral_mix: spec must be complex64 (torch.fft.rfft2 of an fp32 tensor), got ",
              spec.scalar_type());
  TORCH_CHECK(spec.dim() == 4, "spectral_mix: spec must be 4-D (B, Ci, H, Wf), got ", spec.dim(),
              "-D of shape ", spec.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "spectral_mix: weight must be float32, got ",
              weight.scalar_type());
  const int64_t B = spec.size(0), Ci = spec.size(1), H = spec.size(2), Wf = spec.size(3);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == 2 * Ci && weight.size(0) % 2 == 0,
              "spectral_mix: weight must be (2 * Co, 2 * Ci) = (2 * Co, ", 2 * Ci,
              ") for spec with Ci = ", Ci, " channels, got shape ", weight.sizes());
  const int64_t Co = weight.size(0) / 2;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "spectral_mix: bias must be float32, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == 2 * Co,
                "spectral_mix: bias must be 1-D of size 2 * Co = ", 2 * Co, ", got shape ",
                bias->sizes());
  }
  TORCH_CHECK((Wf <= 1 || spec.stride(3) == 1) && (H <= 1 || spec.stride(2) == Wf),
              "spectral_mix: spec's spatial dims (H, Wf) must be contiguous, strides (", Wf,
              ", 1) in complex elements; got strides ", spec.strides(),
              " (batch and channel strides may be anything)");
  TORCH_CHECK(B <= kIntMax && Ci <= kIntMax && Co <= kIntMax,
              "spectral_mix: batch and channel counts must fit in int32, got B = ", B,
              ", Ci = ", Ci, ", Co = ", Co);
  TORCH_CHECK(spec.is_cuda(), "spectral_mix: spec must be a CUDA tensor, got device ",
              spec.device());
  TORCH_CHECK(weight.device() == spec.device(), "spectral_mix: weight must be on ",
              spec.device(), " like spec, got ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == spec.device(), "spectral_mix: bias must be on ", spec.device(),
                " like spec, got ", bias->device());
  }

  const c10::cuda::CUDAGuard device_guard(spec.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, Co, H, Wf}, spec.options());
  if (out.numel() == 0) return out;

  spectral_mix_launch(reinterpret_cast<const float2*>(spec.data_ptr()), spec.stride(0),
                      spec.stride(1), w.data_ptr<float>(),
                      b.defined() ? b.data_ptr<float>() : nullptr,
                      reinterpret_cast<float2*>(out.data_ptr()), static_cast<int>(B),
                      static_cast<int>(Ci), static_cast<int>(Co), H * Wf, relu,
                      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ffc_kernels CUDA kernels (csrc/)";
  m.def("spectral_mix", &spectral_mix, py::arg("spec"), py::arg("weight"), py::arg("bias"),
        py::arg("relu"),
        "LaMa FourierUnit's 1x1 conv (BatchNorm folded) + optional ReLU on rfft2's complex64 "
        "output (B, Ci, H, Wf): weight (2Co, 2Ci) fp32, bias (2Co,) fp32 or None -> complex64 "
        "(B, Co, H, Wf).");
}
