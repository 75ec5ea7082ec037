"""Which backend runs a fused op, and why: the one place that decides.

Order for CUDA tensors: the CUDA extension (csrc/, for the ops it implements), then Triton,
then torch. CPU tensors take the torch path, except under ``TRITON_INTERPRET=1`` with the
Triton backend forced, which is how the kernels are proven on machines without a GPU.
``FFC_KERNELS_BACKEND=torch|triton|cuda`` forces one; forcing one that cannot run raises.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import torch

from ffc_kernels import _ext

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "FFC_KERNELS_BACKEND"

try:
    import triton  # noqa: F401

    _TRITON_ERROR = None
except Exception as exc:  # ImportError, or a broken install
    _TRITON_ERROR = f"triton is not importable: {exc}"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forced_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return value


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if _TRITON_ERROR:
            return _TRITON_ERROR
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return None
        return f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not on {device.type}"
    if backend == "cuda":
        if not _ext.available():
            return _ext.why_unavailable()
        if device.type != "cuda":
            return f"the CUDA extension runs on CUDA tensors, not on {device.type}"
        return None
    raise ValueError(f"unknown backend {backend!r}")


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def select(device: torch.device, has_cuda_impl: bool = False) -> str:
    """The backend that runs an op on ``device``.

    ``has_cuda_impl`` says whether the op has a kernel in the CUDA extension; ops without one
    run on Triton when the extension is chosen.
    """
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        reason = _unavailable(forced, device)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}={forced} cannot run: {reason}")
        if forced == "cuda" and not has_cuda_impl:
            return "triton" if _unavailable("triton", device) is None else "torch"
        return forced
    if device.type != "cuda":
        return "torch"
    if has_cuda_impl and _unavailable("cuda", device) is None:
        return "cuda"
    if _unavailable("triton", device) is None:
        return "triton"
    warn_once(f"ffc_kernels: Triton unavailable ({_TRITON_ERROR}); CUDA tensors use the torch path")
    return "torch"


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What runs on a device, and why each other backend does not."""

    device: str
    selected: str
    forced: str | None
    reasons: dict
    matmul_precision: str

    def __str__(self) -> str:
        lines = [f"ffc_kernels backend on {self.device}: {self.selected}"
                 + (f" (forced by {ENV_VAR}={self.forced})" if self.forced else "")]
        for name in BACKENDS:
            lines.append(f"  {name:7s}: {self.reasons[name] or 'available'}")
        lines.append(f"  spectral matmul precision: {self.matmul_precision}"
                     " (torch.get_float32_matmul_precision: highest=tf32x3, high=tf32, medium=bf16)")
        return "\n".join(lines)


@torch.compiler.assume_constant_result
def matmul_precision() -> str:
    """The dot precision of the fused kernels for fp32 inputs, from torch's own setting."""
    return {"highest": "tf32x3", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]


def backend_info(device: str | torch.device | None = None) -> BackendInfo:
    """Which backend runs on ``device`` (default: cuda when present, else cpu) and why.

    Never initialises CUDA unless ``device`` is None and CUDA is available.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    reasons = {name: _unavailable(name, device) for name in BACKENDS}
    missing = _missing_cuda_device(device)
    if missing:
        # select() only ever sees tensors that exist; with no such device nothing runs there at all.
        reasons = {name: reason or missing for name, reason in reasons.items()}
        selected = f"none ({missing})"
    else:
        try:
            selected = select(device, has_cuda_impl=True)
        except RuntimeError as exc:
            selected = f"none ({exc})"
    return BackendInfo(str(device), selected, forced_backend(), reasons, matmul_precision())


def _missing_cuda_device(device: torch.device) -> str | None:
    """Why torch cannot place tensors on the CUDA ``device``, or None (also for non-CUDA devices)."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"torch sees {count} CUDA device{'s' if count > 1 else ''}, so there is no {device}"
    return None
