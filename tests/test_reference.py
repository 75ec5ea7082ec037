"""The reference is LaMa: parameter counts, state_dict keys and layout, and the FFC's math checked
against an independent numpy computation."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from ffc_kernels import reference
from lama_fast import build_generator


@pytest.mark.parametrize("name,params,keys", [("big-lama", 50_975_875, 989), ("lama-fourier", 27_048_835, 521)])
def test_parameter_and_key_counts(name, params, keys):
    gen = build_generator(name)
    assert sum(p.numel() for p in gen.parameters()) == params
    assert len(gen.state_dict()) == keys
    assert not gen.training


def test_state_dict_keys_and_shapes_of_big_lama():
    sd = build_generator("big-lama").state_dict()
    expected = {
        "model.1.ffc.convl2l.weight": (64, 4, 7, 7),
        "model.4.ffc.convl2g.weight": (384, 256, 3, 3),
        "model.5.conv1.ffc.convg2g.conv1.0.weight": (192, 384, 1, 1),
        "model.5.conv1.ffc.convg2g.fu.conv_layer.weight": (384, 384, 1, 1),
        "model.5.conv1.bn_g.running_var": (384,),
        "model.24.weight": (512, 256, 3, 3),
        "model.34.weight": (3, 64, 7, 7),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(".lfu." in k for k in sd), "big-lama has no local Fourier units"
    assert "model.22.conv2.ffc.convg2g.conv2.weight" in sd and "model.23.weight" not in sd


def test_sequential_layout():
    m = build_generator("big-lama").model
    kinds = [type(x) for x in m]
    assert kinds[0] is nn.ReflectionPad2d and m[0].padding == (3, 3, 3, 3)
    assert kinds[1:5] == [reference.FFC_BN_ACT] * 4
    assert [m[i].ffc.stride for i in range(1, 5)] == [1, 2, 2, 2]
    assert [m[i].ffc.ratio_gout for i in range(1, 5)] == [0, 0, 0, 0.75]
    assert kinds[5:23] == [reference.FFCResnetBlock] * 18
    assert kinds[23] is reference.ConcatTupleLayer
    assert kinds[24:33] == [nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU] * 3
    assert m[24].output_padding == (1, 1) and m[24].stride == (2, 2)
    assert kinds[33:] == [nn.ReflectionPad2d, nn.Conv2d, nn.Sigmoid]
    block = m[5].conv1.ffc
    assert block.convl2l.padding_mode == "reflect" and block.global_in_num == 384
    assert not block.convg2g.enable_lfu and isinstance(block.convg2g.downsample, nn.Identity)


def test_import_does_not_initialise_cuda():
    code = "import ffc_kernels, lama_fast, torch; assert not torch.cuda.is_initialized(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def _numpy_fourier_unit(x, weight, bn_scale, bn_shift):
    """LaMa's FourierUnit written with numpy's FFT: channel 2c = Re(c), 2c+1 = Im(c), ortho norm."""
    spec = np.fft.rfft2(x, norm="ortho")
    b, c, h, wf = spec.shape
    stacked = np.stack([spec.real, spec.imag], axis=2).reshape(b, 2 * c, h, wf)
    mixed = np.einsum("oc,bchw->bohw", weight, stacked)
    mixed = np.maximum(mixed * bn_scale[None, :, None, None] + bn_shift[None, :, None, None], 0)
    mixed = mixed.reshape(b, -1, 2, h, wf)
    return np.fft.irfft2(mixed[:, :, 0] + 1j * mixed[:, :, 1], s=x.shape[-2:], norm="ortho")


@pytest.mark.parametrize("h,w", [(6, 8), (7, 9), (5, 4)])
def test_fourier_unit_against_numpy(h, w):
    rng = np.random.default_rng(0)
    unit = reference.FourierUnit(3, 3).double().eval()
    weight = rng.standard_normal((6, 6))
    mean, var = rng.standard_normal(6), rng.uniform(0.5, 2, 6)
    gamma, beta = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6) * 0.3
    with torch.no_grad():
        unit.conv_layer.weight.copy_(torch.from_numpy(weight)[:, :, None, None])
        unit.bn.running_mean.copy_(torch.from_numpy(mean))
        unit.bn.running_var.copy_(torch.from_numpy(var))
        unit.bn.weight.copy_(torch.from_numpy(gamma))
        unit.bn.bias.copy_(torch.from_numpy(beta))
    x = rng.standard_normal((2, 3, h, w))
    scale = gamma / np.sqrt(var + unit.bn.eps)
    expected = _numpy_fourier_unit(x, weight, scale, beta - mean * scale)
    with torch.no_grad():
        got = unit(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_local_fourier_unit_tiles_like_lama():
    # The LFU takes the first quarter of the channels, cut in a 2x2 grid stacked along channels
    # as (top-left, bottom-left, top-right, bottom-right), and its output is tiled back 2x2.
    st = reference.SpectralTransform(16, 16, enable_lfu=True).eval()
    seen = {}
    st.lfu.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0].clone(), out=out.clone()))
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        st(x)
        t = st.conv1(x).numpy()
    q = t[:, :2]
    tl, bl, tr, br = q[..., :4, :4], q[..., 4:, :4], q[..., :4, 4:], q[..., 4:, 4:]
    np.testing.assert_array_equal(seen["inp"].numpy(), np.concatenate([tl, bl, tr, br], axis=1))
    with torch.no_grad():
        expected = st.conv2(torch.from_numpy(t) + st.fu(torch.from_numpy(t)) + seen["out"].repeat(1, 1, 2, 2))
        assert torch.allclose(st(x), expected, atol=1e-6)


def test_ffc_branches_and_zero_placeholders():
    ffc = reference.FFC(8, 8, 3, 0, 0.5, padding=1).eval()
    assert isinstance(ffc.convg2l, nn.Identity) and isinstance(ffc.convg2g, nn.Identity)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        out_l, out_g = ffc(x)
        assert torch.equal(out_l, ffc.convl2l(x)) and torch.equal(out_g, ffc.convl2g(x))
    local_only = reference.FFC_BN_ACT(8, 8, 3, 0, 0, padding=1)
    assert local_only(x)[1] == 0
    with pytest.raises(ValueError, match="stride"):
        reference.FFC(8, 8, 3, 0.5, 0.5, stride=3)


def test_constructors_take_lamas_arguments():
    # LaMa's positional order: FFCResnetBlock(dim, padding_type, norm_layer, activation_layer,
    # dilation, spatial_transform_kwargs, inline).
    block = reference.FFCResnetBlock(16, "reflect", nn.BatchNorm2d, nn.ReLU, 1, None, True,
                                     ratio_gin=0.5, ratio_gout=0.5, enable_lfu=False)
    assert block.inline
    x = torch.randn(1, 16, 8, 8)
    assert block.eval()(x).shape == x.shape
    local = dict(ratio_gin=0, ratio_gout=0, enable_lfu=False)
    gen = reference.FFCResNetGenerator(4, 3, ngf=8, n_blocks=1, out_ffc=True, init_conv_kwargs=local,
                                       downsample_conv_kwargs=local,
                                       resnet_conv_kwargs=dict(ratio_gin=0.5, ratio_gout=0.5, enable_lfu=False),
                                       out_ffc_kwargs=dict(ratio_gin=0.5, ratio_gout=0.5, enable_lfu=False))
    assert isinstance(gen.model[-4], reference.FFCResnetBlock) and gen.model[-4].inline
    assert gen.eval()(torch.rand(1, 4, 16, 16)).shape == (1, 3, 16, 16)
    with pytest.raises(NotImplementedError, match="use_se"):
        reference.FFC(16, 16, 3, 0.5, 0.5, use_se=True)
    with pytest.raises(NotImplementedError, match="LearnableSpatialTransformWrapper"):
        reference.FFCResNetGenerator(4, 3, spatial_transform_layers=[0])
