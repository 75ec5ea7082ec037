"""Loading csrc's CUDA extension, ``ffc_kernels._C``, and recording why it is missing.

The extension is built only on request (``FFC_KERNELS_BUILD_EXT=1 pip install
--no-build-isolation -e .`` with ``CUDA_HOME`` set; see csrc/README.md). Importing this module never initialises CUDA and never
raises: a missing or broken extension is recorded, and ``why_unavailable()`` says why.
"""
from __future__ import annotations

import importlib
import os

import torch  # loads libtorch, which the extension links against

NOT_BUILT = "not built: set FFC_KERNELS_BUILD_EXT=1 and reinstall"

try:
    _C = importlib.import_module("ffc_kernels._C")

    _WHY = None
except ModuleNotFoundError as exc:
    _C = None
    _WHY = NOT_BUILT if exc.name == "ffc_kernels._C" else f"ffc_kernels._C failed to import: {exc}"
except Exception as exc:  # ImportError from the loader (undefined symbol, wrong torch ABI), OSError
    _C = None
    _WHY = f"ffc_kernels._C failed to import: {type(exc).__name__}: {exc}"


def available() -> bool:
    """Whether ``ffc_kernels._C`` is importable (says nothing about a GPU being present)."""
    return _C is not None


def build_id() -> str | None:
    """What tells one build of the extension from another (its file's size and modification
    time), or None when it is not loaded: measured backend choices are kept per build."""
    if _C is None:
        return None
    stat = os.stat(_C.__file__)
    return f"{stat.st_size}-{int(stat.st_mtime)}"


def why_unavailable() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    return _WHY


def spectral_mix(spec: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 relu: bool) -> torch.Tensor:
    """The CUDA kernel of csrc/spectral_mix.cu: LaMa FourierUnit's 1x1 conv on rfft2's output.

    ``spec`` complex64 (B, Ci, H, Wf) on CUDA, spatial dims contiguous; ``weight`` fp32
    (2Co, 2Ci) with BatchNorm folded in, channel 2c = Re, 2c + 1 = Im; ``bias`` fp32 (2Co,) or
    None; returns complex64 (B, Co, H, Wf), ReLU applied to real and imaginary parts if ``relu``.
    """
    if _C is None:
        raise RuntimeError(f"ffc_kernels CUDA extension unavailable: {_WHY}")
    return _C.spectral_mix(spec, weight, bias, bool(relu))


def has_fourier_unit() -> bool:
    """Whether the loaded extension has the CUDA FourierUnit (builds before it do not)."""
    return _C is not None and hasattr(_C, "fourier_unit")


def fourier_unit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = True,
                 fft_norm: str = "ortho", precision: str = "tf32") -> torch.Tensor:
    """csrc's FourierUnit: rfft2 -> spectral mix -> irfft2 with cuFFT plans cached per shape and stream.

    ``x`` fp32 (B, Ci, H, W) on CUDA with contiguous (H, W) planes; ``weight`` LaMa's (2Co, 2Ci)
    with BatchNorm folded; ``bias`` (2Co,) or None; ``fft_norm`` as LaMa's; ``precision``
    "tf32" or "bf16" (operands rounded so, tensor cores, fp32 accumulation) or "fp32" (IEEE fp32
    FMAs). Returns fp32 (B, Co, H, W),
    a view whose rows are padded to 2 (W // 2 + 1) floats (the C2R ran in place).
    """
    if not has_fourier_unit():
        raise RuntimeError("ffc_kernels CUDA extension has no fourier_unit: "
                           f"{_WHY or 'built before it existed; rebuild it'}")
    return _C.fourier_unit(x, weight, bias, bool(relu), fft_norm, precision)


_UNPACKED: dict = {}


def _lama_layout(packed_weight: torch.Tensor, bias: torch.Tensor | None, weight_scale: float, bias_scale: float):
    """ops/spectral_mix.py's packed (2, 2, Co, Ci) weight and (2, Co) bias in LaMa's (2Co, 2Ci) and
    (2Co,) layout, scaled, derived once per (weight, bias, scales) and cached. The entry keeps its
    source tensors alive and checks their identity and version, so a new tensor at a recycled
    address never hits a stale entry."""
    key = (id(packed_weight), id(bias), weight_scale, bias_scale)
    # Folded weights made under torch.inference_mode are inference tensors: no version counter,
    # and nothing outside inference mode can change them in place.
    versions = tuple(None if t is None or t.is_inference() else t._version for t in (packed_weight, bias))
    entry = _UNPACKED.get(key)
    if entry is None or entry[0] is not packed_weight or entry[1] is not bias or entry[2] != versions:
        if len(_UNPACKED) > 256:  # folded weights of a few models at a few sizes
            _UNPACKED.clear()
        co, ci = packed_weight.shape[2:]
        w = (packed_weight.permute(2, 0, 3, 1).reshape(2 * co, 2 * ci) * weight_scale).contiguous()
        b = None if bias is None else (bias.t().reshape(2 * co) * bias_scale).contiguous()
        entry = _UNPACKED[key] = (packed_weight, bias, versions, w, b)
    return entry[3], entry[4]


def spectral_mix_packed(spec: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, relu: bool,
                        weight_scale: float, bias_scale: float) -> torch.Tensor:
    """``spectral_mix`` for ops/spectral_mix.py's packed (2, 2, Co, Ci) weight and (2, Co) bias.

    The kernel reads LaMa's (2Co, 2Ci) layout with the scales applied; that form is cached (see
    ``_lama_layout``), so a steady-state call launches the kernel alone.
    """
    w, b = _lama_layout(packed_weight, bias, weight_scale, bias_scale)
    return spectral_mix(spec, w, b, relu)


def fourier_unit_packed(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None,
                        fft_norm: str, precision: str) -> torch.Tensor:
    """``fourier_unit`` (with ReLU) for the packed weight and bias of ops/fourier_unit.py; the FFT
    normalisation is folded into the mix inside the extension, so the weights go unscaled."""
    w, b = _lama_layout(packed_weight, bias, 1.0, 1.0)
    return fourier_unit(x, w, b, True, fft_norm, precision)


# One opaque op for torch.compile and CUDA graphs (as ops/spectral_mix.py registers its own): the
# fake kernel gives the output's shape and its padded row stride.
@torch.library.custom_op("ffc_kernels::fourier_unit_cuda", mutates_args=())
def _fourier_unit_op(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, fft_norm: str,
                     precision: str) -> torch.Tensor:
    return fourier_unit_packed(x, packed_weight, bias, fft_norm, precision)


@_fourier_unit_op.register_fake
def _(x, packed_weight, bias, fft_norm, precision):
    b, _, h, w = x.shape
    return x.new_empty((b, packed_weight.shape[2], h, 2 * (w // 2 + 1)))[..., :w]
