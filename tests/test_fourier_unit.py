"""A fused FourierUnit (unnormalised FFTs, folded BatchNorm and scales) against LaMa's FourierUnit."""
import copy

import pytest
import torch

from ffc_kernels.fold import batchnorm_affine, fold
from ffc_kernels.ops.fourier_unit import fourier_unit
from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight
from ffc_kernels.reference import FourierUnit
from helpers import DEVICE_BACKENDS, assert_close_to_reference, randomize_batchnorm


def _fused(unit, x, backend):
    w, b = fold(unit.conv_layer.weight, batchnorm_affine(unit.bn))
    return fourier_unit(x, pack_weight(w.float()), pack_bias(b.float()), fft_norm=unit.fft_norm, backend=backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("c,h,w,b", [(6, 8, 8, 1), (5, 7, 9, 2), (17, 9, 6, 3), (3, 1, 5, 1)])
@pytest.mark.parametrize("fft_norm", ["ortho", "backward", "forward"])
def test_matches_lama_fourier_unit(fp32, device, backend, c, h, w, b, fft_norm):
    torch.manual_seed(0)
    unit = randomize_batchnorm(FourierUnit(c, c, fft_norm=fft_norm)).eval()
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    with torch.no_grad():
        exact = copy.deepcopy(unit).double().to(device)(x.to(device))
        plain = copy.deepcopy(unit).to(device)(x.float().to(device))
        fast = _fused(unit.to(device), x.float().to(device), backend)
    assert fast.shape == (b, c, h, w) and fast.dtype == torch.float32
    assert_close_to_reference(fast, exact, plain)


def test_c2r_sees_the_same_non_hermitian_bins(fp32):
    # ReLU makes Im at frequency 0 and W/2 non-zero; C2R must treat them as LaMa's irfft2 does.
    # A bias on the imaginary channels makes those bins large, so a different treatment shows.
    torch.manual_seed(1)
    unit = FourierUnit(4, 4).eval()
    with torch.no_grad():
        unit.bn.bias[1::2] = 5.0
    x = torch.randn(1, 4, 6, 8)
    with torch.no_grad():
        assert (unit(x) - _fused(unit, x, "torch")).abs().max() < 1e-5


def test_rejects_unknown_norm():
    w, b = pack_weight(torch.randn(4, 4)), pack_bias(torch.randn(4))
    with pytest.raises(ValueError, match="fft_norm"):
        fourier_unit(torch.randn(1, 2, 4, 4), w, b, fft_norm="unitary")
