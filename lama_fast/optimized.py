"""``optimize``: LaMa's whole generator as one folded, channels_last inference plan.

``optimize(generator, precision=...)`` converts a LaMa generator in place (built here, loaded
from a checkpoint, or from LaMa's own code) and returns it. Its forward keeps the generator's
contract: float32 N x 4 x H x W in (image * (1 - mask), mask), float32 N x 3 x H x W out.
Inside, one plan runs the whole network:

- every BatchNorm is folded into the convolution before it (the decoder's ConvTranspose2d +
  BatchNorm too), every ReLU runs in place on the convolution's output;
- activations are channels_last: oneDNN's and cuDNN's fast layout, and the one in which the
  SpectralTransform's 1x1 convolutions and its FourierUnit's mix are plain GEMMs;
- the residual blocks keep the local and global halves as two contiguous tensors (a channel
  slice of one channels_last buffer is strided, and oneDNN copies strided inputs). The exchange
  ``convl2l(x_l) + convg2l(x_g)`` and ``convl2g(x_l)`` are, in fp32 on the CPU, two Winograd
  F(4x4, 3x3) convolutions sharing one input transform of [x_l | x_g] padded in one pass
  (``ops.winograd``: 4x fewer multiplications than oneDNN's direct convolution, which already runs
  near the CPU's fp32 peak); on CUDA one convolution of [x_l | x_g] padded in one pass (the
  weights [convl2l | convg2l] side by side) and convl2g on its x_l channels; in bf16 on the CPU
  oneDNN convolutions with the sum and ReLU fused.
  ``convl2g(x_l)``, with conv2's bias and bn_g's shift in its bias, is added to the
  SpectralTransform's conv2 in that convolution's epilogue (``ops.spectral_transform``); on CUDA
  with Triton the global branch runs the fused ops (``pointwise_conv``, ``fourier_unit``);
- no reflection-pad pass at full resolution: the padding is recomputed from thin border strips
  (``dense.reflect_conv2d``), and LaMa's 3-channel output convolution runs on 2x2 pixel blocks
  (on CUDA the 1/8-resolution blocks pad instead: there each strip costs a few kernel launches);
- the residual adds are in place.

Precision is the module's own setting, never read from or written to torch's global flags
(cuDNN's and cuBLAS's TF32 switches are set for the duration of a CUDA forward and restored):
``"fp32"``: IEEE fp32 (split-TF32 in the Triton dots, which is as accurate); ``"tf32"``: TF32
tensor cores on CUDA, fp32 on the CPU; ``"bf16"``: bf16 weights, activations and GEMM/convolution
operands with fp32 accumulation, FFTs in fp32. Without bf16 support (a CPU without AVX512-BF16 /
AMX, a GPU before sm_80) bf16 says so once and runs fp32.

Folded weights are rebuilt when a parameter, buffer, module or module setting changes
(``load_state_dict``, ``.to()``, optimizer steps, a swapped layer); writes through ``p.data`` leave
no trace, so call ``refold(generator)`` after those. Training mode, a forward that
needs gradients, forward hooks on any submodule, or a generator whose layout is not LaMa's run
the generator's own forward (its FFC modules converted to the fused twins).

Tiles (``tile_size``): the leading and trailing local steps (stem and downsampling; transposed
convolutions and output convolution) run through ``lama_fast.tiling`` one output tile at a time,
each tile with the halo its chain of convolutions reads and the layers' own padding where it
touches the image border; the residual blocks between them run whole.

CUDA: after one warm-up per input shape the forward is captured in a CUDA graph and replayed
(``cuda_graphs=True``, the default). Under ``torch.compile`` the plan is traced as it is (no
graph breaks: the checks above run only outside compilation, so refold before compiling); its
fp32 and TF32 CUDA convolutions are then the op ``lama_fast::conv_at_precision``, which sets
cuDNN's TF32 switch around itself, so the compiled module keeps its precision too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import ffc_kernels
from ffc_kernels import backends
from ffc_kernels.backends import cuda_fp32_precision
from ffc_kernels.fold import batchnorm_affine, fold
from ffc_kernels.modules import FastFFC_BN_ACT, FastFFCResnetBlock, set_precision
from ffc_kernels.modules import _relu_flag as fused_relu_flag
from ffc_kernels.ops import dense
from ffc_kernels.ops.fourier_unit import fourier_unit
from ffc_kernels.ops.pointwise_conv import pointwise_conv
from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight
from ffc_kernels.ops.spectral_transform import (
    spectral_gemm_weights,
    spectral_transform_nhwc,
    spectral_transform_nhwc_backward,
)
from ffc_kernels.ops.winograd import winograd_conv2d, winograd_conv2d_input_grad, winograd_weight, workspace
from lama_fast import tiling

__all__ = ["optimize", "PRECISIONS", "generator_plan", "plan_info", "refold"]

PRECISIONS = ("fp32", "tf32", "bf16")
_CL = torch.channels_last
_S2D_MAX_CHANNELS = 4  # output convolutions with at most this many channels run on 2x2 pixel blocks
# The residual blocks' exchange as one convolution of the reflect-padded [x_l | x_g] (+ convl2g on
# its x_l channels): None = on CUDA, where border recomputation costs ~100 tiny kernels per block.
_MERGED_EXCHANGE: bool | None = None
_GRAPH_CACHE_SIZE = 2  # input shapes whose CUDA graphs are kept (each holds its activations)
_SIZES_KEPT = 4  # input sizes whose size-dependent spectral weights are kept


# ------------------------------------------------------------------------------ precision

@dataclasses.dataclass(frozen=True)
class _Precision:
    name: str            # what runs: fp32, tf32 or bf16
    dtype: torch.dtype   # weights and activations
    dot: str             # the fused ops' precision argument (fp32 = split TF32), always explicit
    allow_tf32: bool     # cuDNN / cuBLAS TF32 on CUDA


def bf16_unsupported(device: torch.device) -> str | None:
    """Why bf16 compute is not available on ``device`` (None when it is)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return None if major >= 8 else f"this GPU (sm_{major}x) has no bf16 tensor cores"
    if device.type == "cpu":
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        if torch.backends.mkldnn.is_available() and supported is not None and supported():
            return None
        return "this CPU has no bf16 instructions (AVX512-BF16 or AMX)"
    return None


