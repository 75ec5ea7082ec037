"""ffc_kernels: fused kernels for LaMa's Fast Fourier Convolution.

- ``FastFFC``, ``FastFFC_BN_ACT``, ``FastFFCResnetBlock``: drop-in twins of LaMa's ``FFC``,
  ``FFC_BN_ACT`` and ``FFCResnetBlock`` (same constructor arguments, same state_dict keys).
- ``convert(model)``: swap every LaMa FFC module in any model for its fast twin, in place.
- ``backend_info()``: which backend (cuda extension, triton, torch) runs, and why.
- ``reference``: the LaMa-faithful plain PyTorch modules every fast path is tested against.

Importing this package never initialises CUDA.
"""
from ffc_kernels import reference
from ffc_kernels.backends import backend_info
from ffc_kernels.convert import convert
from ffc_kernels.modules import FastFFC, FastFFC_BN_ACT, FastFFCResnetBlock

__all__ = ["FastFFC", "FastFFC_BN_ACT", "FastFFCResnetBlock", "backend_info", "convert", "reference"]
