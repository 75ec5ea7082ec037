"""Spectral mix: the 1x1 convolution of LaMa's FourierUnit, read and written in place on rfft2's output.

What is fused. LaMa's FourierUnit (eval) runs, between rfft2 and irfft2:
    stack(real, imag) -> permute+contiguous -> 1x1 conv (2C -> 2C) -> BatchNorm -> ReLU
    -> permute+contiguous -> torch.complex
and two ortho scale passes around the transforms. This op does all of it in one kernel:
it reads the complex64 rfft2 output through ``torch.view_as_real`` (interleaved re/im, no
copy), applies the real-linear map with channel 2c = Re(c), 2c+1 = Im(c) as ONE GEMM with
LaMa's real (2Co, 2Ci) weight and fp32 accumulation, with eval BatchNorm folded into the
weights and bias, the FFT normalisation folded into two scalars (``weight_scale``,
``bias_scale``), ReLU in the epilogue, and writes interleaved complex64 that irfft2 takes as is.

The kernel. Each step loads an interleaved (BLOCK_K, 2 BLOCK_N) tile of floats and reorders it
in registers to (2 BLOCK_K, BLOCK_N) rows (channel, re/im), the order of the weight's columns;
one dot with the (2 BLOCK_M, 2 BLOCK_K) weight block accumulates (2 BLOCK_M, BLOCK_N) rows
(channel, re/im), reordered back to complex64's interleaving before the store. Four dots over
the (Co, Ci) blocks into a real and an imaginary accumulator compile (sm_90) to two MMA layouts
with accumulators converted between them through shared memory at every step; one dot into one
accumulator keeps one layout. Output-channel tiles are the fastest-varying programs, so each
input tile is read from HBM once.

Layout: ``spec`` (B, Ci, H, Wf) complex64 whose (H, Wf) plane is contiguous (any batch and
channel strides); ``packed_weight`` (2, 2, Co, Ci) fp32 from ``pack_weight``, where
packed[p, q, o, c] = W[2o + p, 2c + q] (the CUDA extension's layout; the Triton kernel gathers
W's rows and columns from it); ``bias`` (2, Co) fp32 or None (bias[p, o] = b[2o+p]).
Output (B, Co, H, Wf) complex64, contiguous.

Bytes (fp32, B=1, C=Ci=Co, N=H*Wf spectral points, so 8CN bytes per complex tensor):
    eager: stack (r 8CN, w 8CN) + permute copy (16CN) + conv (16CN) + BN (16CN) + ReLU (16CN)
           + permute copy (16CN) + complex (16CN) = 112CN bytes, seven kernels.
    fused: read 8CN + write 8CN = 16CN bytes, one kernel (7x less); the weights (16C^2) stay
           in L2. FLOPs: 8 C^2 N either way. (benchmarks/common.py counts these op by op.)

Precision (``precision``, see ``_common.mma_dot``): "fp32" is fp32-class split TF32 (four TF32
products in one dot), "tf32" rounds both operands to TF32, "bf16" multiplies bf16 operands; all
accumulate in fp32 on tensor cores. Without one the op follows ``backends.matmul_precision()``:
cuDNN's TF32 switch, as the convolution it replaces would. (Triton's IEEE fp32 dot lowers to
FMAs that spill registers and run far below the tensor-core rate.)
"""
from __future__ import annotations

import torch

from ffc_kernels import backends, measured
from ffc_kernels.ops._common import (check_shape, check_tensor, on_device, torch_allows_tf32,
                                     triton_dot_precision)

