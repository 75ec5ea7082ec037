"""3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3), in fp32 on the CPU.

What it buys. The residual blocks' 3x3 convolutions (l2l + g2l over [x_l | x_g], and l2g over
x_l) are 72% of an optimized big-lama forward on the CPU, and oneDNN runs them near the
machine's fp32 peak; the only way to make them cheaper is fewer multiplications. F(4x4, 3x3)
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes each 4x4 output
tile from a 6x6 input tile with 36 multiplications per (input, output) channel pair instead of
144: the convolution becomes 36 independent GEMMs (tiles x Ci) @ (Ci x Co), 4x fewer FLOPs than
direct convolution, plus input and output transforms that are cheap matrix products.

Layout: the padded input ``x`` (N, C, H + 2, W + 2), channels_last; several convolutions that
read leading channel ranges of the same input (the FFC's local rows read all of [x_l | x_g],
convl2g reads x_l) share one input transform. Outputs (N, Co, H, W) channels_last.
Steps, per call:
    V = B^T d B for every 6x6 tile d (stride 4): one batched matmul over tiles, tile-major
    M_k = V_k @ U_k for the 36 positions k, U = G g G^T the transformed weights (precomputed)
    Y = A^T M A: one matmul, scattered into the output's 4x4 tiles; bias and ReLU after.
Sizes that are not multiples of 4 compute on a zero-extended input and are cropped.

Workspace. The transforms' temporaries are large (the tiles of a 96x96, 512-channel input are
42 MB) and, allocated fresh, each is mapped and zeroed page by page on first touch, in the kernel:
in LaMa's refinement at 768² on two CPU cores that was about a quarter of the residual blocks'
forward and backward (9.3 s an iteration, 6.9 s with the workspace). Inside ``with workspace():``
they live in per-thread buffers kept for the scope and reused by every call in it; outside one
they are allocated per call. Outputs are always fresh tensors.

Accuracy. The transforms' coefficients (up to 5 and 1/24) cost a few bits: on LaMa's shapes the
result differs from the exact one by about 10x the error of direct fp32 convolution (relative
1e-5), which end to end stays within big-lama's fp32 tolerance (1e-4 on the output; measured
about 3e-5). Only fp32 uses it: in bf16 the GEMM outputs are rounded to bf16 before the output
transform, whose coefficients (up to 64 in 2-d) amplify that rounding (big-lama fell to 39 dB PSNR;
F(2x2, 3x3) kept 43 dB but ran slower than oneDNN's direct bf16 convolution).

Bytes and FLOPs (C in, Co out, P output pixels, T = P/16 tiles): direct 18 C Co P FLOPs;
here 72 C Co T = 4.5 C Co P FLOPs in the GEMMs, plus the input transform (read ~2.25 CP via the
tiles, write 2.25 CP) and the output transform (2.25 Co P read, Co P written).
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F

__all__ = ["winograd_weight", "winograd_conv2d", "winograd_conv2d_input_grad", "workspace", "TILE"]

TILE = 4  # output tile side: F(4x4, 3x3)
_A = TILE + 2  # input tile side

# Lavin & Gray's F(4, 3) matrices (interpolation points 0, 1, -1, 2, -2, infinity).
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
       (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))

_transforms: dict = {}
_local = threading.local()  # depth: nested workspace() scopes; buffers: slot -> flat tensor


@contextlib.contextmanager
def workspace():
    """Within it, the calls made by this thread reuse their temporaries' buffers (freed on exit)."""
    if getattr(_local, "depth", 0) == 0:
        _local.buffers = {}
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        if _local.depth == 0:
            _local.buffers = {}


