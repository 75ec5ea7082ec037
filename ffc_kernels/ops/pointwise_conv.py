"""Pointwise (1x1) convolution with a fused input sum and a fused epilogue: SpectralTransform's two ends.

What is fused. In LaMa's SpectralTransform and the FFC around it (eval):
    conv1: 1x1 conv -> BatchNorm -> ReLU                                   (3 passes)
    conv2: x + fu(x) (+ lfu(x) tiled 2x2) -> 1x1 conv                      (3-5 passes)
    FFC:   + convl2g(x_l) -> bn_g -> act_g                                  (3 passes)
Each end here is one kernel computing
    out[b, o, p] = act( sum_c W[o, c] * (x + addend + tiled)[b, c, p] + bias[o] + residual[b, o, p] )
with BatchNorm folded into W and bias by the caller, ``tiled`` indexed at (h mod th, w mod tw)
(LaMa's ``repeat(1, 1, 2, 2)`` without materialising it), ReLU optional, and the result written
into ``out``, which may be a channel slice of a larger tensor (the FFC's concatenated local and
global output), so no later ``torch.cat`` copies it.

Layout: any 4-d strides for every tensor (NCHW and channels_last both work, and channel
slices); spatial positions are flattened p = h * W + w and addressed through (h, w) strides.
fp32 accumulation; inputs fp32, bf16 or fp16; ``out`` of the caller's dtype.

Bytes (fp32, C in and out, P pixels; conv2 with LFU and the FFC epilogue, the worst case):
    eager: sum x+fu (12CP) + tiled repeat (5CP) + sum +xs (12CP) + conv (8CP) + l2g add (12CP)
           + BatchNorm (8CP) + ReLU (8CP) + cat into the output (8CP) = 73CP bytes
    fused: read x, fu, tiled (4CP + CP) and residual (4CP), write 4CP = 17CP bytes, one kernel.
    conv1: eager 24CP (conv, BN, ReLU: 8CP each, fp32) -> fused 8CP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ffc_kernels import backends
from ffc_kernels.ops._common import check_shape, check_tensor, triton_dot_precision

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pointwise_conv_reference(x, weight, bias=None, *, addend=None, tiled=None, residual=None, relu=False):
    """The same math in eager torch ops (sum, repeat, conv2d, add, ReLU), in weight's dtype."""
    dtype = weight.dtype
    s = x.to(dtype)
    if addend is not None:
        s = s + addend.to(dtype)
    if tiled is not None:
        reps = (x.shape[2] // tiled.shape[2], x.shape[3] // tiled.shape[3])
        s = s + tiled.to(dtype).repeat(1, 1, *reps)
    y = F.conv2d(s, weight[:, :, None, None], None if bias is None else bias.to(dtype))
    if residual is not None:
        y = y + residual.to(dtype)
    return torch.relu(y) if relu else y


def _pointwise_conv_torch(x, weight, bias, addend, tiled, residual, relu, out):
    s = x
    if addend is not None:
        s = s + addend
    if tiled is not None:
        s = s + tiled.repeat(1, 1, x.shape[2] // tiled.shape[2], x.shape[3] // tiled.shape[3])
    y = F.conv2d(s.to(weight.dtype), weight[:, :, None, None], bias)
    if residual is not None:
        y += residual
    if relu:
        y.relu_()
    return out.copy_(y)


if triton is not None:
    from ffc_kernels.ops.spectral_mix import _dot

    @triton.jit
    def _pointwise_conv_kernel(
        x_ptr, a_ptr, t_ptr, w_ptr, b_ptr, r_ptr, out_ptr,
        CI, CO, W, P, TH, TW,
        sxb, sxc, sxh, sxw,
        sab, sac, sah, saw,
        stb, stc, sth, stw,
        srb, src, srh, srw,
        sob, soc, soh, sow,
        HAS_ADDEND: tl.constexpr, HAS_TILED: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1).to(tl.int64)
        pid_b = tl.program_id(2).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < CO
        mask_p = offs_p < P
        h = offs_p // W
        w = offs_p % W

        x_sp = pid_b * sxb + h * sxh + w * sxw
        if HAS_ADDEND:
            a_sp = pid_b * sab + h * sah + w * saw
        if HAS_TILED:
            t_sp = pid_b * stb + (h % TH) * sth + (w % TW) * stw

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, CI, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < CI
            mask_kp = mask_k[:, None] & mask_p[None, :]
            k64 = offs_k[:, None].to(tl.int64)  # channel offsets pass 2^31 at 4K inputs
            s = tl.load(x_ptr + k64 * sxc + x_sp[None, :], mask=mask_kp, other=0.0).to(tl.float32)
            if HAS_ADDEND:
                s += tl.load(a_ptr + k64 * sac + a_sp[None, :], mask=mask_kp, other=0.0).to(tl.float32)
            if HAS_TILED:
                s += tl.load(t_ptr + k64 * stc + t_sp[None, :], mask=mask_kp, other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + offs_m[:, None] * CI + offs_k[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = _dot(wt, s, acc, PRECISION)

        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        mask_mp = mask_m[:, None] & mask_p[None, :]
        if HAS_RESIDUAL:
            r_sp = pid_b * srb + h * srh + w * srw
            acc += tl.load(r_ptr + offs_m[:, None] * src + r_sp[None, :], mask=mask_mp, other=0.0).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        o_sp = pid_b * sob + h * soh + w * sow
        tl.store(out_ptr + offs_m[:, None] * soc + o_sp[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_mp)


def kernel_configs():
    """Every (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the launcher may pick.

    None spills registers on sm_80 or sm_90 in any precision (tests/test_aot_compile.py).
    """
    return [(64, 128, 16, 8, 3), (32, 64, 32, 4, 3), (16, 64, 32, 4, 3)]


def _pick_config(co: int):
    configs = kernel_configs()
    return configs[0] if co >= 64 else configs[1] if co >= 32 else configs[2]


def _pointwise_conv_triton(x, weight, bias, addend, tiled, residual, relu, out, precision):
    b, ci, h, w = x.shape
    co = weight.shape[0]
    p = h * w
    block_m, block_n, block_k, num_warps, num_stages = _pick_config(co)
    grid = (triton.cdiv(p, block_n), triton.cdiv(co, block_m), b)
    a = addend if addend is not None else x
    t = tiled if tiled is not None else x
    r = residual if residual is not None else out
    _pointwise_conv_kernel[grid](
        x, a, t, weight, bias if bias is not None else weight, r, out,
        ci, co, w, p, t.shape[2], t.shape[3],
        *x.stride(), *a.stride(), *t.stride(), *r.stride(), *out.stride(),
        HAS_ADDEND=addend is not None, HAS_TILED=tiled is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, RELU=relu, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def pointwise_conv(x, weight, bias=None, *, addend=None, tiled=None, residual=None, relu=False, out=None,
                   precision=None, backend=None):
    """act(W @ (x + addend + tile(tiled)) + bias + residual) over channels, into ``out``.

    ``x`` (B, Ci, H, W); ``weight`` (Co, Ci) fp32; ``bias`` (Co,) fp32; ``addend`` like ``x``;
    ``tiled`` (B, Ci, H/k, W/k) repeated k times along each spatial axis; ``residual`` and
    ``out`` (B, Co, H, W), ``out`` defaulting to a new tensor of x's dtype.
    """
    check_tensor("x", x, dtypes=_FLOAT_DTYPES, ndim=4)
    b, ci, h, w = x.shape
    check_tensor("weight", weight, dtypes=(torch.float32,), ndim=2, device=x.device)
    co = weight.shape[0]
    check_shape("weight", weight, (co, ci))
    if bias is not None:
        check_tensor("bias", bias, dtypes=(torch.float32,), ndim=1, device=x.device)
        check_shape("bias", bias, (co,))
    if addend is not None:
        check_tensor("addend", addend, dtypes=_FLOAT_DTYPES, ndim=4, device=x.device)
        check_shape("addend", addend, (b, ci, h, w))
    if tiled is not None:
        check_tensor("tiled", tiled, dtypes=_FLOAT_DTYPES, ndim=4, device=x.device)
        th, tw = tiled.shape[2:]
        if tiled.shape[:2] != (b, ci) or th == 0 or tw == 0 or h % th or w % tw:
            raise ValueError(f"tiled must have shape ({b}, {ci}, H/k, W/k) tiling ({h}, {w}), "
                             f"got {tuple(tiled.shape)}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=_FLOAT_DTYPES, ndim=4, device=x.device)
        check_shape("residual", residual, (b, co, h, w))
    if out is None:
        out = torch.empty((b, co, h, w), dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, dtypes=_FLOAT_DTYPES, ndim=4, device=x.device)
        check_shape("out", out, (b, co, h, w))
    backend = backend or backends.select(x.device)
    precision = triton_dot_precision(precision or backends.matmul_precision(), x.dtype)
    bias = None if bias is None else bias.contiguous()
    torch.ops.ffc_kernels.pointwise_conv_(x, weight.contiguous(), bias, addend, tiled, residual, relu, out,
                                          precision, backend)
    return out


# One opaque op for torch.compile and CUDA graphs; it writes into ``out`` and returns nothing.
@torch.library.custom_op("ffc_kernels::pointwise_conv_", mutates_args=("out",))
def _pointwise_conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, addend: torch.Tensor | None,
                       tiled: torch.Tensor | None, residual: torch.Tensor | None, relu: bool, out: torch.Tensor,
                       precision: str, backend: str) -> None:
    if backend == "torch":
        _pointwise_conv_torch(x, weight, bias, addend, tiled, residual, relu, out)
    else:
        _pointwise_conv_triton(x, weight, bias, addend, tiled, residual, relu, out, precision)


@_pointwise_conv_op.register_fake
def _(x, weight, bias, addend, tiled, residual, relu, out, precision, backend):
    return None