try:
    import triton
    import triton.language as tl

    from ffc_kernels.ops._common import mma_dot
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
    def _spectral_mix_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        CI, CO, N,
        stride_xb, stride_xc,  # in floats (the real view of complex64)
        stride_ob, stride_oc,
        weight_scale, bias_scale,
        HAS_BIAS: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Output-channel tiles vary fastest: the programs that read one input tile run side by
        # side, so each tile comes from HBM once and from L2 for the other output channels.
        # One flat axis, since the spatial tile count can pass the 65535 limit of axes 1 and 2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(CO, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        pid_b = tl.program_id(1).to(tl.int64)

        # Rows of the one accumulator are LaMa's stacked channels 2o + p (p: real/imaginary part
        # of output channel o), columns of the weight tile 2c + q: one dot per step (see header).
        rows = tl.arange(0, 2 * BLOCK_M)
        offs_o = pid_m * BLOCK_M + rows // 2
        mask_o = offs_o < CO
        # packed[p, q, o, c] = W[2o + p, 2c + q] lives at ((2p + q) CO + o) CI + c.
        w_rows = (2 * (rows % 2) * CO + offs_o) * CI
        cols = tl.arange(0, 2 * BLOCK_K)
        floats = tl.arange(0, 2 * BLOCK_N)  # interleaved float index 2n + q within the tile
        mask_f = pid_n * (2 * BLOCK_N) + floats < 2 * N
        x_base = x_ptr + pid_b * stride_xb + pid_n.to(tl.int64) * (2 * BLOCK_N)

        # Offsets are rebuilt from vectors at each step: 2-D offset tiles kept across the loop
        # cost more registers than recomputing them.
        acc = tl.zeros((2 * BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, CI, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_base + offs_k[:, None].to(tl.int64) * stride_xc + floats[None, :],
                        mask=(offs_k < CI)[:, None] & mask_f[None, :], other=0.0)
            # (c, n, q) -> (c, q, n): rows 2c + q, the order of the weight's columns.
            x = tl.reshape(tl.permute(tl.reshape(x, (BLOCK_K, BLOCK_N, 2)), (0, 2, 1)), (2 * BLOCK_K, BLOCK_N))
            offs_c = k0 + cols // 2
            w = tl.load(w_ptr + w_rows[:, None] + ((cols % 2) * CO * CI + offs_c)[None, :],
                        mask=mask_o[:, None] & (offs_c < CI)[None, :], other=0.0)
            acc = mma_dot(w, x, acc, PRECISION)

        acc = acc * weight_scale
        if HAS_BIAS:
            acc += (tl.load(b_ptr + (rows % 2) * CO + offs_o, mask=mask_o, other=0.0) * bias_scale)[:, None]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        # (o, p, n) -> (o, n, p): complex64's interleaving, which irfft2 reads as is.
        y = tl.reshape(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)), (BLOCK_M, 2 * BLOCK_N))
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        out_base = out_ptr + pid_b * stride_ob + pid_n.to(tl.int64) * (2 * BLOCK_N)
        tl.store(out_base + offs_m[:, None].to(tl.int64) * stride_oc + floats[None, :], y,
                 mask=(offs_m < CO)[:, None] & mask_f[None, :])


def kernel_configs(precision: str):
    """Every (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the launcher may pick, on any GPU,
    largest BLOCK_M first.

    BLOCK_M complex output channels make 2 BLOCK_M accumulator rows and BLOCK_K input channels a
    dot over 2 BLOCK_K (split TF32: 8 BLOCK_K). ``python -m ffc_kernels.aot`` checks each on sm_80,
    sm_86, sm_89 and sm_90 (spills, MMA layouts, barriers). Without wgmma (sm_8x) both operands of a
    dot sit whole in registers, so 2 BLOCK_M = 128 rows at a reduction of 64 spills there (72-88
    bytes on sm_86/89; 255 registers and none on sm_90): one table for every GPU takes 64 rows.
    """
    if precision == "tf32x3":
        return [(64, 128, 8, 8, 2), (32, 128, 8, 8, 2), (16, 128, 8, 4, 2)]
    return [(32, 128, 32, 8, 2), (16, 128, 32, 4, 2)]


def _pick_config(co: int, precision: str):
    # The largest tile that small channel counts do not mostly waste.
    configs = kernel_configs(precision.removesuffix("_emulated"))
    return next((c for c in configs if c[0] <= co), configs[-1])


