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
That is one pass over each operand because the grid runs the output-channel tiles of one spatial tile
side by side: the input tile comes from HBM once and from L2 for the other output channels (spatial
tiles fastest would read it once per output-channel tile, 3x for LaMa's 384 channels in 128-row tiles).

Dots: one dot per K step into one accumulator (``mma_dot``: fp32-class as split TF32 over
K-concatenated operands, TF32, bf16), which keeps one MMA layout and a handful of barriers on sm_90;
launch configs per architecture in ``_CONFIGS``, each compiled and checked by ``ffc_kernels.aot``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ffc_kernels import backends, measured
from ffc_kernels.ops._common import (check_shape, check_tensor, on_device, torch_allows_tf32,
                                     triton_dot_precision)

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
    from ffc_kernels.ops._common import mma_dot

    @triton.jit
    def _plane_offsets(p, h, w, stride_h, stride_w, FLAT: tl.constexpr):
        if FLAT:
            return p * stride_w
        return h * stride_h + w * stride_w

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
        HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr, FLAT_PLANES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Output-channel tiles vary fastest: the programs that read one input tile run side by
        # side, so the tile comes from HBM once and from L2 for the other output channels. One
        # flat axis, since the spatial tile count can pass the 65535 limit of axes 1 and 2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(CO, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        pid_b = tl.program_id(1).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < CO
        mask_p = offs_p < P
        h = offs_p // W
        w = offs_p % W

        # Addresses are a 64-bit base per program and channel row plus 32-bit offsets within one
        # image plane (the launcher sends larger planes to torch); channel offsets stay 64-bit (a
        # channel stride times a channel index passes 2^31 at 4K). With FLAT_PLANES (every plane but
        # the tiled one a single run, stride_h = W stride_w: NCHW, channels_last, channel slices)
        # pixel p sits at p stride_w, with no per-pixel (p // W, p % W) arithmetic. Where W is not a
        # multiple of 16 (most photos), 64-bit per-element offsets spill 64-440 bytes in conv2 under
        # Triton 3.6, and (h, w) offsets 44-88 bytes in the LFU variant.
        x_sp = _plane_offsets(offs_p, h, w, sxh, sxw, FLAT_PLANES)
        x_base = x_ptr + pid_b * sxb
        if HAS_ADDEND:
            a_sp = _plane_offsets(offs_p, h, w, sah, saw, FLAT_PLANES)
            a_base = a_ptr + pid_b * sab
        if HAS_TILED:
            t_sp = (h % TH) * sth + (w % TW) * stw
            t_base = t_ptr + pid_b * stb
        w_rows = w_ptr + offs_m.to(tl.int64)[:, None] * CI

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, CI, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < CI
            mask_kp = mask_k[:, None] & mask_p[None, :]
            k64 = offs_k.to(tl.int64)[:, None]
            s = tl.load(x_base + k64 * sxc + x_sp[None, :], mask=mask_kp, other=0.0).to(tl.float32)
            if HAS_ADDEND:
                s += tl.load(a_base + k64 * sac + a_sp[None, :], mask=mask_kp, other=0.0).to(tl.float32)
            if HAS_TILED:
                s += tl.load(t_base + k64 * stc + t_sp[None, :], mask=mask_kp, other=0.0).to(tl.float32)
            wt = tl.load(w_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = mma_dot(wt, s, acc, PRECISION)

        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        mask_mp = mask_m[:, None] & mask_p[None, :]
        m64 = offs_m.to(tl.int64)[:, None]
        if HAS_RESIDUAL:
            r_sp = _plane_offsets(offs_p, h, w, srh, srw, FLAT_PLANES)
            acc += tl.load(r_ptr + pid_b * srb + m64 * src + r_sp[None, :], mask=mask_mp, other=0.0).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        o_sp = _plane_offsets(offs_p, h, w, soh, sow, FLAT_PLANES)
        tl.store(out_ptr + pid_b * sob + m64 * soc + o_sp[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_mp)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per architecture and dot precision, for LaMa's
# SpectralTransform (192 and 384 channels); every one is compiled for its architecture by
# ffc_kernels.aot and checked there for spills, shared memory, one MMA layout and few barriers.
# sm_86 and sm_89 (RTX 30/40) have 99 KB of shared memory per block and no wgmma; split TF32
# multiplies over four times the K extent, so it takes half of BLOCK_K. 64-row tiles on 8 warps
# everywhere: 128-row tiles spill 140-290 bytes in conv2 where W is not a multiple of 16 (most
# photos), and 4 warps spill in the LFU variant under Triton 3.6.
_CONFIGS = {
    80: {"tf32x3": (64, 128, 16, 8, 3), "tf32": (64, 128, 32, 8, 3), "bf16": (64, 128, 32, 8, 3)},
    86: {"tf32x3": (64, 128, 16, 8, 2), "tf32": (64, 128, 32, 8, 2), "bf16": (64, 128, 32, 8, 2)},
    89: {"tf32x3": (64, 128, 16, 8, 2), "tf32": (64, 128, 32, 8, 2), "bf16": (64, 128, 32, 8, 2)},
    90: {"tf32x3": (64, 128, 16, 8, 3), "tf32": (64, 128, 32, 8, 3), "bf16": (64, 128, 32, 8, 3)},
}


def kernel_configs(arch: int, precision: str):
    """The launch configs the launcher may pick on ``arch`` (80, 86, 89, 90) for a dot ``precision``."""
    precision = precision.removesuffix("_emulated")
    # fp16 tiles have bf16's size and lower to the same instructions.
    return [_CONFIGS[arch]["bf16" if precision == "fp16" else precision]]


def _config_arch(device: torch.device) -> int:
    """The _CONFIGS row for a device: its own, else the most conservative one (99 KB, no wgmma)."""
    if device.type != "cuda":
        return 80  # Triton's interpreter: any row computes the same
    major, minor = torch.cuda.get_device_capability(device)
    return {(8, 0): 80, (8, 6): 86, (8, 9): 89, (9, 0): 90}.get((major, minor), 89)


def _pointwise_conv_triton(x, weight, bias, addend, tiled, residual, relu, out, precision):
    b, ci, h, w = x.shape
    co = weight.shape[0]
    p = h * w
    block_m, block_n, block_k, num_warps, num_stages = kernel_configs(_config_arch(x.device), precision)[0]
    grid = (triton.cdiv(co, block_m) * triton.cdiv(p, block_n), b)
    a = addend if addend is not None else x
    t = tiled if tiled is not None else x
    r = residual if residual is not None else out
    flat = all(t.stride(2) == w * t.stride(3) for t in (x, a, r, out))
    with on_device(x):
        _pointwise_conv_kernel[grid](
            x, a, t, weight, bias if bias is not None else weight, r, out,
            ci, co, w, p, t.shape[2], t.shape[3],
            *x.stride(), *a.stride(), *t.stride(), *r.stride(), *out.stride(),
            HAS_ADDEND=addend is not None, HAS_TILED=tiled is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, RELU=relu, PRECISION=precision, FLAT_PLANES=flat,
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
    Differentiable (see ``_PointwiseConvFunction``) when an input or a weight requires grad.
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (x, weight, bias, addend, tiled, residual)):
        return _pointwise_conv_autograd(x, weight, bias, addend, tiled, residual, relu, out, precision, backend)
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
    precision = triton_dot_precision(precision or backends.matmul_precision(), x.dtype)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if backend is None:
        # Timing runs write a scratch output: ``residual`` may be ``out`` itself (accumulated in place).
        def trial(candidate):
            scratch = torch.empty_like(out)
            torch.ops.ffc_kernels.pointwise_conv_(x, weight, bias, addend, tiled, residual, relu, scratch,
                                                  precision, candidate)
            return scratch

        backend = backends.select(
            x.device, op="pointwise_conv", trial=trial, tolerance=measured.TOLERANCE[precision],
            shape=(str(x.dtype).removeprefix("torch."), precision, ci, co, measured.size_class(b * h * w),
                   addend is not None, tiled is not None, residual is not None,
                   x.is_contiguous(memory_format=torch.channels_last)))
    torch.ops.ffc_kernels.pointwise_conv_(x, weight, bias, addend, tiled, residual, relu, out, precision, backend)
    return out


# One opaque op for torch.compile and CUDA graphs; it writes into ``out`` and returns nothing.
@torch.library.custom_op("ffc_kernels::pointwise_conv_", mutates_args=("out",))
def _pointwise_conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, addend: torch.Tensor | None,
                       tiled: torch.Tensor | None, residual: torch.Tensor | None, relu: bool, out: torch.Tensor,
                       precision: str, backend: str) -> None:
    if backend == "torch" or not all(_plane_offsets_fit_int32(t) for t in (x, addend, tiled, residual, out)):
        with backends.cuda_fp32_precision(x.device, allow_tf32=torch_allows_tf32(precision)):
            _pointwise_conv_torch(x, weight, bias, addend, tiled, residual, relu, out)
    else:
        _pointwise_conv_triton(x, weight, bias, addend, tiled, residual, relu, out, precision)


def _plane_offsets_fit_int32(t: torch.Tensor | None) -> bool:
    # The kernel addresses an (H, W) plane with 32-bit offsets; only a plane spanning 2^31
    # elements (channels_last with about 2^31 / C pixels) needs the torch path.
    return t is None or sum((n - 1) * abs(s) for n, s in zip(t.shape[2:], t.stride()[2:])) < 2**31


@_pointwise_conv_op.register_fake
def _(x, weight, bias, addend, tiled, residual, relu, out, precision, backend):
    return None


# Backward. ``pointwise_conv_`` writes into ``out``, and torch.library's autograd takes no
# mutating op, so inputs that need gradients go through this Function, whose forward is the op.
# With s = x + addend + tile(tiled) and g the output gradient masked by the ReLU (kept as bools):
#     d s = W^T g        the same op with the transposed weight, on the same kernels
#     d tiled = d s summed over the tile repeats; d residual = g
#     d W = g s^T over pixels and d bias = sum g: GEMMs, only when the weights need them (s is
#     then recomputed from the kept inputs).
class _PointwiseConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, addend, tiled, residual, relu, precision, backend):
        out = pointwise_conv(x, weight, bias, addend=addend, tiled=tiled, residual=residual, relu=relu,
                             precision=precision, backend=backend)
        ctx.options = (precision, backend)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, addend, tiled, residual))
        ctx.tile = None if tiled is None else tuple(tiled.shape[2:])
        keep = weight.requires_grad
        ctx.save_for_backward(weight, out > 0 if relu else None, x if keep else None,
                              addend if keep else None, tiled if keep else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, mask, x, addend, tiled = ctx.saved_tensors
        precision, backend = ctx.options
        x_dtype, addend_dtype, tiled_dtype, residual_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        g = grad.float() if mask is None else grad.float() * mask
        d_x = d_weight = d_bias = d_addend = d_tiled = d_residual = None
        if need[0] or need[3] or need[4]:
            d_s = pointwise_conv(g, weight.t().contiguous(), None, precision=precision, backend=backend)
            d_x = d_s.to(x_dtype) if need[0] else None
            d_addend = d_s.to(addend_dtype) if need[3] else None
            if need[4]:
                b, c, h, w = d_s.shape
                th, tw = ctx.tile
                d_tiled = d_s.view(b, c, h // th, th, w // tw, tw).sum(dim=(2, 4)).to(tiled_dtype)
        if need[1]:
            s = x.float()
            if addend is not None:
                s = s + addend.float()
            if tiled is not None:
                s = s + tiled.float().repeat(1, 1, x.shape[2] // tiled.shape[2], x.shape[3] // tiled.shape[3])
            d_weight = torch.einsum("bohw,bchw->oc", g, s)
        if need[2]:
            d_bias = g.sum(dim=(0, 2, 3))
        if need[5]:
            d_residual = g.to(residual_dtype)
        return d_x, d_weight, d_bias, d_addend, d_tiled, d_residual, None, None, None


def _pointwise_conv_autograd(x, weight, bias, addend, tiled, residual, relu, out, precision, backend):
    y = _PointwiseConvFunction.apply(x, weight, bias, addend, tiled, residual, relu, precision, backend)
    return y if out is None else out.copy_(y)
