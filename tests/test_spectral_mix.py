"""The spectral mix kernel against LaMa's stack/permute/conv/ReLU math, in fp64."""
import pytest
import torch

from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight, spectral_mix, spectral_mix_reference
from helpers import DEVICE_BACKENDS, assert_close_to_reference, max_err

SHAPES = [  # (B, Ci, Co, H, W): odd H and W, channels not multiples of 16, batch 1..3
    (1, 5, 7, 6, 9),
    (2, 19, 33, 7, 8),
    (3, 24, 20, 5, 5),
    (1, 70, 66, 4, 6),
]


def _inputs(b, ci, co, h, w, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, ci, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(2 * co, 2 * ci, generator=g, dtype=torch.float64) / (2 * ci) ** 0.5
    bias = torch.randn(2 * co, generator=g, dtype=torch.float64)
    return torch.fft.rfft2(x, norm="ortho").to(device), weight.to(device), bias.to(device)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu,with_bias", [(True, True), (False, False)])
def test_matches_reference_fp32(fp32, device, backend, shape, relu, with_bias):
    spec64, w64, b64 = _inputs(*shape, device)
    b64 = b64 if with_bias else None
    exact = spectral_mix_reference(spec64, w64, b64, relu)
    spec, w = spec64.to(torch.complex64), w64.float()
    b = None if b64 is None else b64.float()
    plain = spectral_mix_reference(spec, w, b, relu)
    fast = spectral_mix(spec, pack_weight(w), None if b is None else pack_bias(b), relu=relu, backend=backend)
    assert fast.dtype == torch.complex64 and fast.shape == exact.shape and fast.is_contiguous()
    assert_close_to_reference(torch.view_as_real(fast), torch.view_as_real(exact), torch.view_as_real(plain))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_scales_fold_like_separate_passes(fp32, device, backend):
    spec64, w64, b64 = _inputs(2, 9, 11, 6, 7, device, seed=1)
    exact = spectral_mix_reference(spec64, w64 * 0.25, b64 * 0.5, True)
    fast = spectral_mix(spec64.to(torch.complex64), pack_weight(w64.float()), pack_bias(b64.float()),
                        weight_scale=0.25, bias_scale=0.5, backend=backend)
    assert max_err(torch.view_as_real(fast), torch.view_as_real(exact)) < 1e-5


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_reads_strided_channels_in_place(fp32, device, backend):
    # A channel slice of a bigger spectrum: batch and channel strides differ from contiguous.
    spec64, w64, b64 = _inputs(2, 12, 8, 5, 8, device, seed=2)
    part = spec64[:, 3:10]
    exact = spectral_mix_reference(part, w64[:, : 2 * 7], b64, True)
    fast = spectral_mix(part.to(torch.complex64), pack_weight(w64[:, : 2 * 7].float()), pack_bias(b64.float()),
                        backend=backend)
    assert max_err(torch.view_as_real(fast), torch.view_as_real(exact)) < 1e-4


@pytest.mark.parametrize("device,backend", [db for db in DEVICE_BACKENDS if db[1] == "triton"])
@pytest.mark.parametrize("precision,factor", [("tf32", 2 ** -10), ("bf16", 2 ** -7)])
def test_tensor_core_precisions(device, backend, precision, factor):
    # TF32 and BF16 dots round inputs to 10 and 7 mantissa bits; the error bound is a few
    # times that rounding times the sum of |w||x| (fp32 accumulation adds nothing visible).
    spec64, w64, b64 = _inputs(2, 40, 24, 8, 8, device, seed=3)
    exact = spectral_mix_reference(spec64, w64, b64, True)
    fast = spectral_mix(spec64.to(torch.complex64), pack_weight(w64.float()), pack_bias(b64.float()),
                        precision=precision, backend=backend)
    x = torch.view_as_real(spec64).permute(0, 1, 4, 2, 3).reshape(2, 80, 8, 5).abs()
    magnitude = torch.nn.functional.conv2d(x, w64.abs()[:, :, None, None]).max().item()
    err = max_err(torch.view_as_real(fast), torch.view_as_real(exact))
    assert err <= 4 * factor * magnitude
    if device == "cuda":  # the interpreter computes dots in fp32 whatever the precision
        assert err > 1e-7 * magnitude, "a reduced-precision dot should not be exact"


def test_pack_weight_layout():
    w = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)  # Co=2, Ci=3
    packed = pack_weight(w)
    for p in range(2):
        for q in range(2):
            for o in range(2):
                for c in range(3):
                    assert packed[p, q, o, c] == w[2 * o + p, 2 * c + q]
    assert pack_bias(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [[1.0, 3.0], [2.0, 4.0]]


@pytest.mark.parametrize("backend", ["torch"] + [b for d, b in DEVICE_BACKENDS if d == "cpu" and b == "triton"])
def test_rejects_bad_inputs(backend):
    spec = torch.fft.rfft2(torch.randn(1, 3, 4, 6))
    w, b = pack_weight(torch.randn(10, 6)), pack_bias(torch.randn(10))
    with pytest.raises(ValueError, match="complex64"):
        spectral_mix(spec.to(torch.complex128), w, b, backend=backend)
    with pytest.raises(ValueError, match="4 dims"):
        spectral_mix(spec[0], w, b, backend=backend)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 5, 3\)"):
        spectral_mix(spec, pack_weight(torch.randn(10, 8)), b, backend=backend)
    with pytest.raises(ValueError, match="float32"):
        spectral_mix(spec, w.double(), b, backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 5\)"):
        spectral_mix(spec, w, pack_bias(torch.randn(8)), backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        spectral_mix(spec.transpose(2, 3), w, b, backend=backend)
    with pytest.raises(ValueError, match="even dims"):
        pack_weight(torch.randn(5, 6))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on"):
            spectral_mix(spec, w.cuda(), b, backend=backend)


def test_compiles_as_one_op():
    spec = torch.fft.rfft2(torch.randn(1, 3, 4, 6))
    w, b = pack_weight(torch.randn(10, 6)), pack_bias(torch.randn(10))
    fn = torch.compile(lambda s: spectral_mix(s, w, b, backend="torch"), fullgraph=True, backend="aot_eager")
    assert max_err(torch.view_as_real(fn(spec)), torch.view_as_real(spectral_mix(spec, w, b, backend="torch"))) == 0
