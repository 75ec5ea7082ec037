"""SpectralTransform (conv1 -> FourierUnit -> conv2, + the FFC's exchange epilogue) as GEMMs in channels_last.

What is fused. For big-lama's global branch (no LFU, no downsampling) LaMa runs, in eval:
    conv1 (1x1) -> BN -> ReLU -> rfft2 -> stack/permute -> 1x1 conv -> BN -> ReLU -> permute ->
    complex -> irfft2 -> x + fu(x) -> conv2 (1x1) -> + convl2g(x_l) -> bn_g -> act_g
In channels_last (NHWC) every 1x1 convolution is a plain GEMM over pixels, and the spectrum of
an NHWC tensor viewed as real numbers is already LaMa's stacked order (channel 2c = Re(c),
2c+1 = Im(c)), so the FourierUnit's convolution is one GEMM with LaMa's own (2Co, 2Ci) weight:
no stack, no permute, no complex(). Here:
    t = relu(x @ W1' + b1')                       one 1x1 convolution (BN folded), ReLU in its epilogue
    s = rfft2(t) over (H, W), unnormalised        pocketfft / cuFFT, fp32
    m = relu(s @ (a c W_fu') + c b_fu')           one GEMM on the interleaved spectrum
    t += irfft2(m), normalised by "forward"       ortho scales folded into the GEMM (see fourier_unit)
    out = relu(residual + t @ W2')                one 1x1 convolution, the sum and ReLU in its epilogue
``residual`` is convl2g(x_l) with its bias, conv2's bias and bn_g's shift folded into it by
the caller. The 1x1 convolutions and the GEMM are ``dense``'s: oneDNN's fused primitives on the
CPU (in channels_last a 1x1 convolution is the same GEMM, and oneDNN runs it faster as one). The reference math is
``ffc_kernels.reference.SpectralTransform`` followed by the FFC_BN_ACT epilogue.

Layout: ``x`` (N, Ci, H, W) and ``residual`` (N, Co, H, W), both contiguous channels_last
(every GEMM operand a plain matrix, no copy). Data fp32 or bf16 (weights of the same dtype);
the FFTs run in fp32 whatever the data (torch.fft has no bf16), and every GEMM accumulates in
fp32. Returns the output, a new channels_last tensor.

Bytes (fp32, C = Ci, Co = 2C, C/2 FourierUnit channels, P pixels, N ~ P/2 spectral points):
    eager (LaMa): conv1, BN, ReLU (4CP + 2 x 4CP) + FourierUnit (~48CP) + sum (6CP) + conv2
                  (6CP) + add, BN, ReLU on 2C channels (24CP)              ~ 96CP
    here: conv1 (4CP + 2CP) + channels-first copy (4CP) + rfft2 (2CP + 4CN) + spectrum transpose
          (8CN) + mix (8CN) + irfft2 (4CN + 2CP) + add (6CP) + channels-last copy (4CP)
          + conv2 into the residual (2CP + 8CP + 8CP)                      ~ 50CP
"""
from __future__ import annotations

import torch

from ffc_kernels.ops._common import check_shape, check_tensor
from ffc_kernels.ops.dense import conv2d, linear
from ffc_kernels.ops.fourier_unit import _FORWARD_SCALE, _INVERSE_SCALE

__all__ = ["spectral_transform_nhwc", "spectral_transform_nhwc_backward", "spectral_gemm_weights"]


def spectral_gemm_weights(w1, b1, w_fu, b_fu, w2, *, fft_norm, height, width, dtype):
    """The operands of ``spectral_transform_nhwc`` from folded weights, for an H x W input.

    ``w1`` (C1, Ci), ``b1`` (C1,), ``w_fu`` (2 C1, 2 C1), ``b_fu`` (2 C1,), ``w2`` (Co, C1), as
    (out, in) matrices (float64 preferably); conv1 and conv2 come back as channels_last 1x1
    convolution weights. The FourierUnit's FFT normalisation is folded into the mix (see
    ``fourier_unit``), which is why the operands depend on the spatial size.
    """
    a, c = _FORWARD_SCALE[fft_norm](height * width), _INVERSE_SCALE[fft_norm](height * width)
    as_conv = lambda w: w[:, :, None, None].to(dtype).contiguous(memory_format=torch.channels_last)  # noqa: E731
    return as_conv(w1), b1.to(dtype), (w_fu * (a * c)).to(dtype).contiguous(), (b_fu * c).to(dtype), as_conv(w2)