def _resolve_precision(name: str, device: torch.device) -> _Precision:
    if name == "bf16":
        why = bf16_unsupported(device)
        if why is not None:
            backends.warn_once(f"lama_fast.optimize: precision='bf16' runs fp32: {why}")
            name = "fp32"
    if name == "bf16":
        return _Precision("bf16", torch.bfloat16, "bf16", True)
    if name == "tf32" and device.type == "cuda":
        return _Precision("tf32", torch.float32, "tf32", True)
    return _Precision("fp32", torch.float32, "fp32", False)


@torch.library.custom_op("lama_fast::conv_at_precision", mutates_args=(), schema=(
    "(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, bool transposed, "
    "int[] output_padding, bool allow_tf32) -> Tensor"))
def _conv_at_precision(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                       padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
                       allow_tf32: bool) -> torch.Tensor:
    """A CUDA convolution at the plan's fp32 precision whatever torch's switches say: under
    ``torch.compile`` the forward is traced and ``cuda_fp32_precision`` does not run, so the
    convolutions that depend on it are this op, which sets the switches around itself."""
    with cuda_fp32_precision(x.device, allow_tf32):
        return _conv_fake(x, weight, bias, stride, padding, dilation, transposed, output_padding, allow_tf32)


@_conv_at_precision.register_fake
def _conv_fake(x, weight, bias, stride, padding, dilation, transposed, output_padding, allow_tf32):
    if transposed:
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, 1, dilation)
    return F.conv2d(x, weight, bias, stride, padding, dilation)


# ------------------------------------------------------------------------------ the plan

