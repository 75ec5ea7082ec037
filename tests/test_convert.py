"""ffc_kernels.convert on whole generators, including modules that are not this project's classes."""
import copy

import pytest
import torch
import torch.nn as nn

from ffc_kernels import FastFFC, FastFFC_BN_ACT, FastFFCResnetBlock, convert, reference
from helpers import DEVICE_BACKENDS, assert_close_to_reference, backend_env, randomize_batchnorm
from lama_fast import build_generator


def _generator(n_blocks, seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(build_generator("big-lama", n_blocks=n_blocks), seed)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_converted_generator_matches_reference(fp32, monkeypatch, device, backend):
    backend_env(monkeypatch, backend)
    n_blocks = 18 if backend == "torch" else 2  # the interpreter is slow; two blocks cover every layer kind
    gen = _generator(n_blocks)
    exact, plain = copy.deepcopy(gen).double().to(device), copy.deepcopy(gen).to(device)
    fast = convert(copy.deepcopy(gen).to(device))
    x = torch.rand(1, 4, 32, 40, dtype=torch.float64, device=device)
    with torch.inference_mode():
        out = fast(x.float())
        assert_close_to_reference(out, exact(x), plain(x.float()))
    fused = [m for m in fast.modules() if isinstance(m, FastFFC_BN_ACT)]
    assert len(fused) == 4 + 2 * n_blocks and all(m.last_path == "fused" for m in fused)


class FFC(nn.Module):
    """Stands in for LaMa's original FFC class: same name and attributes, not this project's class."""

    forward = reference.FFC.forward


class FFC_BN_ACT(nn.Module):  # noqa: N801 - LaMa's name
    forward = reference.FFC_BN_ACT.forward


class FFCResnetBlock(nn.Module):
    forward = reference.FFCResnetBlock.forward


def _as_upstream(model):
    # Swap classes to the stand-ins, and give Fourier units the extra options of LaMa's code.
    stand_ins = {reference.FFC: FFC, reference.FFC_BN_ACT: FFC_BN_ACT, reference.FFCResnetBlock: FFCResnetBlock}
    for m in model.modules():
        if type(m) in stand_ins:
            m.__class__ = stand_ins[type(m)]
        if isinstance(m, reference.FourierUnit):
            m.spatial_scale_factor, m.spectral_pos_encoding, m.use_se, m.ffc3d = None, False, False, False
    return model


def test_converts_models_built_from_other_code_by_name_and_structure(fp32):
    gen = _generator(3, seed=1)
    upstream = _as_upstream(copy.deepcopy(gen))
    assert not any(isinstance(m, reference.FFC) for m in upstream.modules())
    x = torch.rand(1, 4, 48, 48)
    with torch.inference_mode():
        expected = upstream(x)
        converted = convert(upstream)
        assert converted is upstream
        out = converted(x)
    assert sum(isinstance(m, FastFFCResnetBlock) for m in upstream.modules()) == 3
    assert sum(isinstance(m, FastFFC_BN_ACT) for m in upstream.modules()) == 4 + 6
    assert sum(type(m) is FastFFC for m in upstream.modules()) == 4 + 6
    assert all(m.last_path == "fused" for m in upstream.modules() if isinstance(m, FastFFC_BN_ACT))
    assert (out - expected).abs().max() < 1e-4


def test_options_the_kernels_do_not_cover_stay_on_reference_math():
    gen = _as_upstream(_generator(1, seed=2))
    se_unit = gen.model[5].conv1.ffc.convg2g.fu
    se_unit.use_se = True  # the stand-in FourierUnit ignores it; what matters is convert's decision
    convert(gen)
    with torch.inference_mode():
        gen(torch.rand(1, 4, 32, 32))
    assert gen.model[5].conv1.last_path == "reference"
    assert gen.model[5].conv2.last_path == "fused"


def test_keeps_weights_dtype_device_and_mode():
    gen = _generator(1, seed=3).double().train()
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    convert(gen)
    assert gen.training and all(m.training for m in gen.modules())
    after = gen.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert convert(gen) is gen  # idempotent
    with pytest.raises(TypeError, match="nn.Module"):
        convert("not a model")


def test_leaves_lookalikes_without_the_structure_alone():
    class FFC(nn.Module):  # a different layer that happens to share the name
        def forward(self, x):
            return x

    model = nn.Sequential(FFC())
    convert(model)
    assert type(model[0]) is FFC
