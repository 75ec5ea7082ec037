"""Folding eval BatchNorm into the convolution before it: y = scale * conv(x) + shift."""
from __future__ import annotations

import torch
import torch.nn as nn


def batchnorm_affine(bn: nn.Module):
    """(scale, shift) of an eval BatchNorm as float64 vectors, (None, None) for an Identity.

    Returns None when ``bn`` cannot be folded (training mode, no running statistics, or a
    norm layer other than BatchNorm2d / Identity).
    """
    if isinstance(bn, nn.Identity):
        return None, None
    if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_mean is None:
        return None
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    return scale, shift


def fold(weight: torch.Tensor, affine, conv_bias: torch.Tensor | None = None):
    """scale * (W x + conv_bias) + shift as (W', b') in float64; b' is None when nothing adds."""
    scale, shift = affine
    w = weight.double()
    b = None if conv_bias is None else conv_bias.double()
    if scale is not None:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        b = shift if b is None else b * scale + shift
    return w, b