@dataclasses.dataclass
class _Conv:
    """A convolution with its BatchNorm folded: weight, bias, geometry, reflect pre-padding."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)     # zero padding inside the convolution
    dilation: tuple = (1, 1)
    reflect: int = 0            # reflection padding applied before it
    relu: bool = False
    transposed: bool = False
    output_padding: tuple = (0, 0)
    s2d: tuple | None = None  # dense.space_to_depth_weight(weight, bias), for few output channels
    cuda_tf32: bool | None = None  # fp32 on CUDA: the TF32 setting it must run with (see _conv_at_precision)

    def _pinned(self, x, padding, output_padding):
        """Under torch.compile on CUDA in fp32/TF32: the convolution as ``_conv_at_precision``."""
        return _conv_at_precision(x, self.weight, self.bias, list(self.stride), list(padding), list(self.dilation),
                                  self.transposed, list(output_padding), self.cuda_tf32)

    def unpadded(self, x):
        """This convolution on ``x`` as given, with no padding of its own (a tile padded by the caller)."""
        if self.cuda_tf32 is not None and torch.compiler.is_compiling():
            y = self._pinned(x, (0, 0), (0, 0))
        elif self.transposed:
            y = F.conv_transpose2d(x, self.weight, self.bias, self.stride, 0, 0, 1, self.dilation)
        else:
            return dense.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, relu=self.relu)
        return y.relu() if self.relu else y

    def tile_layer(self, run=None) -> tiling.Layer | None:
        """This convolution as a step of a tiled chain (None when its geometry is not square)."""
        (kh, kw), (sh, sw), (dh, dw) = self.weight.shape[-2:], self.stride, self.dilation
        ph, pw = self.padding
        if kh != kw or sh != sw or dh != dw or ph != pw or (self.reflect and ph):
            return None
        extent = (kh - 1) * dh + 1
        if self.transposed:
            oph, opw = self.output_padding
            if dh != 1 or oph != opw:
                return None
            return tiling.Layer(extent, sh, ph, "transposed", run or self.unpadded, output_padding=oph)
        mode, pad = ("reflect", self.reflect) if self.reflect else ("zeros", ph)
        return tiling.Layer(extent, sh, pad, mode, run or self.unpadded)

    def prepad(self, x):
        """x padded for this convolution when the whole plane is padded (see dense.prepad), else None."""
        return dense.prepad(x, self.reflect, (self.weight.shape[-1] - 1) * max(self.dilation) + 1)

    def __call__(self, x, add=None, relu=None, padded=None):
        relu = self.relu if relu is None else relu
        if (add is None and padded is None and torch.is_grad_enabled() and x.requires_grad
                and not torch.compiler.is_compiling()):
            return _FrozenConv.apply(x, self, relu)
        if self.cuda_tf32 is not None and torch.compiler.is_compiling():
            if padded is not None:
                x = padded
            elif self.reflect:
                x = F.pad(x, (self.reflect,) * 4, mode="reflect")
            y = self._pinned(x, self.padding, self.output_padding)
            if add is not None:
                y = y + add
            return y.relu() if relu else y
        if self.transposed:
            y = F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                   1, self.dilation)
            return y.relu_() if relu else y
        if self.reflect:
            return dense.reflect_conv2d(x, self.weight, self.bias, self.reflect, self.stride, self.dilation,
                                        relu=relu, add=add, padded=padded, s2d=self.s2d)
        return dense.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, relu=relu, add=add)


class _FrozenConv(torch.autograd.Function):
    """A plan's convolution (reflection pad, bias, ReLU) on an input that needs its gradient, the
    weights constant (LaMa's refinement backpropagates through the decoder to the features).
    The forward is the no-grad one (border recomputation instead of a pad, the space-to-depth
    form of the last layer); the backward is the convolution's adjoint (the transposed
    convolution, or for a transposed one the convolution), then the pad's adjoint, all
    channels_last. It keeps the output when it ends in a ReLU (the ReLU's backward reads it in one
    pass, where a bool mask costs a conversion), else nothing."""

    @staticmethod
    def forward(ctx, x, conv, relu):
        y = conv(x, relu=relu)
        ctx.conv, ctx.shape = conv, x.shape
        ctx.save_for_backward(y if relu else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        conv, (n, ci, h, w) = ctx.conv, ctx.shape
        if y is not None:  # the gradient may be a view (of the next layer's padded gradient)
            grad = torch.ops.aten.threshold_backward(grad, y, 0)
        grad = grad.contiguous(memory_format=_CL)
        if conv.transposed:  # the input gradient of a transposed convolution is the convolution
            return F.conv2d(grad, conv.weight, None, conv.stride, conv.padding, conv.dilation), None, None
        pad = conv.reflect
        g_in = dense.conv2d_input((n, ci, h + 2 * pad, w + 2 * pad), conv.weight, grad, conv.stride, conv.padding,
                                  conv.dilation)
        return (dense.reflect_pad_adjoint(g_in, pad, overwrite=True) if pad else g_in), None, None


@dataclasses.dataclass
class _LocalFFC:
    """An FFC_BN_ACT without a spectral branch (the stem, the downsampling layers): x -> (l, g)."""

    local: _Conv | None
    to_global: _Conv | None

    def __call__(self, state, plan):
        x = state[0] if state[1] is None else torch.cat(state, dim=1)
        padded = (self.local or self.to_global).prepad(x)  # both convolutions have the same geometry
        return tuple(None if c is None else c(x, padded=padded) for c in (self.local, self.to_global))

    def tile_layer(self) -> tiling.Layer | None:
        def run(t):
            return tuple(None if c is None else c.unpadded(t) for c in (self.local, self.to_global))

        return (self.local or self.to_global).tile_layer(run)


@dataclasses.dataclass
class _SpectralFFC:
    """A residual block's FFC_BN_ACT: (l, g) -> (act(bn_l(l2l(l) + g2l(g))), act(bn_g(l2g(l) + g2g(g))))."""

    l2l: _Conv | None   # no bias, no ReLU (None where winograd or the merged exchange runs)
    g2l: _Conv | None   # bn_l's shift as bias; act_l after the sum with l2l (merged: [l2l | g2l])
    l2g: _Conv | None   # bias: conv2's, convl2g's and bn_g's shift
    relu_l: bool
    relu_g: bool
    spectral: tuple     # folded float64 (w1, b1, w_fu, b_fu, w2) as (out, in) matrices
    fft_norm: str
    dtype: torch.dtype
    fused: tuple | None  # (w1, b1, packed fu weight, packed fu bias, w2) fp32, for the fused ops
    # fp32 on the CPU: (U of [l2l | g2l], U of l2g, their biases) for ops.winograd, 3x3 with reflect
    # padding 1; the direct convolutions' weights are then not kept.
    winograd: tuple | None = None
    # The merged exchange (CUDA): g2l's weight is [l2l | g2l] over the padded [x_l | x_g].
    merged: bool = False
    gemm: OrderedDict = dataclasses.field(default_factory=OrderedDict)  # (H, W) -> operands, a few sizes

    def __call__(self, state, plan):
        x_l, x_g = state
        if torch.is_grad_enabled() and (x_l.requires_grad or x_g.requires_grad):
            return _SpectralFFCGrad.apply(x_l, x_g, self, plan)
        return self.forward(x_l, x_g, plan)

    def forward(self, x_l, x_g, plan, masks=None):
        """The FFC's outputs; ``masks`` (a list, torch backend) receives the global branch's inner
        ReLU masks for ``input_grad``."""
        if self.winograd is not None:
            padded = dense.reflect_pad_cat((x_l, x_g), 1)
            u_local, u_l2g, b_local, b_l2g = self.winograd
            y_l, y_g = winograd_conv2d(padded, [(u_local, padded.shape[1], b_local), (u_l2g, x_l.shape[1], b_l2g)],
                                       relu=[self.relu_l, False])
        elif self.merged:
            # One pass pads both halves; [l2l | g2l] is one convolution, l2g reads the x_l channels.
            if self.g2l.reflect:
                padded = dense.reflect_pad_cat((x_l, x_g), self.g2l.reflect)
                y_l = self.g2l(x_l, padded=padded, relu=self.relu_l)
                y_g = self.l2g(x_l, padded=padded[:, :x_l.shape[1]])
            else:
                y_l = self.g2l(torch.cat((x_l, x_g), dim=1), relu=self.relu_l)
                y_g = self.l2g(x_l)
        else:
            padded_l = self.l2l.prepad(x_l)  # l2l and l2g read x_l with the same geometry
            y_l = self.g2l(x_g, add=self.l2l(x_l, padded=padded_l), relu=self.relu_l)
            y_g = self.l2g(x_l, padded=padded_l)
        if plan.backend != "torch":
            return y_l, self._fused_global(x_g, y_g, plan)
        return y_l, spectral_transform_nhwc(x_g, y_g, *self._gemm_operands(*x_g.shape[-2:]), relu=self.relu_g,
                                            masks=masks)

    def _gemm_operands(self, h, w):
        operands = self.gemm.get((h, w))
        if operands is None:  # the FFT normalisation folded into the mix depends on the size
            operands = self.gemm[(h, w)] = spectral_gemm_weights(
                *self.spectral, fft_norm=self.fft_norm, height=h, width=w, dtype=self.dtype)
            while len(self.gemm) > _SIZES_KEPT:
                self.gemm.popitem(last=False)
        return operands

    def input_grad(self, shapes, x_g, masks, g_l, g_g, plan):
        """(d x_l, d x_g) of this FFC from the gradients of its outputs before their ReLUs.

        The exchange's 3x3 convolutions are linear in [x_l | x_g]: their adjoint is the
        transposed convolution of the gradients (Winograd's own algorithm transposed where the
        forward runs Winograd, ``winograd_conv2d_input_grad``), then the reflection padding's
        adjoint; it needs nothing from the forward. Nor does the global branch's
        (``spectral_transform_nhwc_backward``) but for its inner ReLU masks ``masks``; with the
        fused ops (``masks`` None) it is taken by autograd on a recomputation from x_g.
        ``shapes``: those of x_l and x_g.
        """
        cl = shapes[0][1]
        h, w = shapes[0][-2:]
        g_l = g_l.contiguous(memory_format=_CL)
        g_g = g_g.contiguous(memory_format=_CL)
        if self.winograd is not None:
            u_local, u_l2g = self.winograd[:2]
            d_pad = winograd_conv2d_input_grad([g_l, g_g], [(u_local, u_local.shape[1]), (u_l2g, cl)], (h, w))
            reflect = 1
        else:
            local, l2g = self.g2l, self.l2g  # merged: g2l's weight is [l2l | g2l] already
            w_local = local.weight if self.merged else torch.cat([self.l2l.weight, self.g2l.weight], dim=1)
            reflect = local.reflect
            padded = (shapes[0][0], w_local.shape[1], h + 2 * reflect, w + 2 * reflect)
            d_pad = dense.conv2d_input(padded, w_local, g_l, local.stride, local.padding, local.dilation)
            d_pad[:, :cl] += dense.conv2d_input((padded[0], cl, *padded[2:]), l2g.weight, g_g, l2g.stride,
                                                l2g.padding, l2g.dilation)
        d_in = dense.reflect_pad_adjoint(d_pad, reflect, overwrite=True) if reflect else d_pad
        if masks is not None:
            w1, _, w_fu, _, w2 = self._gemm_operands(h, w)
            d_g = spectral_transform_nhwc_backward(g_g, masks, w1, w_fu, w2, width=w)
        else:
            d_g = self._global_input_grad(x_g, g_g, plan)
        return d_in[:, :cl], d_g.add_(d_in[:, cl:])

    def _global_input_grad(self, x_g, g_g, plan):
        """d x_g of conv2(t + FourierUnit(t)), t = relu(conv1(x_g)), with the fused ops, for the
        gradient ``g_g`` of its output: the 1x1 convolutions' adjoints are ``pointwise_conv``
        with the transposed weights, the FourierUnit's is taken by autograd (FFTs for the FFTs,
        ``spectral_mix``'s own backward for the mix) on t, recomputed."""
        w1, b1, w_fu, b_fu, w2 = self.fused
        kw = dict(precision=plan.precision.dot)  # each op measures its backend (backends.select)
        n, _, h, w = x_g.shape
        # fp32 and NCHW as the forward's t (the FFTs' input), and the gradient beside it
        t = pointwise_conv(x_g, w1, b1, relu=True, out=x_g.new_empty(n, w1.shape[0], h, w, dtype=torch.float32),
                           **kw)
        g_u = pointwise_conv(g_g, w2.t().contiguous(), None, out=torch.empty_like(t), **kw)
        with torch.enable_grad():
            t_in = t.requires_grad_()
            f = fourier_unit(t_in, w_fu, b_fu, fft_norm=self.fft_norm, **kw)
            (g_t,) = torch.autograd.grad(f, t_in, g_u)
        g_t = (g_t + g_u).mul_(t > 0)  # t + fu(t), then conv1's ReLU
        return pointwise_conv(g_t, w1.t().contiguous(), None, **kw).to(x_g.dtype)

    def _fused_global(self, x_g, y_g, plan):
        w1, b1, w_fu, b_fu, w2 = self.fused
        n, _, h, w = x_g.shape
        # The FFTs read conv1's output in fp32 and NCHW (contiguous (H, W) planes).
        t = torch.empty(n, w1.shape[0], h, w, dtype=torch.float32, device=x_g.device)
        kw = dict(precision=plan.precision.dot)  # each op measures its backend (backends.select)
        pointwise_conv(x_g, w1, b1, relu=True, out=t, **kw)
        f = fourier_unit(t, w_fu, b_fu, fft_norm=self.fft_norm, **kw)
        return pointwise_conv(t, w2, None, addend=f, residual=y_g, relu=self.relu_g, out=y_g, **kw)