def _buffer(slot: str, shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised fp32 tensor of ``shape``: a view of ``slot``'s buffer inside ``workspace()``,
    grown as needed, else a fresh one. A slot's previous contents are dead when it is asked again."""
    numel = math.prod(shape)
    if getattr(_local, "depth", 0) == 0:
        return torch.empty(shape, dtype=torch.float32, device=like.device)
    key = (slot, like.device)
    buf = _local.buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = _local.buffers[key] = None  # drop the smaller one first
        buf = _local.buffers[key] = torch.empty(numel, dtype=torch.float32, device=like.device)
    return buf[:numel].view(shape)


def _matrices(device):
    """(kron(B^T, B^T) 36x36, kron(A^T, A^T) 16x36) in fp32 on ``device``, cached."""
    if device not in _transforms:
        bt, at = torch.tensor(_BT, dtype=torch.float64), torch.tensor(_AT, dtype=torch.float64)
        _transforms[device] = (torch.kron(bt, bt).float().to(device), torch.kron(at, at).float().to(device))
    return _transforms[device]


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Co, Ci, 3, 3) weight -> U = G g G^T as (36, Ci, Co) fp32, computed in fp64."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight takes a (Co, Ci, 3, 3) weight, got {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ik,ockl,jl->ijco", g, weight.double(), g)  # (6, 6, Ci, Co)
    return u.reshape(_A * _A, weight.shape[1], weight.shape[0]).float().contiguous()


