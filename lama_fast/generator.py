"""LaMa generators by configuration name, reference or optimized."""
from __future__ import annotations

import torch.nn as nn

import ffc_kernels
from ffc_kernels.reference import GENERATOR_CONFIGS, build_reference_generator

__all__ = ["GENERATOR_CONFIGS", "build_generator", "optimize"]


def build_generator(name: str = "big-lama", n_blocks: int | None = None) -> nn.Module:
    """The reference LaMa generator for a configuration name (``big-lama``, ``lama-fourier``), in eval mode."""
    return build_reference_generator(name, n_blocks=n_blocks)


def optimize(generator: nn.Module) -> nn.Module:
    """Swap every FFC module of ``generator`` for its fused ``ffc_kernels`` twin, in place.

    Weights, buffers, device, dtype and train/eval mode are kept; returns the same object.
    """
    return ffc_kernels.convert(generator)