@dataclasses.dataclass
class _ResidualBlock:
    conv1: _SpectralFFC
    conv2: _SpectralFFC

    def __call__(self, state, plan):
        y_l, y_g = self.conv2(self.conv1(state, plan), plan)
        if torch.is_grad_enabled() and (y_l.requires_grad or y_g.requires_grad):
            return y_l + state[0], y_g + state[1]
        y_l += state[0]
        y_g += state[1]
        return y_l, y_g


class _SpectralFFCGrad(torch.autograd.Function):
    """A residual FFC whose inputs need gradients (LaMa's refinement optimises the features that
    enter the residual blocks). The forward is the plan's own fused one. It keeps the ReLU masks
    (bools) and nothing else: the FFC is linear between its ReLUs, so ``_SpectralFFC.input_grad``
    needs only the weights and the masks (with the fused ops, x_g too, from which it recomputes
    conv1 and the spectra). The folded weights are constants (the plan runs with frozen weights)."""

    @staticmethod
    def forward(ctx, x_l, x_g, step, plan):
        masks = [] if plan.backend == "torch" else None
        y_l, y_g = step.forward(x_l, x_g, plan, masks=masks)
        ctx.step, ctx.plan, ctx.shapes, ctx.has_masks = step, plan, (x_l.shape, x_g.shape), masks is not None
        ctx.save_for_backward(y_l > 0 if step.relu_l else None, y_g > 0 if step.relu_g else None,
                              *(masks if masks is not None else (x_g,)))
        return y_l, y_g

    @staticmethod
    def backward(ctx, g_l, g_g):
        mask_l, mask_g, *kept = ctx.saved_tensors
        dtype = ctx.plan.precision.dtype
        g_l = g_l.new_zeros(ctx.shapes[0]) if g_l is None else g_l if mask_l is None else g_l * mask_l
        g_g = g_g.new_zeros(ctx.shapes[1]) if g_g is None else g_g if mask_g is None else g_g * mask_g
        x_g, masks = (None, kept) if ctx.has_masks else (kept[0], None)
        with cuda_fp32_precision(ctx.plan.device, ctx.plan.precision.allow_tf32):
            d_l, d_g = ctx.step.input_grad(ctx.shapes, x_g, masks, g_l.to(dtype), g_g.to(dtype), ctx.plan)
        return d_l, d_g, None, None


@dataclasses.dataclass
class _Concat:
    def __call__(self, state, plan):
        return (state[0] if state[1] is None else torch.cat(state, dim=1)), None


@dataclasses.dataclass
class _Single:
    """A convolution (or transposed convolution) on a single tensor."""

    conv: _Conv

    def __call__(self, state, plan):
        return self.conv(state[0]), None

    def tile_layer(self) -> tiling.Layer | None:
        return self.conv.tile_layer()


