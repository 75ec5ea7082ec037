"""Which backend runs a fused op, and why: the one place that decides.

For CUDA tensors the fastest backend, measured once per op, GPU and shape class
(``ffc_kernels.measured``); where nothing can be measured, Triton, then the CUDA extension
(csrc/, for the ops it implements), then torch. CPU tensors take the torch path, except under ``TRITON_INTERPRET=1`` with the
Triton backend forced, which is how the kernels are proven on machines without a GPU.
``FFC_KERNELS_BACKEND=torch|triton|cuda`` forces one; forcing one that cannot run raises.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Callable

import torch

from ffc_kernels import _ext, measured

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


def select(device: torch.device, has_cuda_impl: bool = False, *, op: str | None = None, shape: tuple = (),
           trial: Callable[[str], object] | None = None, tolerance: float | None = None) -> str:
    """The backend that runs an op on ``device``.

    ``has_cuda_impl`` says whether the op has a kernel in the CUDA extension; ops without one
    run on Triton when the extension is forced. On CUDA, an op that says how to run itself
    (``op``, ``shape``: its shape class, ``trial(backend)``: runs it once) gets the fastest of
    the backends that can run it, timed once per op, GPU and shape class and kept on disk for
    every process (``ffc_kernels.measured``); with a ``tolerance``, a backend whose output differs
    from the torch backend's by more is never chosen. A CUDA graph capture or a torch.compile trace
    cannot time anything: it takes the stored choice, else the fixed order Triton, the CUDA
    extension, torch, which is also what an op without a trial gets.
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
    candidates = [b for b in ("triton", "cuda", "torch")
                  if (b != "cuda" or has_cuda_impl) and _unavailable(b, device) is None]
    if candidates == ["torch"]:
        warn_once(f"ffc_kernels: Triton unavailable ({_TRITON_ERROR}); CUDA tensors use the torch path")
    if op is None or trial is None or len(candidates) == 1:
        return candidates[0]
    if torch.compiler.is_compiling():
        return _stored_choice(op, str(device), tuple(shape), tuple(candidates))
    if torch.cuda.is_current_stream_capturing():
        return measured.known(op, device, tuple(shape), candidates) or candidates[0]
    return measured.choose(op, device, tuple(shape), candidates, trial, tolerance=tolerance)


@torch.compiler.assume_constant_result
def _stored_choice(op: str, device: str, shape: tuple, candidates: tuple) -> str:
    """The stored measured choice, else the first candidate: a constant in a compiled graph."""
    return measured.known(op, torch.device(device), shape, list(candidates)) or candidates[0]


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What runs on a device, and why each other backend does not."""

    device: str
    selected: str
    forced: str | None
    reasons: dict
    matmul_precision: str
    measured: dict = dataclasses.field(default_factory=dict)  # "op shape-class" -> (backend, {backend: ms})

    def __str__(self) -> str:
        lines = [f"ffc_kernels backend on {self.device}: {self.selected}"
                 + (f" (forced by {ENV_VAR}={self.forced})" if self.forced else "")]
        for name in BACKENDS:
            lines.append(f"  {name:7s}: {self.reasons[name] or 'available'}")
        lines.append(f"  precision on fp32 data: {self.matmul_precision} (by torch.backends.cudnn.allow_tf32"
                     " like LaMa's convolutions: tf32 when True, fp32-class split TF32 when False; an op's or"
                     " module's precision argument overrides it; bf16 data always multiplies as bf16)")
        if self.forced is None and self.selected in BACKENDS and self.device.startswith("cuda"):
            lines.append(f"  measured choices (per op and shape class, in {measured.cache_directory()}): "
                         + ("none yet" if not self.measured else ""))
            for what, (backend, ms) in sorted(self.measured.items()):
                times = ", ".join(f"{b} {t:.3f} ms" for b, t in sorted(ms.items(), key=lambda item: item[1]))
                lines.append(f"    {what}: {backend} ({times})")
        return "\n".join(lines)


PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str | None) -> str | None:
    """``precision`` as given to an op or module: None (the default below) or one of PRECISIONS."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


# Read once per compiled graph: a guard on a global flag would otherwise break fullgraph tracing.
@torch.compiler.assume_constant_result
def matmul_precision() -> str:
    """The precision of the fused ops' dots on fp32 data when the caller names none.

    What the 1x1 convolutions they replace would run: cuDNN convolutions follow
    ``torch.backends.cudnn.allow_tf32`` (True by default, so TF32 on a GPU), hence "tf32",
    or "fp32" (fp32-class split TF32) when it is False. torch's float32 matmul precision
    governs matmuls, not convolutions, and is not read.
    """
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


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
    prefix = measured.prefix(device) if device.type == "cuda" and not missing else None
    choices = {} if prefix is None else {
        k[len(prefix):].replace("|", " "): (v["backend"], v.get("ms", {}))
        for k, v in measured.choices().items() if k.startswith(prefix)}
    return BackendInfo(str(device), selected, forced_backend(), reasons, matmul_precision(), choices)


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


# ------------------------------------------------------------------ torch's fp32 switches

class _Switch:
    """One of torch's process-wide fp32 precision switches, read and written through the API the
    process already uses: torch raises when its legacy flags are read after its per-backend
    ``fp32_precision`` API was used, and the legacy matmul flag cannot say "medium"."""

    def __init__(self, kind: str):
        self.kind = kind
        try:
            if kind == "matmul":
                self.legacy = torch.get_float32_matmul_precision()
            else:
                self.legacy = torch.backends.cudnn.allow_tf32
        except RuntimeError:  # the process uses fp32_precision
            self.legacy = None
        self.target = torch.backends.cuda.matmul if kind == "matmul" else torch.backends.cudnn.conv

    def get(self):
        if self.legacy is not None:
            return torch.get_float32_matmul_precision() if self.kind == "matmul" else torch.backends.cudnn.allow_tf32
        return self.target.fp32_precision

    def set(self, value) -> None:
        if self.legacy is None:
            self.target.fp32_precision = value
        elif self.kind == "matmul":
            torch.set_float32_matmul_precision(value)
        else:
            torch.backends.cudnn.allow_tf32 = value

    def value(self, allow_tf32: bool):
        if self.legacy is None:
            return "tf32" if allow_tf32 else "ieee"
        if self.kind == "matmul":
            return "high" if allow_tf32 else "highest"
        return allow_tf32


def fp32_switches() -> list[_Switch]:
    """cuDNN's convolutions and cuBLAS's matmuls."""
    return [_Switch("conv"), _Switch("matmul")]


@contextlib.contextmanager
def cuda_fp32_precision(device: torch.device, allow_tf32: bool):
    """cuDNN's and cuBLAS's fp32 precision as the plan needs them, for the duration of a CUDA
    forward (they are process-wide switches, the only control torch gives), restored afterwards."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        yield
        return
    switches = fp32_switches()
    saved = [switch.get() for switch in switches]
    try:
        for switch in switches:
            switch.set(switch.value(allow_tf32))
        yield
    finally:
        for switch, value in zip(switches, saved):
            switch.set(value)
