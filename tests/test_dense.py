"""ffc_kernels.ops.dense: fused convolution/GEMM epilogues and reflect padding by border recomputation."""
import pytest
import torch
import torch.nn.functional as F

from ffc_kernels.ops import dense

CL = torch.channels_last


def _reference(x, weight, bias, pad, stride, dilation, relu, add):
    y = F.conv2d(F.pad(x, (pad,) * 4, mode="reflect") if pad else x, weight, bias, stride, 0, dilation)
    if add is not None:
        y = y + add
    return y.relu() if relu else y


# (H, W, kernel, reflect pad, stride, dilation): LaMa's 7x7 stem/output, its stride-2 3x3 downsampling
# on even and odd sizes, 3x3 blocks, and dilated and 5x5 cases.
GEOMETRIES = [(40, 37, 7, 3, 1, 1), (40, 38, 3, 1, 2, 1), (41, 39, 3, 1, 2, 1), (33, 35, 3, 1, 1, 1),
              (30, 31, 3, 2, 1, 2), (29, 30, 5, 2, 2, 1)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("fixup", [True, False], ids=["fixup", "pad"])
def test_reflect_conv2d_is_exact(monkeypatch, geometry, relu, with_add, fixup):
    h, w, k, pad, stride, dilation = geometry
    monkeypatch.setattr(dense, "FIXUP_MIN_PIXELS", 1 if fixup else 10**9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, h, w, generator=g).contiguous(memory_format=CL)
    weight, bias = torch.randn(6, 5, k, k, generator=g), torch.randn(6, generator=g)
    expected = _reference(x, weight, bias, pad, stride, dilation, relu, None)
    add = torch.randn(expected.shape, generator=g).contiguous(memory_format=CL) if with_add else None
    expected = _reference(x, weight, bias, pad, stride, dilation, relu, add)
    out = dense.reflect_conv2d(x, weight.contiguous(memory_format=CL), bias, pad, (stride, stride),
                               (dilation, dilation), relu=relu, add=add)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad", [2, 3])
def test_padding_wider_than_the_kernel_pads_the_plane(monkeypatch, pad):
    monkeypatch.setattr(dense, "FIXUP_MIN_PIXELS", 1)
    x = torch.randn(1, 2, 40, 44).contiguous(memory_format=CL)
    weight = torch.randn(3, 2, 3, 3)
    out = dense.reflect_conv2d(x, weight, None, pad)
    torch.testing.assert_close(out, _reference(x, weight, None, pad, 1, 1, False, None), atol=1e-5, rtol=1e-5)


def test_border_recomputation_is_used_on_large_planes(monkeypatch):
    calls = []
    original = dense.conv2d
    monkeypatch.setattr(dense, "conv2d", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    x = torch.randn(1, 2, 130, 128).contiguous(memory_format=CL)
    weight = torch.randn(3, 2, 7, 7)
    out = dense.reflect_conv2d(x, weight, None, 3)
    torch.testing.assert_close(out, _reference(x, weight, None, 3, 1, 1, False, None), atol=1e-5, rtol=1e-5)
    # One zero-padded convolution of the whole plane, then four thin strips (no padded copy of x).
    assert calls[0] == x.shape and len(calls) == 5
    assert all(min(shape[2:]) <= 12 for shape in calls[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_linear_epilogues(dtype, relu):
    g = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(37, 24, generator=g), torch.randn(10, 24, generator=g), torch.randn(10, generator=g)
    expected = x.double() @ weight.double().t() + bias.double()
    expected = expected.relu() if relu else expected
    out = dense.linear(x.to(dtype), weight.to(dtype), bias.to(dtype), relu=relu)
    assert out.dtype == dtype and out.shape == (37, 10)
    tol = 1e-4 if dtype == torch.float32 else 0.15  # bf16 operands: 8-bit mantissas, K = 24
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_conv2d_without_onednn_matches(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 9, 9, generator=g).contiguous(memory_format=CL)
    weight, bias, add = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, generator=g), torch.randn(1, 5, 9, 9)
    fused = dense.conv2d(x, weight, bias, padding=(1, 1), relu=True, add=add)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    plain = dense.conv2d(x, weight, bias, padding=(1, 1), relu=True, add=add)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, (F.conv2d(x, weight, bias, padding=1) + add).relu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 20, 24), (1, 64, 16, 18), (1, 3, 22, 22)], ids=str)
