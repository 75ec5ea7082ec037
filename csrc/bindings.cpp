// Torch binding of csrc's kernels as the Python module ffc_kernels._C (TORCH_EXTENSION_NAME).
//
// spectral_mix(spec, weight, bias, relu) -> Tensor: see spectral_mix.h for the math.
// fourier_unit(x, weight, bias, relu, fft_norm, precision) -> Tensor: see fourier_unit.h.
// Every check names what was expected. The device checks come last, so that every other check also runs
// (and is tested) on a machine without a GPU. The current stream comes from c10/cuda (what
// at::cuda::getCurrentCUDAStream returns) so that the build needs no cuBLAS/cuSPARSE headers.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "fourier_unit.h"
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

// LaMa's FourierUnit, eval: irfft2(relu(conv_bn(rfft2(x, norm))), norm) with the conv over the
// stacked (re, im) channels. weight: LaMa's conv weight with BatchNorm folded, (2Co, 2Ci) or
// (2Co, 2Ci, 1, 1); bias (2Co,) or None. Returns fp32 (B, Co, H, W), a view of rows padded to
// 2 (W / 2 + 1) floats (cuFFT's in-place C2R layout; see fourier_unit.h).
at::Tensor fourier_unit(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, bool relu,
                        const std::string& fft_norm, const std::string& precision) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fourier_unit: x must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "fourier_unit: x must be 4-D (B, Ci, H, W), got ", x.dim(),
              "-D of shape ", x.sizes());
  const int64_t B = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "fourier_unit: weight must be float32, got ",
              weight.scalar_type());
  const bool conv_shaped = weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1;
  TORCH_CHECK((weight.dim() == 2 || conv_shaped) && weight.size(1) == 2 * Ci &&
                  weight.size(0) % 2 == 0 && weight.size(0) > 0,
              "fourier_unit: weight must be LaMa's (2 * Co, 2 * Ci) = (2 * Co, ", 2 * Ci,
              ") or (2 * Co, ", 2 * Ci, ", 1, 1) for x with Ci = ", Ci,
              " channels, got shape ", weight.sizes());
  const int64_t Co = weight.size(0) / 2;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "fourier_unit: bias must be float32, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == 2 * Co,
                "fourier_unit: bias must be 1-D of size 2 * Co = ", 2 * Co, ", got shape ",
                bias->sizes());
  }
  // norm's forward scale a and inverse scale c, folded into the mix as in ops/fourier_unit.py:
  // c * irfft(relu(W a X + b)) = irfft(relu(a c W X + c b)), ReLU being positively homogeneous.
  double a = 1.0, c = 1.0;
  const double hw = static_cast<double>(H) * static_cast<double>(W);
  if (fft_norm == "ortho") {
    a = c = 1.0 / std::sqrt(hw);
  } else if (fft_norm == "backward") {
    c = 1.0 / hw;
  } else if (fft_norm == "forward") {
    a = 1.0 / hw;
  } else {
    TORCH_CHECK(false, "fourier_unit: fft_norm must be \"ortho\", \"backward\" or \"forward\", got \"",
                fft_norm, "\"");
  }
  MixPrecision mix;
  if (precision == "tf32") {
    mix = MixPrecision::kTf32;
  } else if (precision == "bf16") {
    mix = MixPrecision::kBf16;
  } else if (precision == "fp32") {
    mix = MixPrecision::kFp32;
  } else {
    TORCH_CHECK(false, "fourier_unit: precision must be \"tf32\" or \"bf16\" (tensor cores) or "
                "\"fp32\" (IEEE fp32 SIMT), got \"", precision, "\"");
  }
  TORCH_CHECK(H > 0 && W > 0 && Ci > 0,
              "fourier_unit: x's channels and spatial size must be positive, got Ci = ", Ci,
              ", H = ", H, ", W = ", W);
  TORCH_CHECK((W <= 1 || x.stride(3) == 1) && (H <= 1 || x.stride(2) == W),
              "fourier_unit: x's spatial dims (H, W) must be contiguous, strides (", W,
              ", 1); got strides ", x.strides(), " (batch and channel strides may be anything)");
  TORCH_CHECK(B <= kIntMax && Ci <= kIntMax && Co <= kIntMax,
              "fourier_unit: batch and channel counts must fit in int32, got B = ", B,
              ", Ci = ", Ci, ", Co = ", Co);
  TORCH_CHECK(x.is_cuda(), "fourier_unit: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(weight.device() == x.device(), "fourier_unit: weight must be on ", x.device(),
              " like x, got ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), "fourier_unit: bias must be on ", x.device(),
                " like x, got ", bias->device());
  }

  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t Wf = W / 2 + 1;
  at::Tensor out = at::empty({B, Co, H, 2 * Wf}, x.options());
  if (out.numel() == 0) return out.narrow(3, 0, W);
  // Overlapping planes (a zero or short batch or channel stride: an expanded tensor) are read
  // once packed; any other batch and channel strides are read in place.
  const bool overlapping = (Ci > 1 && x.stride(1) < H * W) || (B > 1 && x.stride(0) < H * W);
  const at::Tensor xin = overlapping ? x.contiguous() : x;
  at::Tensor w = weight.reshape({2 * Co, 2 * Ci}).contiguous();
  if (reinterpret_cast<uintptr_t>(w.data_ptr()) % 8 != 0) w = w.clone();  // the TF32 mix's float2 loads
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const FourierUnitShape shape{B, Ci, Co, H, W, xin.stride(0), xin.stride(1)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  size_t work_bytes = 0;
  const char* err = fourier_unit_prepare(shape, stream, &work_bytes);
  TORCH_CHECK(err == nullptr, err);
  const at::Tensor work = at::empty({static_cast<int64_t>(work_bytes)}, x.options().dtype(at::kByte));
  const at::Tensor spec = at::empty({B, Ci, H, Wf}, x.options().dtype(at::kComplexFloat));
  err = fourier_unit_launch(shape, xin.data_ptr<float>(), w.data_ptr<float>(),
                            b.defined() ? b.data_ptr<float>() : nullptr, relu,
                            static_cast<float>(a * c), static_cast<float>(c), mix,
                            reinterpret_cast<float2*>(spec.data_ptr()),
                            reinterpret_cast<float2*>(out.data_ptr()),
                            work_bytes ? work.data_ptr() : nullptr, stream);
  TORCH_CHECK(err == nullptr, err);
  return out.narrow(3, 0, W);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ffc_kernels CUDA kernels (csrc/)";
  m.def("spectral_mix", &spectral_mix, py::arg("spec"), py::arg("weight"), py::arg("bias"),
        py::arg("relu"),
        "LaMa FourierUnit's 1x1 conv (BatchNorm folded) + optional ReLU on rfft2's complex64 "
        "output (B, Ci, H, Wf): weight (2Co, 2Ci) fp32, bias (2Co,) fp32 or None -> complex64 "
        "(B, Co, H, Wf).");
  m.def("fourier_unit", &fourier_unit, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("relu") = true, py::arg("fft_norm") = "ortho", py::arg("precision") = "tf32",
        "LaMa's FourierUnit (eval) with cuFFT plans cached per shape and stream: rfft2 of fp32 x "
        "(B, Ci, H, W), the spectral mix (weight (2Co, 2Ci) fp32 with BatchNorm folded, bias "
        "(2Co,) or None, ReLU, fft_norm folded into its scales; precision \"tf32\" or \"bf16\" "
        "on tensor cores, or \"fp32\" SIMT), irfft2 in place on the mix's output -> fp32 (B, Co, H, W).");
  m.def("fourier_unit_cached_plans", &fourier_unit_cached_plans,
        "Number of cuFFT plans fourier_unit holds (R2C and C2R count once each).");
}
