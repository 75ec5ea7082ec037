// fourier_unit: LaMa's FourierUnit (eval) on the GPU with cuFFT plans of its own:
//   R2C (rfft2, unnormalised) -> spectral mix (BatchNorm folded, ReLU, the FFT normalisation
//   folded into two scalars) -> C2R in place on the mix's own output (no clone).
//
// Plain C++ over the CUDA runtime and cuFFT, no torch headers: the caller (bindings.cpp)
// allocates the buffers with its allocator and passes them in.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

enum class MixPrecision {
  kFp32,  // IEEE fp32 FMAs on the SIMT cores (spectral_mix_launch)
  kTf32,  // TF32 operands, fp32 accumulation on tensor cores (spectral_mix_tf32_launch)
  kBf16,  // BF16 operands, fp32 accumulation on tensor cores (spectral_mix_bf16_launch)
};

struct FourierUnitShape {
  int64_t B, Ci, Co, H, W;
  // x's batch and channel strides in floats; each (H, W) plane is contiguous.
  int64_t x_batch_stride, x_chan_stride;
  int64_t Wf() const { return W / 2 + 1; }
};

// Creates (or finds in the cache) the cuFFT plans for this shape on the current device and
// `stream`, and sets *work_bytes to the cuFFT work area fourier_unit_launch needs. Returns
// nullptr on success, else a message naming the failing cuFFT call and its status.
const char* fourier_unit_prepare(const FourierUnitShape& shape, cudaStream_t stream,
                                 size_t* work_bytes);

// x:     fp32, element (b, c, h, w) at x[b * x_batch_stride + c * x_chan_stride + h * W + w].
// w:     LaMa's (2Co, 2Ci) fp32 weight (BatchNorm folded); bias: 2Co fp32 or nullptr.
// spec:  scratch, B * Ci * H * Wf complex (rfft2 of x).
// out:   B * Co * H * Wf complex: the mix writes it, C2R overwrites it with the real result,
//        laid out (B, Co, H, 2 Wf) floats of which the first W of each row are the output.
// work:  fourier_unit_prepare's work_bytes of device memory (may be null when that is 0).
// The mix computes act(weight_scale * W @ X + bias_scale * bias) (see spectral_mix.h).
// Everything runs on `stream`. Returns nullptr on success, else what failed.
const char* fourier_unit_launch(const FourierUnitShape& shape, const float* x, const float* w,
                                const float* bias, bool relu, float weight_scale,
                                float bias_scale, MixPrecision precision, float2* spec,
                                float2* out, void* work, cudaStream_t stream);

// Number of cached cuFFT plans (each R2C or C2R plan counts once), for tests.
size_t fourier_unit_cached_plans();
