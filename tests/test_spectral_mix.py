"""The spectral mix kernel against LaMa's stack/permute/conv/ReLU math, in fp64."""
import pytest
import torch

from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight, spectral_mix, spectral_mix_reference
from helpers import DEVICE_BACKENDS, assert_close_to_reference, max_err
from tensor_core_rounding import accumulation_bound, emulated_matmul, round_tf32

try:
    import triton
    import triton.language as tl

    from ffc_kernels.ops._common import round_to_tf32
except ImportError:
    triton = None

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


TRITON = [db for db in DEVICE_BACKENDS if db[1] == "triton"]


def emulated_mix(spec, weight, bias, relu, weight_scale, bias_scale, precision):
    """(value, bound) as real (B, Co, H, Wf, 2) tensors: the mix from the operands the kernel reads
    (complex64 spectrum, fp32 weight) rounded as the tensor cores see them at ``precision``, summed in
    fp64, and the most fp32 accumulation and the epilogue's roundings can move a kernel from it."""
    b, ci, h, wf = spec.shape
    x = torch.view_as_real(spec.to(torch.complex64)).permute(0, 1, 4, 2, 3).reshape(b, 2 * ci, h * wf)
    value, magnitude, k = emulated_matmul(weight.float().reshape(weight.shape[0], -1), x, precision)
    value, magnitude = value * weight_scale, magnitude * abs(weight_scale)
    if bias is not None:
        shift = bias.float().double()[:, None] * bias_scale
        value, magnitude = value + shift, magnitude + shift.abs()
    if relu:
        value = value.clamp_min(0)
    as_output = lambda y: y.reshape(b, -1, 2, h, wf).permute(0, 1, 3, 4, 2)  # noqa: E731
    return as_output(value), accumulation_bound(as_output(magnitude), k, extra_roundings=3)


def check_emulated(fast, spec, weight, bias, relu, precision, weight_scale=1.0, bias_scale=1.0):
    value, bound = emulated_mix(spec, weight, bias, relu, weight_scale, bias_scale, precision)
    err = (torch.view_as_real(fast).double().cpu() - value.cpu()).abs()
    excess = err - bound.cpu()
    worst = excess.argmax()
    assert excess.max() <= 0, (f"{precision}: error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
                               f"({(excess > 0).sum().item()} of {err.numel()} values outside)")


CASES = [  # (B, Ci, Co, H, W, channel slice or None): odd sizes, batch > 1, strided views
    (1, 5, 7, 6, 9, None),
    (3, 19, 33, 7, 8, None),
    (2, 70, 66, 5, 6, None),
    (2, 12, 7, 5, 8, (3, 10)),
]


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_each_precision_within_its_emulated_rounding(device, backend, precision, case):
    *shape, part = case
    spec64, w64, b64 = _inputs(*shape, device, seed=3)
    if part is not None:  # a channel slice of a bigger spectrum: batch and channel strides not contiguous
        spec64 = spec64[:, part[0]:part[1]]
    spec, w, b = spec64.to(torch.complex64), w64[:, : 2 * spec64.shape[1]].float(), b64.float()
    fast = spectral_mix(spec, pack_weight(w), pack_bias(b), weight_scale=0.5, bias_scale=0.25, precision=precision,
                        backend=backend)
    check_emulated(fast, spec, w, b, True, precision, weight_scale=0.5, bias_scale=0.25)


@pytest.mark.parametrize("device,backend", TRITON)
def test_the_band_catches_a_one_percent_bias_and_the_wrong_precision(device, backend):
    spec64, w64, b64 = _inputs(2, 20, 24, 8, 8, device, seed=4)
    spec, w, b = spec64.to(torch.complex64), w64.float(), b64.float()
    results = {p: spectral_mix(spec, pack_weight(w), pack_bias(b), precision=p, backend=backend)
               for p in ("fp32", "tf32", "bf16")}
    for precision, fast in results.items():
        check_emulated(fast, spec, w, b, True, precision)
        biased = torch.view_as_real(fast).clone()
        biased[..., 0] *= 1.01
        with pytest.raises(AssertionError, match="outside"):
            check_emulated(torch.view_as_complex(biased), spec, w, b, True, precision)
        for other in results:
            if other != precision:
                with pytest.raises(AssertionError, match="outside"):
                    check_emulated(fast, spec, w, b, True, other)


