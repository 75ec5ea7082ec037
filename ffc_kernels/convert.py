"""Swap LaMa FFC modules in any model for their fast twins, in place.

Modules are recognised by class name and structure, not by class identity, so models built
from LaMa's original code (``saicinpainting.training.modules.ffc``) convert as well as this
project's reference. A module is converted by changing its class to the fast twin: weights,
buffers, hooks, device, dtype and train/eval mode stay exactly where they are.
"""
from __future__ import annotations

import torch.nn as nn

from ffc_kernels.modules import FastFFC, FastFFC_BN_ACT, FastFFCResnetBlock

_FFC_PARTS = ("convl2l", "convl2g", "convg2l", "convg2g", "gate")


def _looks_like_ffc(m) -> bool:
    return all(isinstance(getattr(m, name, None), nn.Module) for name in _FFC_PARTS) and all(
        hasattr(m, name) for name in ("ratio_gin", "ratio_gout", "global_in_num")
    )


def _looks_like_ffc_bn_act(m) -> bool:
    return _looks_like_ffc(getattr(m, "ffc", None)) and all(
        isinstance(getattr(m, name, None), nn.Module) for name in ("bn_l", "bn_g", "act_l", "act_g")
    )


def _looks_like_resnet_block(m) -> bool:
    return (_looks_like_ffc_bn_act(getattr(m, "conv1", None)) and _looks_like_ffc_bn_act(getattr(m, "conv2", None))
            and hasattr(m, "inline"))


_TWINS = (
    ("FFC", _looks_like_ffc, FastFFC),
    ("FFC_BN_ACT", _looks_like_ffc_bn_act, FastFFC_BN_ACT),
    ("FFCResnetBlock", _looks_like_resnet_block, FastFFCResnetBlock),
)


def convert(module: nn.Module) -> nn.Module:
    """Replace, in place, every LaMa FFC, FFC_BN_ACT and FFCResnetBlock inside ``module``.

    Returns ``module`` itself. Already converted modules are left as they are; a module whose
    class name matches but whose structure does not is left alone too.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(module).__name__}")
    for m in module.modules():
        for name, looks_right, twin in _TWINS:
            if type(m).__name__ == name and looks_right(m):
                m.__class__ = twin
    return module