def spectral_transform_nhwc(x, residual, w1, b1, w_fu, b_fu, w2, *, relu=True, masks=None):
    """relu(residual + conv2(t + FourierUnit(t))) with t = relu(conv1(x)), channels_last (see header).

    Operands from ``spectral_gemm_weights`` for x's H x W. Returns a new channels_last tensor.
    ``masks``: a list to which the two inner ReLUs' masks (conv1's, the mix's) are appended, as
    bools, for ``spectral_transform_nhwc_backward``.
    """
    n, ci, h, w = x.shape
    check_tensor("residual", residual, dtypes=(x.dtype,), ndim=4, device=x.device)
    c1, co = w1.shape[0], w2.shape[0]
    check_shape("residual", residual, (n, co, h, w))
    for name, t in (("x", x), ("residual", residual)):
        if not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"{name} must be contiguous channels_last, got strides {t.stride()}")
    check_shape("w1", w1, (c1, ci, 1, 1))
    check_shape("w_fu", w_fu, (2 * c1, 2 * c1))
    t = conv2d(x, w1, b1, relu=True)  # (n, c1, h, w) channels_last
    if masks is not None:
        masks.append(t > 0)
    # The FourierUnit works on an fp32 channels-first copy: torch's CPU FFT transposes NHWC data
    # itself, more slowly, and returns channels-first results either way; the sum t + fu(t) is
    # taken there too, then turned back into channels_last for conv2 (one copy each way).
    t = t.to(torch.float32, memory_format=torch.contiguous_format)
    spec = torch.fft.rfft2(t, norm="backward")
    # Channel 2c = Re(c), 2c+1 = Im(c) per spectral point: LaMa's stacked order, one transposing
    # copy of C1 x N complex values (small next to the convolutions).
    s = torch.view_as_real(spec).permute(0, 2, 3, 1, 4).reshape(-1, 2 * c1)
    m = linear(s.to(w_fu.dtype), w_fu, b_fu, relu=True)
    if masks is not None:
        masks.append(m > 0)
    mixed = torch.view_as_complex(m.float().view(n, h, w // 2 + 1, c1, 2)).permute(0, 3, 1, 2)
    t += torch.fft.irfft2(mixed, s=(h, w), norm="forward")
    return conv2d(t.to(x.dtype, memory_format=torch.channels_last), w2, None, relu=relu, add=residual)


def spectral_transform_nhwc_backward(grad, masks, w1, w_fu, w2, *, width):
    """d x of ``spectral_transform_nhwc`` from ``grad``, the gradient of its output before the final
    ReLU (the residual's gradient is ``grad`` itself), and the ``masks`` its forward kept.

    Between its ReLUs the op is linear, so its adjoint needs nothing else: conv2's and conv1's
    adjoints are GEMMs with the transposed weights, the mix's the transposed mix (all ``dense``'s,
    as the forward's), and the FFTs' adjoints are FFTs: with unnormalised transforms,
    adjoint(irfft2) is rfft2 with the bins that stand for two (0 < k < W/2) doubled, and
    adjoint(rfft2) is irfft2 with those bins halved. The mix and its mask act bin by bin, so
    the doubling and the halving cancel and neither is applied. fp32 FFTs, GEMMs in the
    operands' dtype.
    """
    mask_t, mask_m = masks
    n, c1 = grad.shape[0], w1.shape[0]
    h = mask_t.shape[2]
    as_conv = lambda w: w.transpose(0, 1).contiguous(memory_format=torch.channels_last)  # noqa: E731
    g_u = conv2d(grad, as_conv(w2)).to(torch.float32, memory_format=torch.contiguous_format)
    spec = torch.fft.rfft2(g_u, norm="backward")
    g_m = torch.view_as_real(spec).permute(0, 2, 3, 1, 4).reshape(-1, 2 * c1).to(w_fu.dtype).mul_(mask_m)
    g_s = torch.mm(g_m, w_fu).float().view(n, h, width // 2 + 1, c1, 2)
    g_spec = torch.view_as_complex(g_s).permute(0, 3, 1, 2)
    g_t = torch.fft.irfft2(g_spec, s=(h, width), norm="forward")
    g_t = g_t.add_(g_u).to(grad.dtype, memory_format=torch.channels_last).mul_(mask_t)
    return conv2d(g_t, as_conv(w1))
