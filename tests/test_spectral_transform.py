"""ffc_kernels.ops.spectral_transform: LaMa's global branch as channels_last GEMMs, against the reference."""
import copy

import pytest
import torch
import torch.nn as nn

from ffc_kernels.fold import batchnorm_affine, fold
from ffc_kernels.ops.spectral_transform import spectral_gemm_weights, spectral_transform_nhwc
from ffc_kernels.reference import SpectralTransform
from helpers import randomize_batchnorm

CL = torch.channels_last


def _operands(st, bn_g, height, width, dtype):
    """The op's operands for SpectralTransform ``st`` followed by ``bn_g`` (scale into conv2)."""
    scale, _ = batchnorm_affine(bn_g)
    w1, b1 = fold(st.conv1[0].weight, batchnorm_affine(st.conv1[1]))
    w_fu, b_fu = fold(st.fu.conv_layer.weight, batchnorm_affine(st.fu.bn))
    w2, _ = fold(st.conv2.weight, (scale, None))
    return spectral_gemm_weights(w1.flatten(1), b1, w_fu.flatten(1), b_fu, w2.flatten(1), fft_norm=st.fu.fft_norm,
                                 height=height, width=width, dtype=dtype)


@pytest.mark.parametrize("shape", [(1, 12, 8, 8), (2, 20, 9, 7), (3, 8, 6, 11)], ids=str)
@pytest.mark.parametrize("fft_norm", ["ortho", "backward", "forward"])
def test_matches_reference_spectral_transform(shape, fft_norm):
    n, c, h, w = shape
    torch.manual_seed(0)
    st = randomize_batchnorm(SpectralTransform(c, c, enable_lfu=False, fft_norm=fft_norm)).eval()
    bn_g = randomize_batchnorm(nn.BatchNorm2d(c), seed=1).eval()
    x = torch.randn(shape)
    residual = torch.randn(shape)
    with torch.no_grad():  # LaMa: act_g(bn_g(convl2g(x_l) + convg2g(x_g))) with bn_g's shift in the residual
        scale, shift = batchnorm_affine(bn_g)
        exact_st = copy.deepcopy(st).double()
        expected = torch.relu(scale.view(1, -1, 1, 1) * exact_st(x.double()) + residual.double())
        out = spectral_transform_nhwc(x.contiguous(memory_format=CL), residual.contiguous(memory_format=CL),
                                      *_operands(st, bn_g, h, w, torch.float32))
    assert out.shape == shape and out.is_contiguous(memory_format=CL)
    plain_error = (torch.relu(scale.view(1, -1, 1, 1).float() * st(x) + residual).double() - expected).abs().max()
    assert (out.double() - expected).abs().max() <= 4 * plain_error + 1e-5


def test_bf16_operands_stay_within_bf16_error():
    torch.manual_seed(3)
    st = randomize_batchnorm(SpectralTransform(16, 16, enable_lfu=False)).eval()
    bn_g = randomize_batchnorm(nn.BatchNorm2d(16), seed=2).eval()
    x, residual = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    args = [t.contiguous(memory_format=CL) for t in (x, residual)]
    with torch.no_grad():
        fp32 = spectral_transform_nhwc(*args, *_operands(st, bn_g, 8, 8, torch.float32))
        bf16 = spectral_transform_nhwc(*[a.bfloat16() for a in args], *_operands(st, bn_g, 8, 8, torch.bfloat16))
    assert bf16.dtype == torch.bfloat16
    # A few bf16 roundings (2^-8 relative each) through two GEMMs, the FFTs and a sum.
    assert (bf16.float() - fp32).abs().max() <= 0.05 * fp32.abs().max()
    # ... and not an fp32 result in disguise.
    assert (bf16.float() - fp32).abs().max() > 0


def test_rejects_layouts_that_would_need_copies():
    st = SpectralTransform(8, 8, enable_lfu=False).eval()
    bn_g = nn.BatchNorm2d(8).eval()
    operands = _operands(st, bn_g, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="channels_last"):
        spectral_transform_nhwc(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4), *operands)
    with pytest.raises(ValueError, match="residual must have shape"):
        spectral_transform_nhwc(torch.randn(1, 8, 4, 4).contiguous(memory_format=CL),
                                torch.randn(1, 8, 4, 5).contiguous(memory_format=CL), *operands)


@pytest.mark.parametrize("shape", [(1, 12, 8, 8), (2, 20, 9, 7), (1, 8, 6, 11)], ids=str)
@pytest.mark.parametrize("fft_norm", ["ortho", "forward"])
def test_backward_from_masks_matches_reference_autograd(shape, fft_norm):
    """d x from the two inner ReLU masks alone (FFT adjoints as FFTs, odd and even widths) against
    LaMa's SpectralTransform under autograd in fp64; the residual's gradient is the output's."""
    from ffc_kernels.ops.spectral_transform import spectral_transform_nhwc_backward
    from helpers import assert_close_to_reference

    n, c, h, w = shape
    torch.manual_seed(1)
    st = randomize_batchnorm(SpectralTransform(c, c, enable_lfu=False, fft_norm=fft_norm), seed=2).eval()
    bn_g = randomize_batchnorm(nn.BatchNorm2d(c), seed=3).eval()
    scale = batchnorm_affine(bn_g)[0].detach()
    x = torch.randn(shape)
    grad = torch.randn(shape)  # the gradient before act_g, i.e. already masked by it

    def reference_grad(dtype):
        xr = x.to(dtype).requires_grad_()
        y = scale.to(dtype).view(1, -1, 1, 1) * copy.deepcopy(st).to(dtype)(xr)
        (y * grad.to(dtype)).sum().backward()
        return xr.grad

    operands = _operands(st, bn_g, h, w, torch.float32)
    masks = []
    with torch.no_grad():
        spectral_transform_nhwc(x.contiguous(memory_format=CL), torch.zeros(shape).contiguous(memory_format=CL),
                                *operands, relu=False, masks=masks)
    assert [m.dtype for m in masks] == [torch.bool, torch.bool]
    w1, _, w_fu, _, w2 = operands
    got = spectral_transform_nhwc_backward(grad.contiguous(memory_format=CL), masks, w1, w_fu, w2, width=w)
    assert got.is_contiguous(memory_format=CL)
    assert_close_to_reference(got, reference_grad(torch.float64), reference_grad(torch.float32))