@dataclasses.dataclass
class _Plan:
    steps: list
    activation: str | None      # "sigmoid", "tanh" or None
    precision: _Precision
    backend: str                # "torch" (GEMM formulation) or the fused ops' backend
    device: torch.device
    in_channels: int
    out_channels: int

    def run(self, x, tile_size: int | None = None):
        state = (x.to(self.precision.dtype), None)
        if tile_size:
            return self._run_tiled(state[0], tile_size)
        state = self._steps(self.steps, state)
        y = state[0]
        out = torch.empty(y.shape, dtype=torch.float32, device=y.device)  # NCHW, written by the last op
        return self._activation(y, out)

    def first_block(self) -> int:
        """Index in ``steps`` of the first residual block: LaMa's refinement optimises the features
        entering it (the front, ``steps[:first_block()]``, runs once per scale)."""
        return next((i for i, step in enumerate(self.steps) if isinstance(step, _ResidualBlock)), len(self.steps))

    def run_steps(self, state, start: int = 0, stop: int | None = None):
        """``steps[start:stop]`` on a (local, global) state in the plan's dtype (channels_last; global
        None where there is none). Differentiable with respect to the state when it requires grad."""
        with cuda_fp32_precision(self.device, self.precision.allow_tf32):
            return self._steps(self.steps[start:stop], state)

    def _steps(self, steps, state):
        """``steps`` on ``state``. The residual blocks share one Winograd workspace
        (``ops.winograd.workspace``), freed when they are done: it is not held through the decoder."""
        for blocks, group in itertools.groupby(steps, key=lambda step: isinstance(step, _ResidualBlock)):
            with workspace() if blocks else contextlib.nullcontext():
                for step in group:
                    state = step(state, self)
        return state

    def output(self, state):
        """The generator's output (float32, NCHW) from the state after the last step."""
        y = state[0] if state[1] is None else torch.cat(state, dim=1)
        if torch.is_grad_enabled() and y.requires_grad:
            y = y.float().contiguous()
            return {"sigmoid": torch.sigmoid, "tanh": torch.tanh}.get(self.activation, lambda t: t)(y)
        return self._activation(y, torch.empty(y.shape, dtype=torch.float32, device=y.device))

    def _activation(self, y, out):
        if self.activation == "sigmoid":
            return torch.sigmoid(y, out=out) if y.dtype == out.dtype else out.copy_(y).sigmoid_()
        if self.activation == "tanh":
            return torch.tanh(y, out=out) if y.dtype == out.dtype else out.copy_(y).tanh_()
        return out.copy_(y)

    def tiled_stages(self):
        """(head, middle, tail): the leading and trailing local steps, which run in tiles, and the
        steps between them (the residual blocks, global), which run whole."""
        i = 0
        while i < len(self.steps) and isinstance(self.steps[i], (_LocalFFC, _Single)):
            i += 1
        j = len(self.steps)
        while j > i and isinstance(self.steps[j - 1], _Single):
            j -= 1
        return self.steps[:i], self.steps[i:j], self.steps[j:]

    def _run_tiled(self, x, tile_size: int):
        """``run`` with the full-resolution stages in tiles of about ``tile_size`` output pixels a side."""
        head, middle, tail = self.tiled_stages()
        state = (x, None)
        head_layers = [s.tile_layer() for s in head]
        if head and all(head_layers) and not any(tiling.check(head_layers, n) for n in x.shape[-2:]):
            stride = math.prod(layer.stride for layer in head_layers)
            outs = {}

            def write_head(parts, rows, cols):
                for k, part in enumerate(parts if isinstance(parts, tuple) else (parts,)):
                    if part is None:
                        continue
                    if k not in outs:
                        size = [layer_size(head_layers, n) for n in x.shape[-2:]]
                        outs[k] = torch.empty(x.shape[0], part.shape[1], *size, dtype=part.dtype,
                                              device=part.device, memory_format=_CL)
                    outs[k][:, :, rows[0]:rows[1], cols[0]:cols[1]] = part

            tiling.run_chain(head_layers, x, max(1, tile_size // stride), write_head)
            state = (outs.get(0), outs.get(1))
            if state[0] is None:
                state = (state[1], None)
        else:
            middle = head + middle
        state = self._steps(middle, state)
        y = state[0] if state[1] is None else torch.cat(state, dim=1)
        tail_layers = [s.tile_layer() for s in tail]
        if not tail or not all(tail_layers) or any(tiling.check(tail_layers, n) for n in y.shape[-2:]):
            for step in tail:
                y = step((y, None), self)[0]
            return self._activation(y, torch.empty(y.shape, dtype=torch.float32, device=y.device))
        size = [layer_size(tail_layers, n) for n in y.shape[-2:]]
        out = torch.empty(y.shape[0], self.out_channels, *size, dtype=torch.float32, device=y.device)

        def write_tail(part, rows, cols):
            self._activation(part, out[:, :, rows[0]:rows[1], cols[0]:cols[1]])

        tiling.run_chain(tail_layers, y, tile_size, write_tail)
        return out


def layer_size(layers, n: int) -> int:
    for layer in layers:
        n = layer.out_size(n)
    return n


# ------------------------------------------------------------------------------ building

class _NotLaMa(Exception):
    """The generator's layout is not one the plan covers; the message says where."""


def _name(m) -> str:
    """The LaMa class name of a module (ffc_kernels' fast twins count as the modules they replace)."""
    return type(m).__name__.removeprefix("Fast")


def _conv_geometry(conv: nn.Conv2d):
    if conv.groups != 1:
        raise _NotLaMa(f"grouped convolution {conv}")
    if conv.padding_mode == "reflect":
        ph, pw = conv.padding
        if ph != pw:
            raise _NotLaMa(f"unequal reflect padding {conv.padding}")
        return dict(stride=conv.stride, padding=(0, 0), dilation=conv.dilation, reflect=ph)
    if conv.padding_mode != "zeros":
        raise _NotLaMa(f"padding mode {conv.padding_mode!r}")
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, reflect=0)


def _relu_flag(act) -> bool:
    relu = fused_relu_flag(act)
    if relu is None:
        raise _NotLaMa(f"activation {act}")
    return relu


def _affine(bn):
    aff = batchnorm_affine(bn)
    if aff is None:
        raise _NotLaMa(f"norm layer {bn} cannot be folded (train mode, no running statistics, or not BatchNorm2d)")
    return aff


def _weight(w, dtype, device):
    return w.to(dtype=dtype, device=device).contiguous(memory_format=_CL)


def _bias(b, dtype, device):
    return None if b is None else b.detach().to(dtype=dtype, device=device, copy=True)


def _build_local_ffc(m, reflect_before: int, dtype, device) -> _LocalFFC:
    ffc = m.ffc
    if getattr(ffc, "gated", False) or not isinstance(ffc.convg2g, nn.Identity) or ffc.ratio_gin != 0:
        raise _NotLaMa("an FFC with a global input outside the residual blocks")
    convs = {}
    for name, conv, bn, act in (("local", ffc.convl2l, m.bn_l, m.act_l), ("to_global", ffc.convl2g, m.bn_g, m.act_g)):
        if not isinstance(conv, nn.Conv2d):
            convs[name] = None
            continue
        geometry = _conv_geometry(conv)
        if reflect_before:
            if geometry["reflect"] or geometry["padding"] != (0, 0):
                raise _NotLaMa("a reflection pad before a padded convolution")
            geometry["reflect"] = reflect_before
        w, b = fold(conv.weight, _affine(bn), conv.bias)
        convs[name] = _Conv(_weight(w, dtype, device), _bias(b, dtype, device), relu=_relu_flag(act), **geometry)
    return _LocalFFC(convs["local"], convs["to_global"])


def _build_spectral_ffc(m, dtype, device, fused: bool, winograd: bool) -> _SpectralFFC:
    ffc = m.ffc
    if getattr(ffc, "gated", False):
        raise _NotLaMa("gated FFC")
    parts = (ffc.convl2l, ffc.convg2l, ffc.convl2g)
    if not all(isinstance(c, nn.Conv2d) for c in parts) or _name(ffc.convg2g) != "SpectralTransform":
        raise _NotLaMa("a residual FFC without all four branches")
    geometries = [_conv_geometry(c) for c in parts]
    if any(g != geometries[0] for g in geometries) or geometries[0]["stride"] != (1, 1):
        raise _NotLaMa("residual FFC convolutions of different geometry or stride")
    st = ffc.convg2g
    if st.stride != 1 or getattr(st, "enable_lfu", False):
        raise _NotLaMa("a SpectralTransform with downsampling or a local Fourier unit")
    conv1, bn1, act1 = list(st.conv1)
    fu = st.fu
    if (not isinstance(act1, nn.ReLU) or conv1.kernel_size != (1, 1) or conv1.groups != 1
            or st.conv2.kernel_size != (1, 1) or st.conv2.groups != 1 or fu.conv_layer.groups != 1
            or getattr(fu, "use_se", False) or getattr(fu, "spectral_pos_encoding", False)
            or getattr(fu, "spatial_scale_factor", None) is not None or getattr(fu, "ffc3d", False)):
        raise _NotLaMa("a SpectralTransform variant LaMa's released models do not use")
    fft_norm = getattr(fu, "fft_norm", "ortho")

    scale_l, shift_l = _affine(m.bn_l)
    scale_g, shift_g = _affine(m.bn_g)
    geometry = geometries[0]
    w_ll, _ = fold(ffc.convl2l.weight, (scale_l, None))
    local_bias = [c.bias.double() for c in (ffc.convl2l, ffc.convg2l) if c.bias is not None]
    w_gl, b_gl = fold(ffc.convg2l.weight, (scale_l, shift_l), sum(local_bias) if local_bias else None)
    # bn_g(convl2g(x_l) + conv2(s)): bn_g's scale into both weights; every bias and bn_g's shift
    # into convl2g's bias, whose output the SpectralTransform's conv2 is added to in place.
    w_l2g, b_l2g = fold(ffc.convl2g.weight, (scale_g, shift_g), ffc.convl2g.bias)
    w2, _ = fold(st.conv2.weight, (scale_g, None))
    if st.conv2.bias is not None:  # inside bn_g: scaled, no shift
        b2 = st.conv2.bias.double() * (scale_g if scale_g is not None else 1.0)
        b_l2g = b2 if b_l2g is None else b_l2g + b2
    w1, b1 = fold(conv1.weight, _affine(bn1), conv1.bias)
    w_fu, b_fu = fold(fu.conv_layer.weight, _affine(fu.bn), fu.conv_layer.bias)
    b1 = torch.zeros(w1.shape[0], dtype=torch.float64, device=w1.device) if b1 is None else b1
    if b_fu is None:
        b_fu = torch.zeros(w_fu.shape[0], dtype=torch.float64, device=w_fu.device)
    w1, w_fu, w2 = w1.flatten(1), w_fu.flatten(1), w2.flatten(1)
    spectral = tuple(t.to(device) for t in (w1, b1, w_fu, b_fu, w2))
    fused_weights = None
    if fused:
        f32 = dict(dtype=torch.float32, device=device)
        fused_weights = (w1.to(**f32), b1.to(**f32), pack_weight(w_fu.to(**f32)), pack_bias(b_fu.to(**f32)),
                         w2.to(**f32))
    use_winograd = (winograd and _MERGED_EXCHANGE is not True and ffc.convl2l.kernel_size == (3, 3) and geometry["dilation"] == (1, 1)
                    and geometry["reflect"] == 1 and geometry["padding"] == (0, 0))
    exchange = dict(l2l=None, g2l=None, l2g=None, winograd=None)
    if use_winograd:
        exchange["winograd"] = (winograd_weight(torch.cat([w_ll, w_gl], dim=1)).to(device),
                                winograd_weight(w_l2g).to(device), _bias(b_gl, dtype, device),
                                _bias(b_l2g, dtype, device))
    elif _MERGED_EXCHANGE if _MERGED_EXCHANGE is not None else device.type == "cuda":
        exchange.update(g2l=_Conv(_weight(torch.cat([w_ll, w_gl], dim=1), dtype, device), _bias(b_gl, dtype, device),
                                  **geometry),
                        l2g=_Conv(_weight(w_l2g, dtype, device), _bias(b_l2g, dtype, device), **geometry),
                        merged=True)
    else:
        exchange.update(l2l=_Conv(_weight(w_ll, dtype, device), None, **geometry),
                        g2l=_Conv(_weight(w_gl, dtype, device), _bias(b_gl, dtype, device), **geometry),
                        l2g=_Conv(_weight(w_l2g, dtype, device), _bias(b_l2g, dtype, device), **geometry))
    return _SpectralFFC(
        **exchange,
        relu_l=_relu_flag(m.act_l), relu_g=_relu_flag(m.act_g),
        spectral=spectral, fft_norm=fft_norm, dtype=dtype, fused=fused_weights,
    )


def _build_plan(generator: nn.Module, precision: _Precision, device: torch.device, backend: str) -> _Plan:
    model = getattr(generator, "model", None)
    if not isinstance(model, nn.Sequential):
        raise _NotLaMa("no `model` nn.Sequential")
    dtype = precision.dtype
    # fp32 on the CPU: the blocks' 3x3 convolutions by Winograd F(4x4, 3x3) (ops/winograd.py), 4x
    # fewer multiplications than oneDNN's direct fp32 convolution; cuDNN picks its own algorithms.
    winograd = device.type == "cpu" and dtype == torch.float32
    layers = list(model)
    steps, activation, reflect, in_channels, out_channels = [], None, 0, None, None
    i = 0
    with torch.no_grad():
        while i < len(layers):
            m = layers[i]
            if activation is not None:
                raise _NotLaMa(f"layer {i} after the output activation")
            if isinstance(m, nn.ReflectionPad2d):
                pads = set(m.padding) if isinstance(m.padding, tuple) else {m.padding}
                if len(pads) != 1 or reflect:
                    raise _NotLaMa(f"layer {i}: {m}")
                reflect = pads.pop()
            elif isinstance(m, FastFFC_BN_ACT):  # convert() recognised it by name and structure
                if in_channels is None:
                    first = m.ffc.convl2l if isinstance(m.ffc.convl2l, nn.Conv2d) else m.ffc.convl2g
                    in_channels = first.in_channels
                steps.append(_build_local_ffc(m, reflect, dtype, device))
                reflect = 0
            elif isinstance(m, FastFFCResnetBlock):
                if m.inline or reflect:
                    raise _NotLaMa(f"layer {i}: an inline residual block")
                fused = backend != "torch"
                steps.append(_ResidualBlock(*(_build_spectral_ffc(c, dtype, device, fused, winograd)
                                              for c in (m.conv1, m.conv2))))
            elif _name(m) == "ConcatTupleLayer":
                steps.append(_Concat())
            elif isinstance(m, nn.ConvTranspose2d):
                if reflect or m.groups != 1 or m.padding_mode != "zeros":
                    raise _NotLaMa(f"layer {i}: {m}")
                bn = layers[i + 1] if i + 1 < len(layers) else None
                scale, shift = (None, None)
                if isinstance(bn, nn.BatchNorm2d):
                    scale, shift = _affine(bn)
                    i += 1
                # ConvTranspose2d's weight is (in, out, kh, kw): the BatchNorm scales dim 1.
                w = m.weight.double() if scale is None else m.weight.double() * scale.reshape(1, -1, 1, 1)
                b = m.bias.double() if m.bias is not None else None
                if scale is not None:
                    b = shift if b is None else b * scale + shift
                relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
                i += relu
                # oneDNN's transposed convolution takes a plain (not channels_last) weight.
                steps.append(_Single(_Conv(w.to(dtype=dtype, device=device), _bias(b, dtype, device), m.stride,
                                           m.padding, m.dilation, relu=relu, transposed=True,
                                           output_padding=m.output_padding)))
            elif isinstance(m, nn.Conv2d):
                geometry = _conv_geometry(m)
                if reflect:
                    if geometry["reflect"] or geometry["padding"] != (0, 0):
                        raise _NotLaMa(f"layer {i}: a reflection pad before a padded convolution")
                    geometry["reflect"] = reflect
                reflect = 0
                relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
                i += relu
                weight, bias = _weight(m.weight, dtype, device), _bias(m.bias, dtype, device)
                # LaMa's output convolution (3 channels) runs faster on 2x2 pixel blocks.
                s2d = dense.space_to_depth_weight(weight, bias) if m.out_channels <= _S2D_MAX_CHANNELS else None
                steps.append(_Single(_Conv(weight, bias, relu=relu, s2d=s2d, **geometry)))
                out_channels = m.out_channels
            elif isinstance(m, (nn.Sigmoid, nn.Tanh)):
                activation = "sigmoid" if isinstance(m, nn.Sigmoid) else "tanh"
            else:
                raise _NotLaMa(f"layer {i}: {_name(m)}")
            i += 1
    if in_channels is None or out_channels is None or reflect:
        raise _NotLaMa("no stem or no output convolution")
    if device.type == "cuda" and dtype == torch.float32:
        for conv in _convs(steps):
            conv.cuda_tf32 = precision.allow_tf32
    return _Plan(steps, activation, precision, backend, device, in_channels, out_channels)


def _convs(node):
    """Every _Conv in a plan's steps."""
    if isinstance(node, _Conv):
        yield node
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _convs(item)
    elif dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            yield from _convs(getattr(node, field.name))


# ------------------------------------------------------------------------------ the module

def _signature(generator: nn.Module):
    """What the plan depends on, as (tensors, key), or None when the plan must not run: every
    module's type and settings (mode, BatchNorm eps, FFT norm), every parameter and buffer with
    its version and storage. One walk; it runs on every forward (about 0.1 ms for big-lama).

    Forward hooks on submodules (profilers, feature taps) need the modules to run: None."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        backends.warn_once("lama_fast.optimize: global module forward hooks are registered; the generator's "
                           "own forward runs while they are, so every hook fires")
        return None
    tensors, key = [], []
    for m in generator.modules():
        if m.training:
            backends.warn_once(f"lama_fast.optimize: a submodule ({type(m).__name__}) is in training mode inside an "
                               "eval generator; the generator's own forward runs (call .eval() on the generator)")
            return None
        if m is not generator and (m._forward_hooks or m._forward_pre_hooks):
            backends.warn_once("lama_fast.optimize: a submodule has forward hooks; the generator's own forward "
                               "runs while it does, so the hooks fire")
            return None
        d = m.__dict__  # __dict__ lookups: a missing attribute costs nn.Module.__getattr__ an exception
        key.append((type(m), d.get("eps"), d.get("fft_norm"), d.get("padding_mode"), d.get("enable_lfu")))
        for group in (m._parameters, m._buffers):
            for t in group.values():
                if t is not None:
                    tensors.append(t)
                    key.append((0 if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device))
    return tensors, tuple(key)


class _Optimized:
    """The state ``optimize`` attaches to a generator: settings, the plan, the CUDA graphs."""

    def __init__(self, precision: str, cuda_graphs: bool, tile_size: int | None = None):
        self.requested = precision
        self.cuda_graphs = cuda_graphs
        self.tile_size = tile_size
        self.plan = None
        self.signature = None
        self.why_not = None  # why the plan does not run (the generator's own forward does)
        self.graphs = OrderedDict()

    def plan_for(self, generator):
        """The plan for the generator as it is now (built or rebuilt when it changed), or None."""
        signature = _signature(generator)
        if signature is None:
            return None
        tensors, key = signature
        if (self.signature is not None and key == self.signature[1] and len(tensors) == len(self.signature[0])
                and all(a is b for a, b in zip(tensors, self.signature[0]))):
            return self.plan  # None when the layout is not LaMa's: not retried until something changes
        self.clear()
        device = next((t.device for t in tensors), torch.device("cpu"))
        precision = _resolve_precision(self.requested, device)
        backend = backends.select(device)
        try:
            # Layers swapped in after optimize() are LaMa's own classes: their fast twins are what
            # the plan recognises. Converting changes their types, so the signature is taken after.
            ffc_kernels.convert(generator)
            # What runs when the plan does not apply: the fused modules, at the asked precision.
            set_precision(generator, precision.dot)
            signature = _signature(generator)
            self.plan, self.why_not = _build_plan(generator, precision, device, backend), None
        except _NotLaMa as exc:
            self.why_not = str(exc)
            backends.warn_once(f"lama_fast.optimize: the whole-generator plan does not apply ({exc}); "
                               "the generator's own forward runs, with fused FFC modules")
        self.signature = signature
        return self.plan

    def clear(self):
        """Forget the plan and the CUDA graphs: the next forward folds the weights again."""
        self.plan, self.signature, self.why_not = None, None, None
        self.graphs.clear()

    def __getstate__(self):  # copies and pickles keep the settings and fold again when first run
        return {"requested": self.requested, "cuda_graphs": self.cuda_graphs, "tile_size": self.tile_size}

    def __setstate__(self, state):
        self.__init__(state["requested"], state["cuda_graphs"], state.get("tile_size"))

    def run_graphed(self, plan, x):
        """Replay a CUDA graph of ``plan.run`` for x's shape, capturing it on the second call."""
        key = (tuple(x.shape), x.dtype, self.tile_size)
        entry = self.graphs.get(key)
        if entry is None:  # first call at this shape: warm up (Triton compiles, cuDNN picks algorithms)
            self.graphs[key] = "warm"
            while len(self.graphs) > _GRAPH_CACHE_SIZE:
                self.graphs.popitem(last=False)
            return plan.run(x, self.tile_size)
        if entry == "warm":
            static_in = x.clone()
            stream = torch.cuda.Stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                plan.run(static_in, self.tile_size)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(x.device), torch.cuda.graph(graph):  # captures on the current device
                static_out = plan.run(static_in, self.tile_size)
            entry = self.graphs[key] = (graph, static_in, static_out)
        self.graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()


class _Forward:
    """The forward ``optimize`` installs on a generator (an attribute of the instance, so the
    generator keeps its class; picklable, unlike a bound function)."""

    def __init__(self, generator: nn.Module):
        self.generator = generator

    def __call__(self, x):
        return _optimized_forward(self.generator, x)


def _optimized_forward(self, x):
    state: _Optimized = self._lama_fast
    original = type(self).forward
    if torch.compiler.is_compiling():
        plan = state.plan
        if plan is None:
            return original(self, x)
        return plan.run(_check_input(plan, x), state.tile_size)
    if self.training or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))):
        return original(self, x)
    if not torch.is_tensor(x):
        raise TypeError(f"the generator takes a tensor, got {type(x).__name__}")
    plan = state.plan_for(self)
    if plan is None:
        return original(self, x)
    x = _check_input(plan, x)
    with cuda_fp32_precision(plan.device, plan.precision.allow_tf32):
        if (state.cuda_graphs and plan.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()):
            return state.run_graphed(plan, x)
        return plan.run(x, state.tile_size)


