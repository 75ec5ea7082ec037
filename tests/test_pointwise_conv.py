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


# (B, Ci, Co, H, W, tile H, tile W): tiles taller than wide and wider than tall, so swapping the
# tile's two extents (or its two strides) reads the wrong values; odd sizes; one tile spanning a whole
# axis; channel counts that are not multiples of 16.
TILED_SHAPES = [(2, 19, 21, 12, 10, 6, 2), (3, 7, 5, 6, 9, 2, 9), (1, 33, 17, 9, 15, 3, 5), (2, 16, 40, 8, 12, 8, 3)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", TILED_SHAPES)
def test_non_square_tiled_addend(fp32, device, backend, shape):
    b, ci, co, h, w, th, tw = shape
    x, wt, bias, addend, _, residual = _inputs(b, ci, co, h, w, device, seed=3)
    tiled = torch.randn(b, ci, th, tw, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    kw = dict(addend=addend, tiled=tiled, residual=residual, relu=True)
    exact = pointwise_conv_reference(x, wt, bias, **kw)
    f32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    plain = pointwise_conv_reference(x.float(), wt.float(), bias.float(), **f32)
    fast = pointwise_conv(x.float(), wt.float(), bias.float(), backend=backend, **f32)
    assert_close_to_reference(fast, exact, plain)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_strided_views_everywhere(fp32, device, backend):
    # Every operand a view whose (H, W) plane is not contiguous: spatial steps and offsets, a
    # transposed tile, channels_last, and an output that is a strided slice of a larger buffer.
    b, ci, co, h, w = 2, 11, 13, 6, 10
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x = r(b, ci + 3, 2 * h, w + 1)[:, 2:2 + ci, ::2, 1:]
    addend = r(b, ci, h, w).to(memory_format=torch.channels_last)
    tiled = r(b, ci, w // 2, h // 3).transpose(2, 3)  # (B, Ci, 2, 5) with the W stride the larger
    residual = r(b, co, h, 2 * w)[..., ::2]
    wt, bias = r(co, ci) / ci ** 0.5, r(co)
    big = torch.full((b, 2 * co, h + 1, w), 7.0, device=device)
    out = big[:, ::2, 1:]
    assert not any(t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
                   for t in (x, tiled, residual, out))
    kw = dict(addend=addend, tiled=tiled, residual=residual, relu=True)
    exact = pointwise_conv_reference(x.double(), wt.double(), bias.double(),
                                     **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    plain = pointwise_conv_reference(x, wt, bias, **kw)
    pointwise_conv(x, wt, bias, out=out, backend=backend, **kw)
    assert_close_to_reference(out, exact, plain)
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[:, ::2, 1:] = False
    assert (big[untouched] == 7).all(), "wrote outside its view"


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
def test_non_contiguous_bias(fp32, device, backend):
    x, w, b = torch.randn(1, 8, 4, 4), torch.randn(6, 8), torch.randn(12)[::2]
    fast = pointwise_conv(x.to(device), w.to(device), b.to(device), backend=backend)
    assert max_err(fast, pointwise_conv_reference(x.double(), w.double(), b.double())) < 1e-5


@pytest.mark.parametrize("device,backend", [db for db in DEVICE_BACKENDS if db[1] == "triton"])
def test_plane_offsets_past_two_to_the_31(fp32, device, backend):
    # Row stride S < 2^31 with 2 * S > 2^31: offsets within one (H, W) plane overflow int32. The
    # view touches 16 floats per row of a lazily allocated buffer, so little memory is used.
    s, rows = 1_073_741_840, 3
    storage = torch.empty(rows * s, device=device)
    x = storage.as_strided((1, 1, rows, 16), (rows * s, rows * s, s, 1))
    for i in range(rows):
        storage[i * s: i * s + 16] = torch.randn(16, device=device)
    w = torch.randn(4, 1, device=device)
    fast = pointwise_conv(x, w, backend=backend)
    assert max_err(fast, pointwise_conv_reference(x.double(), w.double())) < 1e-5


@pytest.mark.parametrize("device,backend", [db for db in DEVICE_BACKENDS if db[1] == "triton"])
def test_channel_offsets_past_two_to_the_31(fp32, device, backend):
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


def _grads(fn, tensors, grad_out, wanted):
    """The gradients of sum(fn(*tensors) * grad_out) for the tensors flagged in ``wanted``."""
    leaves = [t.detach().clone().requires_grad_(w) if t is not None else None for t, w in zip(tensors, wanted)]
    out = fn(*leaves)
    (out * grad_out.to(out.dtype)).sum().backward()
    return tuple(t.grad for t, w in zip(leaves, wanted) if t is not None and w)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("weights_grad", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_backward_matches_reference_autograd(fp32, device, backend, shape, weights_grad, relu):
    """Gradients for every input (x, addend, tiled, residual), weights frozen or not, against
    LaMa-style eager torch under autograd in fp64."""
    b, ci, co, h, w = shape
    tiled = h % 2 == 0 and w % 3 == 0
    x, wt, bias, addend, t, residual = _inputs(*shape, device, tiled=tiled)
    tensors = (x, wt, bias, addend, t, residual)
    wanted = (True, weights_grad, weights_grad, True, tiled, True)
    grad_out = torch.randn(b, co, h, w, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)

    def reference_fn(x, wt, bias, addend, t, residual):
        return pointwise_conv_reference(x, wt, bias, addend=addend, tiled=t, residual=residual, relu=relu)

    def fused_fn(x, wt, bias, addend, t, residual):
        return pointwise_conv(x, wt, bias, addend=addend, tiled=t, residual=residual, relu=relu, backend=backend)

    as32 = tuple(None if v is None else v.float() for v in tensors)
    exact = _grads(reference_fn, tensors, grad_out, wanted)
    plain = _grads(reference_fn, as32, grad_out, wanted)
    fast = _grads(fused_fn, as32, grad_out, wanted)
    assert len(fast) == sum(1 for v, k in zip(tensors, wanted) if v is not None and k)
    assert all(g.dtype == torch.float32 for g in fast)
    assert_close_to_reference(fast, exact, plain)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_backward_into_out_and_bf16_inputs(device, backend):
    """``out=`` with gradients (the result is copied in, autograd follows it) and bf16 activations
    with fp32 weights: the input gradients come back in each input's dtype."""
    b, ci, co, h, w = 2, 6, 5, 4, 6
    x, wt, bias, addend, _, residual = _inputs(b, ci, co, h, w, device)
    xb = x.to(torch.bfloat16).requires_grad_()
    rb = residual.to(torch.bfloat16).requires_grad_()
    out = torch.empty(b, co, h, w, device=device)
    y = pointwise_conv(xb, wt.float(), bias.float(), residual=rb, relu=True, out=out, backend=backend)
    assert y is out
    y.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and rb.grad.dtype == torch.bfloat16
    mask = pointwise_conv_reference(xb.double(), wt, bias, residual=rb.double(), relu=True) > 0
    expected = torch.einsum("bohw,oc->bchw", mask.double(), wt)
    assert (xb.grad.double() - expected).abs().max() <= 0.02 * expected.abs().max()
    assert torch.equal(rb.grad, mask.to(torch.bfloat16))


# --- each precision against what the tensor cores compute, emulated ---------------------------------

TRITON = [db for db in DEVICE_BACKENDS if db[1] == "triton"]


def emulated_pointwise(x, weight, bias, addend, tiled, residual, relu, precision, out_dtype):
    """(value, bound): the kernel's sum s = x + addend + tile(tiled) in fp32, W and s rounded as the
    tensor cores see them at ``precision`` and their products summed in fp64, then bias, residual,
    ReLU; bound = what fp32 accumulation, the epilogue and the store's rounding may add."""
    from tensor_core_rounding import accumulation_bound, emulated_matmul

    b, ci, h, w = x.shape
    s = x.float()
    if addend is not None:
        s = s + addend.float()
    if tiled is not None:
        s = s + tiled.float().repeat(1, 1, h // tiled.shape[2], w // tiled.shape[3])
    value, magnitude, k = emulated_matmul(weight.float(), s.reshape(b, ci, h * w), precision)
    for extra in (bias.float().double()[:, None] if bias is not None else None,
                  residual.float().double().reshape(b, -1, h * w) if residual is not None else None):
        if extra is not None:
            value, magnitude = value + extra, magnitude + extra.abs()
    if relu:
        value = value.clamp_min(0)
    value, magnitude = value.reshape(b, -1, h, w), magnitude.reshape(b, -1, h, w)
    bound = accumulation_bound(magnitude, k, extra_roundings=3)
    if out_dtype == torch.bfloat16:
        # The store to bf16: the GPU rounds to nearest (half an ulp), Triton's interpreter truncates
        # (under one ulp): the band allows the value's bf16 ulp, 2^-8 to 2^-7 of it, under a 1% bias.
        _, exponent = torch.frexp(value.abs() + bound)
        bound = bound + torch.ldexp(torch.ones_like(value), exponent - 8)
    return value, bound


def check_pointwise(fast, *args):
    value, bound = emulated_pointwise(*args, out_dtype=fast.dtype)
    err = (fast.double().cpu() - value.cpu()).abs()
    excess = err - bound.cpu()
    assert excess.max() <= 0, f"{(excess > 0).sum().item()} of {err.numel()} values outside the band"


PRECISION_CASES = [  # (B, Ci, Co, H, W, tiled tile (TH, TW) or None, data dtype)
    (1, 5, 7, 6, 9, None, torch.float32),
    (3, 19, 33, 6, 8, (3, 2), torch.float32),
    (2, 40, 24, 4, 10, (2, 5), torch.bfloat16),
    (2, 17, 20, 5, 7, None, torch.bfloat16),
]


# bf16 data always multiplies as bf16; fp32 data at each precision. The last case reads a channel
# slice of a larger tensor (strided batch and channel strides).
PRECISION_PARAMS = [(case, p) for case in PRECISION_CASES
                    for p in (("bf16",) if case[-1] == torch.bfloat16 else ("fp32", "tf32", "bf16"))]


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("case,precision", PRECISION_PARAMS)
def test_each_precision_within_its_emulated_rounding(device, backend, case, precision):
    b, ci, co, h, w, tile, dtype = case
    x, wt, bias, addend, _, residual = _inputs(b, ci + 3, co, h, w, device, seed=7)
    x, addend = x[:, 1:ci + 1], addend[:, 2:ci + 2]  # channel slices: strided views
    g = torch.Generator().manual_seed(8)
    tiled = torch.randn(b, ci, *tile, generator=g, dtype=torch.float64).to(device) if tile else None
    wt, bias = wt[:, :ci].float().contiguous(), bias.float()
    x = x.to(dtype)
    kw = {k: v.to(dtype) for k, v in dict(addend=addend, tiled=tiled, residual=residual).items()} if tile else {}
    fast = pointwise_conv(x, wt, bias, relu=True, precision=precision, backend=backend, **kw)
    assert fast.dtype == dtype
    check_pointwise(fast, x, wt, bias, kw.get("addend"), kw.get("tiled"), kw.get("residual"), True, precision)


@pytest.mark.parametrize("device,backend", TRITON)
def test_the_band_catches_a_one_percent_bias_and_the_wrong_precision(device, backend):
    x, wt, bias, addend, _, residual = _inputs(2, 24, 20, 6, 8, device, seed=9)
    x, wt, bias, addend, residual = (t.float() for t in (x, wt, bias, addend, residual))
    kw = dict(addend=addend, residual=residual)
    results = {p: pointwise_conv(x, wt, bias, relu=True, precision=p, backend=backend, **kw)
               for p in ("fp32", "tf32", "bf16")}
    args = (x, wt, bias, addend, None, residual, True)
    for precision, fast in results.items():
        check_pointwise(fast, *args, precision)
        with pytest.raises(AssertionError, match="outside the band"):
            check_pointwise(fast * 1.01, *args, precision)
        for other in results:
            if other != precision:
                with pytest.raises(AssertionError, match="outside the band"):
                    check_pointwise(fast, *args, other)
    xb, ab, rb = x.bfloat16(), addend.bfloat16(), residual.bfloat16()
    fast = pointwise_conv(xb, wt, bias, addend=ab, residual=rb, relu=True, backend=backend)
    assert fast.dtype == torch.bfloat16
    check_pointwise(fast, xb, wt, bias, ab, None, rb, True, "bf16")
    with pytest.raises(AssertionError, match="outside the band"):
        check_pointwise((fast.float() * 1.01).bfloat16(), xb, wt, bias, ab, None, rb, True, "bf16")