@pytest.mark.parametrize("device,backend", TRITON)
def test_default_precision_follows_cudnn_allow_tf32(device, backend):
    spec64, w64, b64 = _inputs(2, 20, 24, 8, 8, device, seed=5)
    spec, w, b = spec64.to(torch.complex64), w64.float(), b64.float()
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # not what the replaced convolutions follow
        for allow_tf32, expected in ((True, "tf32"), (False, "fp32")):
            torch.backends.cudnn.allow_tf32 = allow_tf32
            fast = spectral_mix(spec, pack_weight(w), pack_bias(b), backend=backend)
            assert torch.equal(fast, spectral_mix(spec, pack_weight(w), pack_bias(b), precision=expected,
                                                  backend=backend))
            check_emulated(fast, spec, w, b, True, expected)
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


if triton is not None:

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, round_to_tf32(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


@pytest.mark.parametrize("device,backend", TRITON)
def test_kernel_rounds_to_tf32_like_the_emulation(device, backend):
    ulp, big = 2.0 ** -10, torch.finfo(torch.float32).max  # big rounds up past TF32's largest value
    edge = [1.0, 1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2.0 ** -20, -(1 + ulp / 2), -(1 + 3 * ulp / 2),
            big, -big, 1e-40, -1e-40, 0.0, -0.0, float("inf"), float("-inf"), float("nan")]
    expected_edge = [1.0, 1.0, 1 + 2 * ulp, 1 + ulp, -1.0, -(1 + 2 * ulp), float("inf"), float("-inf")]
    x = torch.cat([torch.tensor(edge), torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e3])
    y = torch.empty_like(x, device=device)
    _round_kernel[(1,)](x.to(device), y, x.numel(), BLOCK=1024)
    y = y.cpu()
    assert torch.equal(y[: len(expected_edge)], torch.tensor(expected_edge))
    assert torch.equal(y.isnan(), x.isnan()) and torch.equal(y[~x.isnan()], round_tf32(x)[~x.isnan()])
    kept = y.view(torch.int32) & 0x1FFF
    assert (kept[x.isfinite()] == 0).all(), "TF32 keeps 10 mantissa bits"


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


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_compiles_as_one_op(device, backend):
    # With no precision given, the default is read while tracing (cuDNN's TF32 switch) without a graph break.
    torch._dynamo.reset()
    spec = torch.fft.rfft2(torch.randn(1, 3, 4, 6)).to(device)
    w, b = pack_weight(torch.randn(10, 6)).to(device), pack_bias(torch.randn(10)).to(device)
    fn = torch.compile(lambda s: spectral_mix(s, w, b, backend=backend), fullgraph=True, backend="aot_eager")
    assert max_err(torch.view_as_real(fn(spec)), torch.view_as_real(spectral_mix(spec, w, b, backend=backend))) == 0


def _mix_grads(fn, tensors, grad_out, wanted):
    leaves = [t.detach().clone().requires_grad_(w) for t, w in zip(tensors, wanted)]
    out = torch.view_as_real(fn(*leaves))
    (out * torch.view_as_real(grad_out).to(out.dtype)).sum().backward()
    return tuple(t.grad for t, w in zip(leaves, wanted) if w)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("weights_grad", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_backward_matches_reference_autograd(fp32, device, backend, shape, weights_grad, relu):
    """The spectrum's gradient is the transposed mix masked by the ReLU, run by the same op; the
    packed weight's and bias's too when they need them; against LaMa's math under autograd in
    fp64 (the op itself takes complex64 and fp32 weights only, so no fp64 gradcheck)."""
    spec64, w64, b64 = _inputs(*shape, device)
    ws, bs = 0.7, 0.3
    b, ci, co, h, w = shape
    g = torch.Generator().manual_seed(2)
    grad_out = torch.complex(torch.randn(b, co, h, w // 2 + 1, generator=g, dtype=torch.float64),
                             torch.randn(b, co, h, w // 2 + 1, generator=g, dtype=torch.float64)).to(device)
    wanted = (True, weights_grad, weights_grad)

    def reference_fn(spec, weight, bias):
        return spectral_mix_reference(spec, weight * ws, bias * bs, relu)

    def fused_fn(spec, weight, bias):
        return spectral_mix(spec, pack_weight(weight), pack_bias(bias), relu=relu, weight_scale=ws, bias_scale=bs,
                            backend=backend)

    exact = _mix_grads(reference_fn, (spec64, w64, b64), grad_out, wanted)
    as32 = (spec64.to(torch.complex64), w64.float(), b64.float())
    plain = _mix_grads(reference_fn, as32, grad_out, wanted)
    fast = _mix_grads(fused_fn, as32, grad_out, wanted)
    assert fast[0].dtype == torch.complex64
    real = lambda gs: tuple(torch.view_as_real(t) if t.is_complex() else t for t in gs)  # noqa: E731
    assert_close_to_reference(real(fast), real(exact), real(plain))
