"""The pointwise-conv kernel (SpectralTransform's conv1 and conv2 ends) against eager torch, in fp64."""
import pytest
import torch

from ffc_kernels.ops.pointwise_conv import pointwise_conv, pointwise_conv_reference
from helpers import DEVICE_BACKENDS, assert_close_to_reference, max_err

SHAPES = [(1, 5, 7, 6, 9), (2, 19, 33, 7, 8), (3, 24, 20, 4, 6), (1, 70, 66, 5, 5)]


def _inputs(b, ci, co, h, w, device, seed=0, tiled=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    t = r(b, ci, h // 2, w // 3) if tiled else None
    return r(b, ci, h, w), r(co, ci) / ci ** 0.5, r(co), r(b, ci, h, w), t, r(b, co, h, w)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["conv1", "conv2", "conv2_lfu"])
def test_matches_reference_fp32(fp32, device, backend, shape, variant):
    b, ci, co, h, w = shape
    tiled = variant == "conv2_lfu" and h % 2 == 0 and w % 3 == 0
    x, wt, bias, addend, t, residual = _inputs(*shape, device, tiled=tiled)
    kw = dict(relu=True) if variant == "conv1" else dict(addend=addend, tiled=t, residual=residual, relu=True)
    exact = pointwise_conv_reference(x, wt, bias, **kw)
    f32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    plain = pointwise_conv_reference(x.float(), wt.float(), bias.float(), **f32)
    fast = pointwise_conv(x.float(), wt.float(), bias.float(), backend=backend, **f32)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert_close_to_reference(fast, exact, plain)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_writes_into_a_channel_slice_channels_last(fp32, device, backend):
    x, wt, bias, addend, _, residual = _inputs(2, 12, 10, 6, 8, device, seed=1)
    x = x.float().to(memory_format=torch.channels_last)
    big = torch.full((2, 16, 6, 8), 7.0, device=device).to(memory_format=torch.channels_last)
    pointwise_conv(x, wt.float(), bias.float(), addend=addend.float(), residual=residual.float(),
                   out=big[:, 4:14], backend=backend)
    exact = pointwise_conv_reference(x.double(), wt, bias, addend=addend, residual=residual)
    assert max_err(big[:, 4:14], exact) < 1e-4
    assert (big[:, :4] == 7).all() and (big[:, 14:] == 7).all(), "wrote outside its slice"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(device, backend, dtype):
    # Error budget: inputs and output are rounded to 8 (bf16) or 11 (fp16) bits by the caller
    # and the kernel, so allow a few half-precision ulps of the result's magnitude; plain
    # torch in the same dtype is the yardstick.
    x, wt, bias, addend, _, residual = _inputs(2, 40, 24, 6, 6, device, seed=2)
    xh, ah, rh = x.to(dtype), addend.to(dtype), residual.to(dtype)
    exact = pointwise_conv_reference(xh.double(), wt, bias, addend=ah.double(), residual=rh.double(), relu=True)
    fast = pointwise_conv(xh, wt.float(), bias.float(), addend=ah, residual=rh, relu=True, backend=backend)
    assert fast.dtype == dtype
    plain = torch.relu(torch.nn.functional.conv2d(
        (xh + ah), wt.to(dtype)[:, :, None, None], bias.to(dtype)) + rh)
    assert max_err(fast, exact) <= 2 * max_err(plain, exact) + 1e-6


def test_rejects_bad_inputs():
    x, w, b = torch.randn(1, 4, 5, 6), torch.randn(3, 4), torch.randn(3)
    with pytest.raises(ValueError, match="float32 or torch.bfloat16 or torch.float16"):
        pointwise_conv(x.double(), w, b)
    with pytest.raises(ValueError, match="4 dims"):
        pointwise_conv(x[0], w, b)
    with pytest.raises(ValueError, match=r"weight must have shape \(3, 4\)"):
        pointwise_conv(x, torch.randn(3, 5), b)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        pointwise_conv(x, w, torch.randn(4))
    with pytest.raises(ValueError, match=r"addend must have shape \(1, 4, 5, 6\)"):
        pointwise_conv(x, w, b, addend=torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="tiled must have shape"):
        pointwise_conv(x, w, b, tiled=torch.randn(1, 4, 2, 3))
    with pytest.raises(ValueError, match=r"residual must have shape \(1, 3, 5, 6\)"):
        pointwise_conv(x, w, b, residual=torch.randn(1, 4, 5, 6))
    with pytest.raises(ValueError, match=r"out must have shape \(1, 3, 5, 6\)"):
        pointwise_conv(x, w, b, out=torch.empty(1, 3, 5, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pointwise_conv(x.numpy(), w, b)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_bias(device, backend):
    x, w, b = torch.randn(1, 8, 4, 4), torch.randn(6, 8), torch.randn(12)[::2]
    fast = pointwise_conv(x.to(device), w.to(device), b.to(device), backend=backend)
    assert max_err(fast, pointwise_conv_reference(x.double(), w.double(), b.double())) < 1e-5


@pytest.mark.parametrize("device,backend", [db for db in DEVICE_BACKENDS if db[1] == "triton"])
def test_channel_offsets_past_two_to_the_31(device, backend):
    # Channel stride S with 2 * S > 2^31 elements: a channel offset overflows int32. The views
    # touch 16 floats per channel of a lazily allocated buffer, so little memory is used.
    s, c = 1_073_741_888, 3
    storage = torch.empty(c * s, device=device)
    x = storage.as_strided((1, c, 1, 16), (c * s, s, 16, 1))
    for i in range(c):
        storage[i * s: i * s + 16] = torch.randn(16, device=device)
    w = torch.randn(4, c, device=device)
    fast = pointwise_conv(x, w, backend=backend)
    assert max_err(fast, pointwise_conv_reference(x.double(), w.double())) < 1e-5