def _check_input(plan: _Plan, x):
    if x.dim() != 4 or x.shape[1] != plan.in_channels:
        raise ValueError(f"the generator takes N x {plan.in_channels} x H x W (image * (1 - mask), mask), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"the generator input must be floating point (float32), got {x.dtype}")
    if x.device != plan.device:
        raise ValueError(f"the input is on {x.device} but the generator is on {plan.device}")
    return x


def optimize(generator: nn.Module, *, precision: str = "fp32", cuda_graphs: bool = True,
             tile_size: int | None = None) -> nn.Module:
    """Convert a LaMa generator in place into a fast inference module; returns it.

    ``precision``: ``"fp32"`` (default), ``"tf32"`` or ``"bf16"`` (see the module docstring).
    ``cuda_graphs``: replay the CUDA forward from a graph captured per input shape.
    ``tile_size``: run the full-resolution stages (stem, downsampling, upsampling, output
    convolution: all local) in tiles of about this many pixels a side, with halos, so their
    activations are never whole in memory; the 1/8-resolution FFC blocks (global) run whole.
    The output equals the untiled one up to rounding. None (default): no tiles. Calling
    ``optimize`` again on an optimized generator with only a new ``tile_size`` keeps its folded weights.
    The forward takes and returns float32 whatever the precision; training mode and forwards
    that need gradients run the generator's own (fused-module) forward.
    """
    if not isinstance(generator, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(generator).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 16):
        raise ValueError(f"tile_size must be None or an integer of at least 16 pixels, got {tile_size!r}")
    state = getattr(generator, "_lama_fast", None)
    if (isinstance(state, _Optimized) and state.requested == precision and state.cuda_graphs == bool(cuda_graphs)
            and isinstance(getattr(generator, "forward", None), _Forward)):
        state.tile_size = tile_size  # CUDA graphs are kept per (shape, tile size)
        return generator
    ffc_kernels.convert(generator)
    generator._lama_fast = _Optimized(precision, bool(cuda_graphs), tile_size)
    generator.forward = _Forward(generator)
    if not getattr(generator, "_lama_fast_hooked", False):
        # load_state_dict under torch.inference_mode leaves no version trace on inference tensors.
        generator.register_load_state_dict_post_hook(_refold_after_load)
        generator._lama_fast_hooked = True
    return generator


def _refold_after_load(module, incompatible_keys):
    refold(module)


def refold(generator: nn.Module) -> None:
    """Fold an optimized generator's weights again at its next forward. Needed only after writes
    the plan cannot see: through ``p.data`` (no version bump) or to inference tensors."""
    state = getattr(generator, "_lama_fast", None)
    if state is not None:
        state.clear()


def generator_plan(generator: nn.Module) -> _Plan | None:
    """The plan an optimized generator runs now (folded for its current weights), or None when it
    is not optimized or its own forward runs (see ``plan_info``'s why_not)."""
    state = getattr(generator, "_lama_fast", None)
    if not isinstance(state, _Optimized) or generator.training:
        return None
    return state.plan_for(generator)


def plan_info(generator: nn.Module) -> dict:
    """What an optimized generator runs: precision asked and used, backend, or why its plan does not apply."""
    state = getattr(generator, "_lama_fast", None)
    if state is None:
        return {"optimized": False}
    plan = state.plan
    return {
        "optimized": True,
        "precision": state.requested,
        "runs": None if plan is None else plan.precision.name,
        "backend": None if plan is None else plan.backend,
        "device": None if plan is None else str(plan.device),
        "tile_size": state.tile_size,
        "why_not": state.why_not,
    }

