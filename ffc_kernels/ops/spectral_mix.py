"""Spectral mix: the 1x1 convolution of LaMa's FourierUnit, read and written in place on rfft2's output.

What is fused. LaMa's FourierUnit (eval) runs, between rfft2 and irfft2:
    stack(real, imag) -> permute+contiguous -> 1x1 conv (2C -> 2C) -> BatchNorm -> ReLU
    -> permute+contiguous -> torch.complex
and two ortho scale passes around the transforms. This op does all of it in one kernel:
it reads the complex64 rfft2 output through ``torch.view_as_real`` (interleaved re/im, no
copy), applies the real-linear map with channel 2c = Re(c), 2c+1 = Im(c) as four real GEMMs
(W_rr, W_ri, W_ir, W_ii) with fp32 accumulation, with eval BatchNorm folded into the weights
and bias, the FFT normalisation folded into two scalars (``weight_scale``, ``bias_scale``),
ReLU in the epilogue, and writes interleaved complex64 that irfft2 takes as is.

Layout: ``spec`` (B, Ci, H, Wf) complex64 whose (H, Wf) plane is contiguous (any batch and
channel strides); ``packed_weight`` (2, 2, Co, Ci) fp32 from ``pack_weight``, where
packed[p, q, o, c] = W[2o + p, 2c + q]; ``bias`` (2, Co) fp32 or None (bias[p, o] = b[2o+p]).
Output (B, Co, H, Wf) complex64, contiguous.

Bytes (fp32, B=1, C=Ci=Co, N=H*Wf spectral points, so 8CN bytes per complex tensor):
    eager: stack (r 8CN, w 8CN) + permute copy (16CN) + conv (16CN) + BN (16CN) + ReLU (16CN)
           + permute copy (16CN) + complex (16CN) = 112CN bytes, seven kernels.
    fused: read 8CN + write 8CN = 16CN bytes, one kernel (7x less); the weights (16C^2) stay
           in L2. FLOPs: 8 C^2 N either way. (benchmarks/common.py counts these op by op.)

Precision: every dot runs on tensor cores with fp32 accumulation. fp32 data is multiplied as
3xTF32 (each operand split into a TF32 high and low part: fp32-class accuracy, the default,
torch's "highest"), TF32 ("high") or BF16 ("medium"), following
``torch.get_float32_matmul_precision()``; bf16/fp16 data uses its own dot. (Triton's IEEE
fp32 dot lowers to FMAs that spill registers in every tile shape tried, and runs far below
the tensor-core rate.)
"""
from __future__ import annotations

import torch

from ffc_kernels import backends
from ffc_kernels.ops._common import check_shape, check_tensor, triton_dot_precision

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works; backends.py records why
    triton = None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(2Co, 2Ci[, 1, 1]) conv weight over stacked re/im channels -> (2, 2, Co, Ci) blocks."""
    weight = weight.reshape(weight.shape[0], weight.shape[1])
    co2, ci2 = weight.shape
    if co2 % 2 or ci2 % 2:
        raise ValueError(f"spectral weight must have even dims (2*Co, 2*Ci), got {tuple(weight.shape)}")
    return weight.reshape(co2 // 2, 2, ci2 // 2, 2).permute(1, 3, 0, 2).contiguous()


def pack_bias(bias: torch.Tensor) -> torch.Tensor:
    """(2Co,) bias over stacked re/im channels -> (2, Co)."""
    return bias.reshape(-1, 2).t().contiguous()


def spectral_mix_reference(spec, weight, bias=None, relu=True):
    """LaMa's own math: stack, permute, 1x1 conv with the (2Co, 2Ci) weight, bias, ReLU, back to complex."""
    b, c, h, wf = spec.shape
    x = torch.view_as_real(spec).permute(0, 1, 4, 2, 3).reshape(b, 2 * c, h, wf)
    y = torch.nn.functional.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), bias)
    if relu:
        y = torch.relu(y)
    y = y.view(b, -1, 2, h, wf).permute(0, 1, 3, 4, 2).contiguous()
    return torch.complex(y[..., 0], y[..., 1])


