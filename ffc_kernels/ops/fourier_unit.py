"""A whole LaMa FourierUnit (eval): rfft2 -> fused spectral mix -> irfft2, with no scale passes.

What is fused. Eager LaMa runs rfft2 (ortho: transform + scale pass), the seven-kernel
stack/permute/conv/BN/ReLU/permute/complex chain, and irfft2 (ortho: transform + scale pass).
Here the transforms run unnormalised (``norm="backward"`` forward, ``norm="forward"`` inverse:
torch adds no scale pass for either), and the normalisation folds into the mix: with a the
forward and c the inverse scale of ``fft_norm`` (ortho: a = c = 1/sqrt(HW)), ReLU being
positively homogeneous,
    c * irfft(relu(W a X + b)) = irfft(relu((a c) W X + c b)),
so ``spectral_mix`` gets weight_scale = a*c and bias_scale = c. The C2R transform sees
exactly the values LaMa's does (up to rounding), so its treatment of the non-Hermitian
imaginary parts at frequencies 0 and W/2 (which ReLU creates) is the same.

Bytes (fp32, C channels, P = H*W pixels, N = H*(W/2+1) ~ P/2 spectral points; counted op by op
in benchmarks/common.py):
    eager: rfft2 + ortho scale of the spectrum (4CP + 24CN) + the mix chain (112CN) + irfft2 with
           its input clone (24CN + 4CP) + ortho scale of the real output (8CP) = 16CP + 160CN ~ 96CP
    fused: rfft2 (4CP + 8CN) + mix (16CN) + irfft2 with its input clone (24CN + 4CP)
           = 8CP + 48CN ~ 32CP bytes, three times less.
The FFTs stay cuFFT's (pocketfft on CPU); they run in fp32 whatever the input dtype, since
torch.fft rejects bf16 and fp16 overflows at LaMa's sizes.
"""
from __future__ import annotations

import math

import torch

from ffc_kernels import _ext, backends, measured
from ffc_kernels.ops._common import check_shape, check_tensor
from ffc_kernels.ops.spectral_mix import spectral_mix

_FORWARD_SCALE = {"backward": lambda hw: 1.0, "ortho": lambda hw: 1.0 / math.sqrt(hw), "forward": lambda hw: 1.0 / hw}
_INVERSE_SCALE = {"backward": lambda hw: 1.0 / hw, "ortho": lambda hw: 1.0 / math.sqrt(hw), "forward": lambda hw: 1.0}


def fourier_unit(x, packed_weight, bias, *, fft_norm="ortho", precision=None, backend=None):
    """LaMa's FourierUnit with the mix weights packed by ``spectral_mix.pack_weight``; fp32 out.

    ``precision`` is the mix's ("fp32", "tf32", "bf16"; None follows cuDNN's TF32 switch), see
    ``spectral_mix``; the transforms run in fp32 whatever it is."""
    if fft_norm not in _FORWARD_SCALE:
        raise ValueError(f"fft_norm must be one of {sorted(_FORWARD_SCALE)}, got {fft_norm!r}")
    h, w = x.shape[-2:]

    def run(backend):
        if backend == "cuda" and _csrc_can_run(x, packed_weight, bias):
            return _fourier_unit_csrc(x, packed_weight, bias, fft_norm, precision)
        a, c = _FORWARD_SCALE[fft_norm](h * w), _INVERSE_SCALE[fft_norm](h * w)
        spec = torch.fft.rfft2(x.float(), norm="backward")
        mixed = spectral_mix(spec, packed_weight, bias, relu=True, weight_scale=a * c, bias_scale=c,
                             precision=precision, backend=backend)
        return torch.fft.irfft2(mixed, s=(h, w), norm="forward")

    if backend is None and _csrc_can_run(x, packed_weight, bias):
        # csrc's whole FourierUnit against the transforms around the best mix: measured, as every op.
        n = x.shape[0] * h * (w // 2 + 1)
        named = backends.check_precision(precision) or backends.matmul_precision()
        backend = backends.select(
            x.device, has_cuda_impl=True, op="fourier_unit", trial=run, tolerance=measured.TOLERANCE[named],
            shape=(named, x.shape[1], packed_weight.shape[2], measured.size_class(n)))
    return run(backend)


def _csrc_can_run(x, packed_weight, bias) -> bool:
    """Whether csrc's whole FourierUnit can take this call: a CUDA tensor, an extension built with
    it, and no gradient to record (it has no backward; the spectral_mix path has one)."""
    if x.device.type != "cuda" or not _ext.has_fourier_unit():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, packed_weight, bias)))


def _fourier_unit_csrc(x, packed_weight, bias, fft_norm, precision):
    """csrc's FourierUnit: its own cuFFT plans, the mix on tensor cores ("tf32", "bf16") or in IEEE
    fp32 ("fp32"), C2R in place on the mix's output (no clone). The result's rows are padded to
    2 (W // 2 + 1) floats (cuFFT's in-place layout)."""
    check_tensor("x", x, ndim=4)
    b, ci, h, w = x.shape
    check_tensor("packed_weight", packed_weight, dtypes=(torch.float32,), ndim=4, device=x.device)
    co = packed_weight.shape[2]
    check_shape("packed_weight", packed_weight, (2, 2, co, ci))
    if bias is not None:
        check_tensor("bias", bias, dtypes=(torch.float32,), ndim=2, device=x.device)
        check_shape("bias", bias, (2, co))
    x = x.float()
    if x.stride(3) != 1 or x.stride(2) != w:  # cuFFT reads whole (H, W) planes
        x = x.contiguous()
    precision = backends.check_precision(precision) or backends.matmul_precision()
    return torch.ops.ffc_kernels.fourier_unit_cuda(x, packed_weight, bias, fft_norm, precision)