def _spectral_mix_triton(spec, packed_weight, bias, relu, weight_scale, bias_scale, precision):
    b, ci, h, wf = spec.shape
    co = packed_weight.shape[2]
    n = h * wf
    x = torch.view_as_real(spec)
    out = torch.empty((b, co, h, wf), dtype=torch.complex64, device=spec.device)
    y = torch.view_as_real(out)
    block_m, block_n, block_k, num_warps, num_stages = _pick_config(co, precision)
    grid = (triton.cdiv(co, block_m) * triton.cdiv(n, block_n), b)
    with on_device(spec):
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
    ("fp32", "tf32", "bf16") defaults to ``backends.matmul_precision()``; ``backend`` defaults to
    ``backends.select``. The torch backend multiplies fp32 in IEEE fp32 for "fp32" and in TF32
    otherwise (on CUDA, whatever torch's switches say); the CUDA extension's mix is IEEE fp32.
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
    precision = triton_dot_precision(precision, torch.float32)
    packed_weight = packed_weight.contiguous()
    bias = None if bias is None else bias.contiguous()

    def run(backend):
        return torch.ops.ffc_kernels.spectral_mix(spec, packed_weight, bias, relu, float(weight_scale),
                                                  float(bias_scale), precision, backend)

    backend = backend or backends.select(
        spec.device, has_cuda_impl=True, op="spectral_mix", trial=run, tolerance=measured.TOLERANCE[precision],
        shape=(precision, ci, co, measured.size_class(b * h * wf), spec.stride(1) == h * wf))
    return run(backend)


# One opaque op for torch.compile and CUDA graphs; the fake kernel gives the output's metadata.
@torch.library.custom_op("ffc_kernels::spectral_mix", mutates_args=())
def _spectral_mix_op(spec: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, relu: bool,
                     weight_scale: float, bias_scale: float, precision: str, backend: str) -> torch.Tensor:
    if backend == "torch":
        with backends.cuda_fp32_precision(spec.device, allow_tf32=torch_allows_tf32(precision)):
            return _spectral_mix_torch(spec, packed_weight, bias, relu, weight_scale, bias_scale)
    if backend == "cuda":
        from ffc_kernels import _ext

        return _ext.spectral_mix_packed(spec, packed_weight, bias, relu, weight_scale, bias_scale)
    return _spectral_mix_triton(spec, packed_weight, bias, relu, weight_scale, bias_scale, precision)


@_spectral_mix_op.register_fake
def _(spec, packed_weight, bias, relu, weight_scale, bias_scale, precision, backend):
    b, _, h, wf = spec.shape
    return spec.new_empty((b, packed_weight.shape[2], h, wf))


# Backward. In real terms the op is y = relu(ws W x + bs b) over interleaved (re, im) channels,
# and torch's gradient of a complex tensor, for a real loss, is d/dRe + i d/dIm: interleaved the
# same way. So d x = ws W^T (g * [y > 0]): the same op with the transposed weight, packed as
# packed^T[q, p, c, o] = packed[p, q, o, c], no ReLU and no bias, on the same kernels. The ReLU
# mask is kept as bools; the input spectrum only when the weights need gradients.
def _spectral_mix_setup_context(ctx, inputs, output):
    spec, packed_weight, bias, relu, weight_scale, bias_scale, precision, backend = inputs
    ctx.options = (weight_scale, bias_scale, precision, backend)
    params_grad = packed_weight.requires_grad or (bias is not None and bias.requires_grad)
    ctx.save_for_backward(packed_weight, torch.view_as_real(output) > 0 if relu else None,
                          spec if params_grad else None)


def _spectral_mix_backward(ctx, grad):
    packed_weight, mask, spec = ctx.saved_tensors
    weight_scale, bias_scale, precision, backend = ctx.options
    g = torch.view_as_real(grad.resolve_conj().contiguous())  # (B, Co, H, Wf, 2)
    if mask is not None:
        g = g * mask
    d_spec = d_weight = d_bias = None
    if ctx.needs_input_grad[0]:
        d_spec = torch.ops.ffc_kernels.spectral_mix(torch.view_as_complex(g.contiguous()),
                                                    packed_weight.permute(1, 0, 3, 2).contiguous(), None, False,
                                                    weight_scale, 1.0, precision, backend)
    if ctx.needs_input_grad[1]:
        x = torch.view_as_real(spec.resolve_conj()).flatten(2, 3)  # (B, Ci, N, 2)
        d_weight = weight_scale * torch.einsum("bonp,bcnq->pqoc", g.flatten(2, 3), x)
    if ctx.needs_input_grad[2]:
        d_bias = bias_scale * g.sum(dim=(0, 2, 3)).t()
    return d_spec, d_weight, d_bias, None, None, None, None, None


torch.library.register_autograd("ffc_kernels::spectral_mix", _spectral_mix_backward,
                                setup_context=_spectral_mix_setup_context)
