"""Checks and helpers shared by the op launchers."""
from __future__ import annotations

import torch


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
    """The dot flavour for a kernel: bf16/fp16 data always uses its own tensor-core dot."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if precision not in ("ieee", "tf32", "bf16"):
        raise ValueError(f"precision must be 'ieee', 'tf32' or 'bf16', got {precision!r}")
    return precision
