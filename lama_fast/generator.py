"""LaMa generators by configuration name (``optimize`` lives in lama_fast.optimized)."""
from __future__ import annotations

import torch.nn as nn

from ffc_kernels.reference import GENERATOR_CONFIGS, build_reference_generator

__all__ = ["GENERATOR_CONFIGS", "build_generator"]


def build_generator(name: str = "big-lama", n_blocks: int | None = None) -> nn.Module:
    """The reference LaMa generator for a configuration name (``big-lama``, ``lama-fourier``), in eval mode."""
    return build_reference_generator(name, n_blocks=n_blocks)