def _spectral_mix_torch(spec, packed_weight, bias, relu, weight_scale, bias_scale):
    # One de-interleaving copy in, one batched GEMM with the bias fused (addmm), ReLU in
    # place, one interleaving copy out.
    b, ci, h, wf = spec.shape
    co = packed_weight.shape[2]
    x = torch.view_as_real(spec).reshape(b, ci, h * wf, 2).permute(0, 3, 1, 2).reshape(b, 2 * ci, h * wf)
    w = packed_weight.permute(0, 2, 1, 3).reshape(2 * co, 2 * ci) * weight_scale
    if bias is None:
        y = torch.matmul(w, x)
    else:
        y = torch.baddbmm((bias.reshape(2 * co, 1) * bias_scale).expand(b, 2 * co, 1), w.expand(b, -1, -1), x)
    if relu:
        y.relu_()
    y = y.view(b, 2, co, h, wf)
    return torch.complex(y[:, 0], y[:, 1])


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr):
        if PRECISION == "tf32x3":
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        elif PRECISION == "tf32":
            acc = tl.dot(a, b, acc, input_precision="tf32")
        elif PRECISION == "bf16":
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        elif PRECISION == "fp16":
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        elif PRECISION == "bf16_emulated":
            acc = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc)
        else:
            tl.static_assert(PRECISION == "fp16_emulated", "unknown dot precision")
            acc = tl.dot(a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32), acc)
        return acc

    @triton.jit
    def _spectral_mix_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        CI, CO, N,
        stride_xb, stride_xc,  # in floats (the real view of complex64)
        stride_ob, stride_oc,
        weight_scale, bias_scale,
        HAS_BIAS: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1).to(tl.int64)
        pid_b = tl.program_id(2).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel o
        offs_f = pid_n * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)  # interleaved float index 2n + q
        mask_m = offs_m < CO
        mask_f = offs_f < 2 * N

        x_base = x_ptr + pid_b * stride_xb
        block = CO * CI  # one of the four (Co, Ci) weight blocks
        acc_re = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_im = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, CI, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < CI
            x = tl.load(x_base + offs_k[:, None].to(tl.int64) * stride_xc + offs_f[None, :],
                        mask=mask_k[:, None] & mask_f[None, :], other=0.0)
            x_re, x_im = tl.split(tl.reshape(x, (BLOCK_K, BLOCK_N, 2)))
            w_offs = offs_m[:, None] * CI + offs_k[None, :]
            w_mask = mask_m[:, None] & mask_k[None, :]
            w_rr = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)
            w_ri = tl.load(w_ptr + block + w_offs, mask=w_mask, other=0.0)
            w_ir = tl.load(w_ptr + 2 * block + w_offs, mask=w_mask, other=0.0)
            w_ii = tl.load(w_ptr + 3 * block + w_offs, mask=w_mask, other=0.0)
            acc_re = _dot(w_rr, x_re, acc_re, PRECISION)
            acc_re = _dot(w_ri, x_im, acc_re, PRECISION)
            acc_im = _dot(w_ir, x_re, acc_im, PRECISION)
            acc_im = _dot(w_ii, x_im, acc_im, PRECISION)

        acc_re = acc_re * weight_scale
        acc_im = acc_im * weight_scale
        if HAS_BIAS:
            acc_re += (tl.load(b_ptr + offs_m, mask=mask_m, other=0.0) * bias_scale)[:, None]
            acc_im += (tl.load(b_ptr + CO + offs_m, mask=mask_m, other=0.0) * bias_scale)[:, None]
        if RELU:
            acc_re = tl.maximum(acc_re, 0.0)
            acc_im = tl.maximum(acc_im, 0.0)
        y = tl.reshape(tl.join(acc_re, acc_im), (BLOCK_M, 2 * BLOCK_N))
        out_base = out_ptr + pid_b * stride_ob
        tl.store(out_base + offs_m[:, None] * stride_oc + offs_f[None, :], y,
                 mask=mask_m[:, None] & mask_f[None, :])


