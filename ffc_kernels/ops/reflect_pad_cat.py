"""reflection_pad(cat(tensors, dim=1), pad) for channels_last CUDA tensors in one pass.

The residual blocks' exchange convolution reads [x_l | x_g] reflect-padded by one pixel. As copies
(``dense.reflect_pad_cat``'s torch form: each tensor into a channel slice of the padded buffer,
then the border rows and columns) that is six strided-copy kernels per FFC, which torch runs with
its generic, unvectorised element loop: on an H100 at 2048² (bf16) 330 of them took 11.8 ms of a
50 ms forward, where the bytes (64 MB read, 68 MB written per FFC) need about 45 µs each.

Here every output pixel reads its mirrored source pixel: program (p, c) covers BLOCK_P padded
pixels of one tensor and BLOCK_C of its channels, contiguous in channels_last, so loads and
stores are whole 16-byte vectors. One launch per input tensor, each writing its channel slice.
``reflect_pad_cat_reference`` is the math it must equal (exactly: it only moves elements).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ffc_kernels.ops._common import on_device, triton_interpret

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch form runs instead
    triton = None

__all__ = ["reflect_pad_cat_reference", "reflect_pad_cat_triton", "triton_applies"]


def reflect_pad_cat_reference(tensors, pad: int) -> torch.Tensor:
    """torch's own: cat along channels, then reflection padding."""
    return F.pad(torch.cat(list(tensors), dim=1), (pad,) * 4, mode="reflect")


def triton_applies(tensors) -> bool:
    """Whether the kernel takes this call: CUDA (or the interpreter's CPU) channels_last tensors
    of one dtype and batch and plane, and no gradient to record (the kernel has no backward)."""
    if triton is None:
        return False
    first = tensors[0]
    if first.device.type != "cuda" and not triton_interpret():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.dtype == first.dtype and t.device == first.device and t.dim() == 4
               and t.shape[0] == first.shape[0] and t.shape[2:] == first.shape[2:]
               and t.is_contiguous(memory_format=torch.channels_last) for t in tensors)


if triton is not None:

    @triton.jit
    def _reflect_pad_kernel(x_ptr, out_ptr, pixels, H, W, C, C_OUT, c_offset, PAD: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[n, c_offset + c, i, j] = x[n, c, reflect(i - PAD), reflect(j - PAD)], NHWC memory."""
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # past 2^31 padded pixels too
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        wp = W + 2 * PAD
        plane = (H + 2 * PAD) * wp
        n = p // plane
        i = (p % plane) // wp - PAD
        j = p % wp - PAD
        i = tl.where(i < 0, -i, i)
        i = tl.where(i >= H, 2 * H - 2 - i, i)
        j = tl.where(j < 0, -j, j)
        j = tl.where(j >= W, 2 * W - 2 - j, j)
        src = ((n * H + i) * W + j) * C
        dst = p * C_OUT + c_offset
        mask = (p < pixels)[:, None] & (c < C)[None, :]
        v = tl.load(x_ptr + src[:, None] + c[None, :], mask=mask)
        tl.store(out_ptr + dst[:, None] + c[None, :], v, mask=mask)


def _blocks(channels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): up to 128 channels a row, 4096 elements a program."""
    block_c = min(128, triton.next_power_of_2(channels))
    return 4096 // block_c, block_c


def reflect_pad_cat_triton(tensors, pad: int) -> torch.Tensor:
    """The kernel's result; ``triton_applies(tensors)`` must hold and 0 < pad < H, W."""
    n, _, h, w = tensors[0].shape
    if not 0 < pad < min(h, w) or not triton_applies(tensors):
        raise ValueError(f"reflect_pad_cat's kernel takes channels_last tensors of one dtype, batch and plane, "
                         f"and 0 < pad < H, W; got pad {pad} for {[tuple(t.shape) for t in tensors]}")
    channels = sum(t.shape[1] for t in tensors)
    out = torch.empty(n, channels, h + 2 * pad, w + 2 * pad, dtype=tensors[0].dtype, device=tensors[0].device,
                      memory_format=torch.channels_last)
    pixels = n * (h + 2 * pad) * (w + 2 * pad)
    start = 0
    for t in tensors:
        c = t.shape[1]
        if c:
            block_p, block_c = _blocks(c)
            grid = (triton.cdiv(pixels, block_p), triton.cdiv(c, block_c))
            with on_device(t):
                _reflect_pad_kernel[grid](t, out, pixels, h, w, c, channels, start, PAD=pad, BLOCK_P=block_p,
                                          BLOCK_C=block_c)
        start += c
    return out


# One opaque op for torch.compile and CUDA graphs; the fake kernel gives the output's metadata.
@torch.library.custom_op("ffc_kernels::reflect_pad_cat", mutates_args=())
def _reflect_pad_cat_op(tensors: list[torch.Tensor], pad: int) -> torch.Tensor:
    return reflect_pad_cat_triton(tensors, pad)


@_reflect_pad_cat_op.register_fake
def _(tensors, pad):
    n, _, h, w = tensors[0].shape
    return tensors[0].new_empty((n, sum(t.shape[1] for t in tensors), h + 2 * pad, w + 2 * pad)).contiguous(
        memory_format=torch.channels_last)