def winograd_conv2d(padded: torch.Tensor, convs, *, relu=None) -> list[torch.Tensor]:
    """3x3 stride-1 convolutions of the already padded ``padded`` (no further padding).

    ``convs``: (U from ``winograd_weight``, input channels used (a prefix), bias or None) per
    convolution; ``relu``: a bool per convolution (default none). Returns their outputs.
    """
    if padded.dtype != torch.float32:
        raise ValueError(f"winograd_conv2d runs fp32 (its transforms cost bits bf16 does not have), got {padded.dtype}")
    n, c, hp, wp = padded.shape
    h, w = hp - 2, wp - 2
    ty, tx = -(-h // TILE), -(-w // TILE)
    if (h, w) != (ty * TILE, tx * TILE):  # zero-extend to whole tiles; the extra outputs are cropped
        padded = F.pad(padded, (0, tx * TILE - w, 0, ty * TILE - h))
    if not padded.is_contiguous(memory_format=torch.channels_last):
        padded = padded.contiguous(memory_format=torch.channels_last)
    sn, sc, sh, sw = padded.stride()
    kin, kout = _matrices(padded.device)
    t = n * ty * tx
    # Tile-major: the gather is one copy, the input transform one batched (36 x 36) @ (36 x C) product.
    tiles = _buffer("a", (t, _A * _A, c), padded)
    tiles.view(n, ty, tx, _A, _A, c).copy_(
        padded.as_strided((n, ty, tx, _A, _A, c), (sn, TILE * sh, TILE * sw, sh, sw, sc)))
    v = torch.bmm(kin.expand(t, -1, -1), tiles, out=_buffer("b", (t, _A * _A, c), padded))
    v = v.transpose(0, 1)  # (36, T, C) view
    relu = relu or [False] * len(convs)
    outs = []
    for (u, ci, bias), act in zip(convs, relu):
        co = u.shape[2]
        m = torch.bmm(v[:, :, :ci], u, out=_buffer("a", (_A * _A, t, co), padded))  # the tiles are dead
        y = torch.mm(kout, m.view(_A * _A, -1), out=_buffer("c", (TILE * TILE, t * co), padded))
        out = torch.empty(n, co, ty * TILE, tx * TILE, dtype=padded.dtype, device=padded.device,
                          memory_format=torch.channels_last)
        out.permute(0, 2, 3, 1).view(n, ty, TILE, tx, TILE, co).permute(2, 4, 0, 1, 3, 5).copy_(
            y.view(TILE, TILE, n, ty, tx, co))
        if (ty * TILE, tx * TILE) != (h, w):
            out = out[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
        outs.append(out.relu_() if act else out)
    return outs


def winograd_conv2d_input_grad(grads, convs, size) -> torch.Tensor:
    """The adjoint of ``winograd_conv2d``: the gradient of its padded input from its outputs'.

    The forward's linear map transposed, step by step, with the same U (no transformed copy of
    the weights): per 4x4 output tile, M = A gY A^T (kron(A^T, A^T)^T as one matmul), the 36
    GEMMs with U^T, V = B gM B^T, then the 6x6 input tiles are added back where they overlap
    (stride 4: each tile's last two rows and columns fall on the next one's first two). The
    convolutions' contributions are summed before the input transform, which runs once.

    ``grads``: the outputs' gradients (N, Co, H, W); ``convs``: (U, input channels used) per
    convolution, as the forward's; ``size``: (H, W). Returns (N, C, H + 2, W + 2) channels_last,
    C the most input channels any convolution used (channels none used get 0).
    """
    n = grads[0].shape[0]
    h, w = size
    ty, tx = -(-h // TILE), -(-w // TILE)
    tiles = n * ty * tx
    device = grads[0].device
    kin, kout = _matrices(device)
    channels = max(ci for _, ci in convs)
    g_v = None
    # The convolution reading all channels first: its product starts the sum.
    for grad, (u, ci) in sorted(zip(grads, convs), key=lambda pair: -pair[1][1]):
        co = u.shape[2]
        if grad.dtype != torch.float32:
            raise ValueError(f"winograd_conv2d_input_grad runs fp32, got {grad.dtype}")
        if (h, w) != (ty * TILE, tx * TILE):
            grad = F.pad(grad, (0, tx * TILE - w, 0, ty * TILE - h))
        # (n, co, H, W) -> (16, tiles * co): the forward's output layout (row, column in the tile first)
        g_y = _buffer("a", (TILE * TILE, tiles * co), grad)
        g_y.view(TILE, TILE, n, ty, tx, co).copy_(
            grad.permute(0, 2, 3, 1).reshape(n, ty, TILE, tx, TILE, co).permute(2, 4, 0, 1, 3, 5))
        g_m = torch.mm(kout.t(), g_y, out=_buffer("b", (_A * _A, tiles * co), grad)).view(_A * _A, tiles, co)
        if g_v is None:
            if ci == channels:
                g_v = torch.bmm(g_m, u.transpose(1, 2), out=_buffer("c", (_A * _A, tiles, ci), grad))
                continue
            g_v = _buffer("c", (_A * _A, tiles, channels), grad).zero_()
        g_v[:, :, :ci] += torch.bmm(g_m, u.transpose(1, 2), out=_buffer("d", (_A * _A, tiles, ci), grad))
    g_d = torch.bmm(kin.t().expand(tiles, -1, -1), g_v.transpose(0, 1),
                    out=_buffer("a", (tiles, _A * _A, channels), grad)).view(n, ty, tx, _A, _A, channels)
    # NHWC, a whole tile larger than the padded input so that every tile's view is in range. The
    # tiles' own 4x4 parts cover rows and columns [0, 4 t) once: copied; the overlaps are added.
    out = torch.empty(n, TILE * ty + TILE, TILE * tx + TILE, channels, dtype=torch.float32, device=device)
    out[:, TILE * ty:] = 0
    out[:, :, TILE * tx:] = 0
    for r0, r1 in ((0, TILE), (TILE, _A)):
        rows = out[:, r0:r0 + TILE * ty].view(n, ty, TILE, TILE * tx + TILE, channels)[:, :, :r1 - r0]
        for c0, c1 in ((0, TILE), (TILE, _A)):
            target = rows[:, :, :, c0:c0 + TILE * tx].view(n, ty, r1 - r0, tx, TILE, channels)[:, :, :, :, :c1 - c0]
            part = g_d[:, :, :, r0:r1, c0:c1].permute(0, 1, 3, 2, 4, 5)
            if r0 == 0 and c0 == 0:
                target.copy_(part)
            else:
                target += part
    return out[:, :h + 2, :w + 2].permute(0, 3, 1, 2)
