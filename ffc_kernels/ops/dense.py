"""Convolutions and GEMMs with their epilogues fused, and reflection padding without a pad pass.

What is fused. LaMa's layers end in bias + ReLU, and the FFC's local output sums two
convolutions; run as torch ops each of those is a pass over the output. On the CPU, oneDNN's
fused primitives (the ones torch.compile's CPU backend emits) apply them while the output is
still in cache:
    conv2d(x, w, b) [+ other] [-> ReLU]       ``torch.ops.mkldnn._convolution_pointwise``
    x @ w.T + b [-> ReLU]                     ``torch.ops.mkldnn._linear_pointwise``
Elsewhere (CUDA, a torch without oneDNN, or under torch.compile) the same math runs as conv2d /
addmm followed by in-place add and ReLU (cuDNN and cuBLAS fuse the bias).

Reflection padding. LaMa pads with ``reflect`` before most convolutions; a pad is a full copy
of the activation (about 100 ms for a 64-channel 512x512 fp32 image on two CPU cores, as
much as a large convolution). ``reflect_conv2d`` runs the convolution with zero padding
instead and recomputes only the output rows and columns that read the padding, from small
reflect-padded strips: exact, and about 1-2% of the convolution's work at LaMa's full
resolution. Small planes (the 1/8-resolution blocks) take the plain pad, which is cheaper there;
on CUDA a channels_last pad is ``reflect_pad_cat``, one Triton pass (on an H200, torch's reflection
pad of a 64-channel 2048x2048 bf16 channels_last tensor plus the convolution took 7.8 ms, against
0.8 ms with border recomputation and 2.8 ms for the same pad and convolution in NCHW).

Few output channels. oneDNN vectorises a convolution over its output channels, so LaMa's last
layer (64 -> 3 channels, 7x7) runs at a fifth of the machine's rate. Seen on 2x2 pixel blocks
(space to depth: 4x the input channels, 4x the output channels, a 4x4 kernel on a half-size
grid), the same convolution has 12 output channels and runs about 3x faster, for 1.3x the
multiply-adds: ``space_to_depth_weight`` and ``reflect_conv2d(..., s2d=...)``.

Layout: activations channels_last (any layout works; channels_last is the fast one), weights
(Co, Ci, kh, kw). Data fp32 or bf16 with weights of the same dtype; fp32 accumulation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ffc_kernels import backends
from ffc_kernels.ops import reflect_pad_cat as reflect_pad_cat_op

__all__ = ["conv2d", "conv2d_input", "linear", "reflect_conv2d", "reflect_pad_adjoint", "reflect_pad_cat",
           "space_to_depth_weight", "FIXUP_MIN_PIXELS"]

# Planes at least this large use zero padding plus border recomputation instead of a pad pass.
FIXUP_MIN_PIXELS = 128 * 128


@torch.compiler.assume_constant_result
def _onednn_enabled() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _mkldnn(x: torch.Tensor) -> bool:
    # Under torch.compile the plain ops are traced (oneDNN's fused ops have no fake kernels, and
    # the compiler fuses epilogues itself); so are inputs that need gradients (no autograd either).
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _onednn_enabled()
            and not torch.compiler.is_compiling() and not (x.requires_grad and torch.is_grad_enabled()))


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), *, relu=False, add=None):
    """relu?(conv2d(x, weight, bias) + add?) with zero padding; ``add`` is a tensor of the output's shape."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if _mkldnn(x):
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, 1,
                                                           "relu" if relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, weight, bias, padding, stride, dilation, 1,
                                                              "add", 1.0, "relu" if relu else None, [], "")
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    if add is not None:
        y += add
    return y.relu_() if relu else y


