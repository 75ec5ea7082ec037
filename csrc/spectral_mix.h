// spectral_mix: the 1x1 convolution of LaMa's FourierUnit, applied to rfft2's complex output
// in place (eval mode, BatchNorm folded into weight and bias), with an optional ReLU.
//
// Plain CUDA C++, no torch headers: the kernel compiles with nvcc alone (tests/test_csrc.py
// checks registers, spills and shared memory for sm_80 and sm_90 that way) and the torch
// binding lives in bindings.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

// out[b, o, n] = act(W[2o:2o+2, :] @ (re x[b, :, n], im x[b, :, n]) interleaved + bias[2o:2o+2])
//
// x:    complex input as interleaved (re, im) pairs; element (b, c, n) lives at
//       x[b * x_batch_stride + c * x_chan_stride + n]: batch and channel strides are arbitrary
//       (in complex elements), the N = H * Wf spatial positions are contiguous.
// w:    (2 * Co, 2 * Ci) row-major fp32; column 2c multiplies Re x_c, column 2c + 1 Im x_c;
//       row 2o gives Re out_o, row 2o + 1 gives Im out_o (LaMa's stacking of real and imaginary
//       parts as channels).
// bias: 2 * Co fp32, or nullptr.
// out:  (B, Co, N) complex, contiguous.
// weight_scale multiplies the accumulated sum and bias_scale the bias, before the ReLU (the
// FourierUnit folds its FFT normalisation into them; 1 and 1 give the plain mix).
// IEEE fp32 multiply-adds (SIMT), fp32 accumulation. Launches on `stream`; the caller checks
// for launch errors.
void spectral_mix_launch(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride,
                         const float* w, const float* bias, float2* out, int B, int Ci, int Co,
                         int64_t N, bool relu, cudaStream_t stream, float weight_scale = 1.f,
                         float bias_scale = 1.f);

// The same map on tensor cores (spectral_mix_mma.cu): both operands rounded (to nearest, ties
// to even) to TF32 and multiplied by mma.sync.m16n8k8, or to BF16 and mma.sync.m16n8k16,
// products accumulated in fp32; then act(weight_scale * sum + bias_scale * bias). Needs sm_80
// or newer, and w 8-byte aligned (its rows are read as float2).
void spectral_mix_tf32_launch(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride,
                              const float* w, const float* bias, float2* out, int B, int Ci,
                              int Co, int64_t N, bool relu, float weight_scale, float bias_scale,
                              cudaStream_t stream);
void spectral_mix_bf16_launch(const float2* x, int64_t x_batch_stride, int64_t x_chan_stride,
                              const float* w, const float* bias, float2* out, int B, int Ci,
                              int Co, int64_t N, bool relu, float weight_scale, float bias_scale,
                              cudaStream_t stream);