@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("relu", [False, True])
def test_space_to_depth_convolution_is_the_convolution(monkeypatch, shape, kernel, relu):
    """Few output channels on 2x2 blocks: the same "same" convolution, then reflect borders fixed."""
    monkeypatch.setattr(dense, "FIXUP_MIN_PIXELS", 1)
    g = torch.Generator().manual_seed(kernel)
    x = torch.randn(shape, generator=g).contiguous(memory_format=CL)
    weight, bias = torch.randn(3, shape[1], kernel, kernel, generator=g), torch.randn(3, generator=g)
    s2d = dense.space_to_depth_weight(weight, bias)
    assert s2d[0].shape == (12, 4 * shape[1], 4, 4) and s2d[1].shape == (12,)
    pad = kernel // 2
    expected = _reference(x.double(), weight.double(), bias.double(), pad, 1, 1, relu, None)
    out = dense.reflect_conv2d(x, weight, bias, pad, s2d=s2d, relu=relu)
    assert out.is_contiguous(memory_format=CL)
    plain = _reference(x, weight, bias, pad, 1, 1, relu, None)
    assert (out.double() - expected).abs().max() <= 4 * (plain.double() - expected).abs().max() + 1e-5


def test_space_to_depth_declines_what_it_cannot_do():
    assert dense.space_to_depth_weight(torch.randn(3, 4, 4, 4)) is None  # even kernel
    assert dense.space_to_depth_weight(torch.randn(3, 4, 9, 9)) is None  # wider than 7
    x = torch.randn(1, 4, 21, 20).contiguous(memory_format=CL)  # odd height: the plain convolution runs
    weight = torch.randn(3, 4, 7, 7)
    out = dense.reflect_conv2d(x, weight, None, 3, s2d=dense.space_to_depth_weight(weight))
    torch.testing.assert_close(out, _reference(x, weight, None, 3, 1, 1, False, None), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pad", [1, 2, 3])
@pytest.mark.parametrize("size", [(7, 9), (8, 8)])
def test_reflect_pad_adjoint_is_the_pads_gradient(pad, size):
    x = torch.randn(2, 5, *size, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, size[0] + 2 * pad, size[1] + 2 * pad, dtype=torch.float64)
    F.pad(x, (pad,) * 4, mode="reflect").backward(grad)
    got = dense.reflect_pad_adjoint(grad.contiguous(memory_format=torch.channels_last), pad)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, x.grad, rtol=0, atol=1e-12)
    spent = grad.clone()  # overwrite: the same sums, in the padded gradient's own interior
    in_place = dense.reflect_pad_adjoint(spent, pad, overwrite=True)
    assert in_place.data_ptr() == spent[:, :, pad:, pad:].data_ptr()
    torch.testing.assert_close(in_place, x.grad, rtol=0, atol=1e-12)


def test_reflect_conv2d_under_autograd_pads_once(monkeypatch):
    """Inputs that need gradients take one reflection pad and one convolution (the border
    recomputation's in-place strip writes would copy the output for autograd): same values,
    the reference's gradient."""
    monkeypatch.setattr(dense, "FIXUP_MIN_PIXELS", 0)
    x = torch.randn(1, 6, 20, 22, dtype=torch.float64)
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    y = dense.reflect_conv2d(leaf, weight, None, 1, relu=True)
    with torch.no_grad():
        torch.testing.assert_close(y, dense.reflect_conv2d(x, weight, None, 1, relu=True))
    y.sum().backward()
    ref = x.clone().requires_grad_()
    F.conv2d(F.pad(ref, (1,) * 4, mode="reflect"), weight).relu().sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride, padding, dilation", [((1, 1), (0, 0), (1, 1)), ((1, 1), (1, 2), (1, 1)),
                                                       ((1, 1), (1, 1), (2, 1)), ((2, 2), (1, 1), (1, 1))])
def test_conv2d_input_is_the_convolutions_input_gradient(dtype, stride, padding, dilation):
    """dense.conv2d_input (the flipped-kernel forward convolution on oneDNN at stride 1, torch's
    transposed convolution otherwise) against autograd of conv2d, fp32 through oneDNN and fp64."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 6, 17, 15, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(5, 6, 3, 3, generator=g, dtype=dtype)
    y = F.conv2d(x, weight, None, stride, padding, dilation)
    grad = torch.randn(y.shape, generator=g, dtype=dtype)
    y.backward(grad)
    got = dense.conv2d_input(x.shape, weight, grad.contiguous(memory_format=CL), stride, padding, dilation)
    assert got.shape == x.shape
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-5)