def conv2d_input(input_shape, weight, grad, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """The gradient of conv2d's input (of shape ``input_shape``) from its output's ``grad``: the
    transposed convolution, ``torch.nn.grad.conv2d_input``. On oneDNN a stride-1 one runs instead
    as the forward convolution by the flipped, transposed kernel, which oneDNN does faster than
    its backward-data (2 EPYC cores: LaMa's last layer, 64 -> 3 channels 7x7 at 768², 452 -> 126 ms;
    a residual block's 512 -> 128 3x3 at 96², 70 -> 53 ms in fp32 and 40 -> 28 ms in bf16)."""
    (kh, kw), (dh, dw), (ph, pw) = weight.shape[-2:], dilation, padding
    if _mkldnn(grad) and tuple(stride) == (1, 1) and ph <= dh * (kh - 1) and pw <= dw * (kw - 1):
        flipped = weight.flip(2, 3).transpose(0, 1).contiguous(memory_format=torch.channels_last)
        return conv2d(grad, flipped, None, (1, 1), (dh * (kh - 1) - ph, dw * (kw - 1) - pw), dilation)
    return torch.nn.grad.conv2d_input(input_shape, weight, grad, stride, padding, dilation)


def linear(x, weight, bias=None, *, relu=False):
    """relu?(x @ weight.T + bias) for a 2-d ``x``; ``weight`` is (out, in)."""
    if _mkldnn(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
    y = F.linear(x, weight, bias)
    return y.relu_() if relu else y


def reflect_pad_cat(tensors, pad: int):
    """reflection_pad(cat(tensors, dim=1), pad) into one channels_last buffer: on CUDA one Triton
    pass (``ops.reflect_pad_cat``); else each tensor is copied once into the interior, then the
    borders are filled from it."""
    n, _, h, w = tensors[0].shape
    channels = sum(t.shape[1] for t in tensors)
    if pad >= h or pad >= w:
        raise ValueError(f"reflection padding {pad} needs planes larger than {pad}, got {h}x{w}")
    if pad > 0 and reflect_pad_cat_op.triton_applies(tensors) and backends.select(tensors[0].device) == "triton":
        return torch.ops.ffc_kernels.reflect_pad_cat(list(tensors), pad)
    out = torch.empty(n, channels, h + 2 * pad, w + 2 * pad, dtype=tensors[0].dtype, device=tensors[0].device,
                      memory_format=torch.channels_last)
    start = 0
    for t in tensors:
        out[:, start:start + t.shape[1], pad:pad + h, pad:pad + w] = t
        start += t.shape[1]
    for i in range(pad):  # rows, then whole columns (the corners with them)
        out[:, :, pad - 1 - i, pad:pad + w] = out[:, :, pad + 1 + i, pad:pad + w]
        out[:, :, pad + h + i, pad:pad + w] = out[:, :, pad + h - 2 - i, pad:pad + w]
    for i in range(pad):
        out[:, :, :, pad - 1 - i] = out[:, :, :, pad + 1 + i]
        out[:, :, :, pad + w + i] = out[:, :, :, pad + w - 2 - i]
    return out


def reflect_pad_adjoint(grad, pad: int, *, overwrite: bool = False):
    """The gradient of x from that of reflection_pad(x, pad): the interior, plus each padded row
    and column added onto the one it mirrors (the corners onto both mirrors). One copy of the
    interior (channels_last) and thin strips, where torch's reflection_pad2d_backward zeroes,
    scatters and copies the whole plane. ``overwrite``: no copy; the strips are added into
    ``grad``'s own interior, returned as a view (``grad`` is the caller's to spend)."""
    hp, wp = grad.shape[-2:]
    h, w = hp - 2 * pad, wp - 2 * pad
    out = grad[:, :, pad:pad + h, pad:pad + w]
    if not overwrite:
        out = out.clone(memory_format=torch.channels_last)
    # In place, exact all the same: every strip read lies in the padding, which nothing writes.

    def mirrors(n):  # (padded index, the index it mirrors) along an axis of n pixels
        return [(pad - 1 - i, 1 + i) for i in range(pad)] + [(pad + n + i, n - 2 - i) for i in range(pad)]

    for src, dst in mirrors(h):
        out[:, :, dst] += grad[:, :, src, pad:pad + w]
    for src_c, dst_c in mirrors(w):
        out[:, :, :, dst_c] += grad[:, :, pad:pad + h, src_c]
        for src_r, dst_r in mirrors(h):
            out[:, :, dst_r, dst_c] += grad[:, :, src_r, src_c]
    return out


def _band(size: int, pad: int, extent: int, stride: int):
    """Output index ranges [0, top) and [bottom, out) that read padding along one axis."""
    out = (size + 2 * pad - extent) // stride + 1
    top = min(out, -(-pad // stride))
    bottom = max(top, (size - extent + pad) // stride + 1)
    return out, top, bottom


def _pads_whole_plane(x, pad, kernel_extent) -> bool:
    h, w = x.shape[-2:]
    # Border recomputation needs the padding to be at most the kernel's half-width (LaMa's is).
    return h * w < FIXUP_MIN_PIXELS or min(h, w) <= 4 * pad + kernel_extent or 2 * pad > kernel_extent - 1


def prepad(x, pad, kernel_extent):
    """``x`` reflect-padded if ``reflect_conv2d`` would pad the whole plane anyway, else None:
    convolutions that share an input then share one pad."""
    if pad and _pads_whole_plane(x, pad, kernel_extent):
        if x.is_cuda and x.is_contiguous(memory_format=torch.channels_last):
            # torch's CUDA reflection pad is ~10x slower on channels_last than even the copies (H200).
            return reflect_pad_cat((x,), pad)
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return None


def space_to_depth_weight(weight, bias=None):
    """Weight and bias of a stride-1 "same" convolution (odd kernel K, zero padding (K-1)/2) seen
    on 2x2 blocks: ((4 Co, 4 Ci, 4, 4), (4 Co,) or None) for ``_s2d_conv2d``; None when K > 7 or
    K is even.

    Block (a, b) of the input holds x[2a + qy - 1, 2b + qx - 1] in channel (qy, qx, ci); output
    channel (py, px, co) of block (i, j) is the output pixel (2i + py, 2j + px). Tap (jy, jx) of
    the 4x4 kernel (block offset jy - 1 in -1..2) carries w[co, ci, ky, kx], ky = 2 (jy - 1) + qy - 1 - py + p.
    """
    co, ci, kh, kw = weight.shape
    if kh != kw or kh % 2 == 0 or kh > 7:
        return None
    p = kh // 2
    w = weight.new_zeros(2, 2, co, 2, 2, ci, 4, 4)
    for py in range(2):
        for px in range(2):
            for qy in range(2):
                for qx in range(2):
                    for jy in range(4):
                        ky = 2 * (jy - 1) + qy - 1 - py + p
                        for jx in range(4):
                            kx = 2 * (jx - 1) + qx - 1 - px + p
                            if 0 <= ky < kh and 0 <= kx < kw:
                                w[py, px, :, qy, qx, :, jy, jx] = weight[:, :, ky, kx]
    return (w.reshape(4 * co, 4 * ci, 4, 4).contiguous(memory_format=torch.channels_last),
            None if bias is None else bias.repeat(4))


def _s2d_conv2d(x, s2d, relu):
    """conv2d(x, weight, bias, padding=(K-1)/2) through ``space_to_depth_weight``'s form; H, W even."""
    n, ci, h, w = x.shape
    hb, wb = h // 2, w // 2
    # Blocks shifted by one pixel: block (a, b) starts at (2a - 1, 2b - 1); the row and column
    # that fall outside the image are zero.
    blocks = x.new_empty(n, hb + 1, wb + 1, 2, 2, ci)
    xv = x.permute(0, 2, 3, 1)  # NHWC view of channels_last
    blocks[:, :hb, :wb, 1, 1] = xv[:, 0::2, 0::2]
    blocks[:, 1:, :wb, 0, 1] = xv[:, 1::2, 0::2]
    blocks[:, :hb, 1:, 1, 0] = xv[:, 0::2, 1::2]
    blocks[:, 1:, 1:, 0, 0] = xv[:, 1::2, 1::2]
    blocks[:, 0, :, 0] = 0
    blocks[:, hb, :, 1] = 0
    blocks[:, :, 0, :, 0] = 0
    blocks[:, :, wb, :, 1] = 0
    blocks = blocks.view(n, hb + 1, wb + 1, 4 * ci).permute(0, 3, 1, 2)  # channels_last (n, 4ci, hb+1, wb+1)
    w_s2d, b_s2d = s2d
    co = w_s2d.shape[0] // 4
    y = conv2d(blocks, w_s2d, b_s2d, padding=(1, 1), relu=relu)
    out = torch.empty(n, co, h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    out.permute(0, 2, 3, 1).view(n, hb, 2, wb, 2, co).copy_(
        y.permute(0, 2, 3, 1).view(n, hb, wb, 2, 2, co).permute(0, 1, 3, 2, 4, 5))
    return out


def reflect_conv2d(x, weight, bias=None, pad=0, stride=(1, 1), dilation=(1, 1), *, relu=False, add=None,
                   padded=None, s2d=None):
    """relu?(conv2d(reflection_pad(x, pad), weight, bias) + add?), exactly, without padding the whole of x.

    ``padded``: ``prepad(x, pad, ...)`` when the caller already has it. ``s2d``:
    ``space_to_depth_weight(weight, bias)`` for a stride-1 convolution with few output channels.
    """
    h, w = x.shape[-2:]
    if pad == 0:
        return conv2d(x, weight, bias, stride, (0, 0), dilation, relu=relu, add=add)
    if torch.is_grad_enabled() and x.requires_grad:
        # Under autograd the strips' in-place writes would each keep and copy the whole output:
        # one pad and one convolution have the cheaper backward.
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    if padded is None:
        padded = prepad(x, pad, (weight.shape[-1] - 1) * max(dilation) + 1)
    if padded is not None:
        return conv2d(padded, weight, bias, stride, (0, 0), dilation, relu=relu, add=add)
    if (s2d is not None and add is None and h % 2 == 0 and w % 2 == 0 and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1) and 2 * pad + 1 == weight.shape[-1]):
        y = _s2d_conv2d(x, s2d, relu)
    else:
        y = conv2d(x, weight, bias, stride, (pad, pad), dilation, relu=relu, add=add)
    (sh, sw), (dh, dw) = stride, dilation
    eh, ew = (weight.shape[-2] - 1) * dh + 1, (weight.shape[-1] - 1) * dw + 1
    for axis, size, s, e in ((2, h, sh, eh), (3, w, sw, ew)):
        out, top, bottom = _band(size, pad, e, s)
        for start, stop in ((0, top), (bottom, out)):
            if start >= stop:
                continue
            # Input rows (or columns) [lo, hi) in padded coordinates feed output [start, stop).
            lo, hi = start * s - pad, (stop - 1) * s + e - pad
            strip = x.narrow(axis, max(lo, 0), min(hi, size) - max(lo, 0))
            before, after = max(0, -lo), max(0, hi - size)
            pads = (pad, pad, before, after) if axis == 2 else (before, after, pad, pad)
            band_add = None if add is None else add.narrow(axis, start, stop - start)
            band = conv2d(F.pad(strip, pads, mode="reflect"), weight, bias, stride, (0, 0), dilation, relu=relu,
                          add=band_add)
            y.narrow(axis, start, stop - start).copy_(band)
    return y
