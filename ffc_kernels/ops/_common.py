"""Checks and helpers shared by the op launchers."""
from __future__ import annotations

import torch

from ffc_kernels.backends import triton_interpret


def check_tensor(name: str, t: torch.Tensor, *, dtypes=None, ndim=None, device=None) -> None:
    """Raise a ValueError naming the expected value when ``t`` is not what an op needs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must be {expected}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the input), got {t.device}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def triton_dot_precision(precision: str, dtype: torch.dtype) -> str:
    """The dot flavour for a kernel: bf16/fp16 data always uses its own tensor-core dot.

    Triton's interpreter (3.6 to 3.8) returns garbage from a dot of bf16 or fp16 operands, so
    under TRITON_INTERPRET=1 those dots round their operands to bf16/fp16 and multiply in fp32,
    which gives the same products (exact in fp32) and the same fp32 accumulation.
    """
    if dtype == torch.bfloat16:
        precision = "bf16"
    elif dtype == torch.float16:
        precision = "fp16"
    elif precision not in ("tf32x3", "tf32", "bf16"):
        raise ValueError(f"precision must be 'tf32x3', 'tf32' or 'bf16', got {precision!r}")
    if precision in ("bf16", "fp16") and triton_interpret():
        precision += "_emulated"
    return precision