def kernel_configs(precision: str):
    """Every (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the launcher may pick.

    Chosen so that no config spills registers on sm_80 or sm_90 (tests/test_aot_compile.py):
    3xTF32 splits every operand in two, so it gets half the spatial tile.
    """
    if precision == "tf32x3":
        return [(64, 32, 16, 8, 3), (32, 32, 16, 4, 3), (16, 32, 16, 4, 3)]
    return [(64, 64, 16, 8, 3), (32, 64, 16, 4, 3), (16, 64, 16, 4, 3)]


def _pick_config(co: int, precision: str):
    # Small channel counts waste most of a 64-row tile; LaMa's 192-channel units take 64.
    configs = kernel_configs(precision)
    return configs[0] if co >= 64 else configs[1] if co >= 32 else configs[2]


def _spectral_mix_triton(spec, packed_weight, bias, relu, weight_scale, bias_scale, precision):
    b, ci, h, wf = spec.shape
    co = packed_weight.shape[2]
    n = h * wf
    x = torch.view_as_real(spec)
    out = torch.empty((b, co, h, wf), dtype=torch.complex64, device=spec.device)
    y = torch.view_as_real(out)
    block_m, block_n, block_k, num_warps, num_stages = _pick_config(co, precision)
    grid = (triton.cdiv(n, block_n), triton.cdiv(co, block_m), b)
    _spectral_mix_kernel[grid](
        x, packed_weight, bias if bias is not None else packed_weight, y,
        ci, co, n,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        float(weight_scale), float(bias_scale),
        HAS_BIAS=bias is not None, RELU=relu, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def spectral_mix(spec, packed_weight, bias=None, *, relu=True, weight_scale=1.0, bias_scale=1.0,
                 precision=None, backend=None):
    """ReLU(weight_scale * W @ [Re; Im](spec) + bias_scale * bias), as complex64 in rfft2's layout.

    ``packed_weight`` comes from ``pack_weight`` and ``bias`` from ``pack_bias``; ``precision``
    defaults to torch's float32 matmul precision; ``backend`` defaults to ``backends.select``.
    """
    check_tensor("spec", spec, dtypes=(torch.complex64,), ndim=4)
    check_tensor("packed_weight", packed_weight, dtypes=(torch.float32,), ndim=4, device=spec.device)
    b, ci, h, wf = spec.shape
    co = packed_weight.shape[2]
    check_shape("packed_weight", packed_weight, (2, 2, co, ci))
    if bias is not None:
        check_tensor("bias", bias, dtypes=(torch.float32,), ndim=2, device=spec.device)
        check_shape("bias", bias, (2, co))
    if spec.stride(3) != 1 or spec.stride(2) != wf:
        raise ValueError(f"spec's (H, Wf) plane must be contiguous, got strides {spec.stride()}")
    backend = backend or backends.select(spec.device, has_cuda_impl=True)
    precision = triton_dot_precision(precision or backends.matmul_precision(), torch.float32)
    return torch.ops.ffc_kernels.spectral_mix(
        spec, packed_weight.contiguous(), None if bias is None else bias.contiguous(), relu,
        float(weight_scale), float(bias_scale), precision, backend)


# One opaque op for torch.compile and CUDA graphs; the fake kernel gives the output's metadata.
@torch.library.custom_op("ffc_kernels::spectral_mix", mutates_args=())
def _spectral_mix_op(spec: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, relu: bool,
                     weight_scale: float, bias_scale: float, precision: str, backend: str) -> torch.Tensor:
    if backend == "torch":
        return _spectral_mix_torch(spec, packed_weight, bias, relu, weight_scale, bias_scale)
    if backend == "cuda":
        from ffc_kernels import _ext

        return _ext.spectral_mix_packed(spec, packed_weight, bias, relu, weight_scale, bias_scale)
    return _spectral_mix_triton(spec, packed_weight, bias, relu, weight_scale, bias_scale, precision)


@_spectral_mix_op.register_fake
def _(spec, packed_weight, bias, relu, weight_scale, bias_scale, precision, backend):
    b, _, h, wf = spec.shape
    return spec.new_empty((b, packed_weight.shape[2], h, wf))
