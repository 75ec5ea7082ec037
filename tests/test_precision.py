"""The precision policy: what the fused GEMMs multiply fp32 data in, by default and when asked.

Without a precision the ops and modules follow ``torch.backends.cudnn.allow_tf32``, as the 1x1
convolutions they replace would; an explicit "fp32" (split TF32), "tf32" or "bf16" wins over it;
``lama_fast.optimize`` always sets one.
"""
import copy

import pytest
import torch
import torch.nn as nn

from ffc_kernels import FastFFC_BN_ACT, FastFFCResnetBlock, reference
from ffc_kernels import modules as fast_modules
from ffc_kernels.modules import set_precision
from helpers import DEVICE_BACKENDS, backend_env, max_err, randomize_batchnorm

TRITON = [db for db in DEVICE_BACKENDS if db[1] == "triton"]
KW = dict(ratio_gin=0.75, ratio_gout=0.75)


@pytest.fixture
def cudnn_tf32():
    """Set torch.backends.cudnn.allow_tf32 within a test; restored after."""
    saved = torch.backends.cudnn.allow_tf32
    yield lambda value: setattr(torch.backends.cudnn, "allow_tf32", value)
    torch.backends.cudnn.allow_tf32 = saved


def _spy_on_fused_ops(monkeypatch):
    """(op name, precision) of every fused op call the modules make from now on."""
    calls = []
    for name in ("fourier_unit", "pointwise_conv"):
        def spy(*args, _op=getattr(fast_modules, name), _name=name, precision=None, **kwargs):
            calls.append((_name, precision))
            return _op(*args, precision=precision, **kwargs)

        monkeypatch.setattr(fast_modules, name, spy)
    return calls


def _block(**kwargs):
    torch.manual_seed(0)
    ref = randomize_batchnorm(reference.FFCResnetBlock(32, "reflect", nn.BatchNorm2d, nn.ReLU, enable_lfu=True, **KW))
    fast = FastFFCResnetBlock(32, "reflect", nn.BatchNorm2d, nn.ReLU, enable_lfu=True, **KW, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return fast.eval()


def _x(seed=1):
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x[:, :8], x[:, 8:]


def test_modules_pass_their_precision_to_every_fused_op(monkeypatch):
    block = _block(precision="tf32")
    assert {m.precision for m in block.modules() if isinstance(m, fast_modules._FusedFFCMixin)} == {"tf32"}
    calls = _spy_on_fused_ops(monkeypatch)
    with torch.no_grad():
        block(_x())
    # Two FFC_BN_ACT, each conv1, the FourierUnit, the LFU and conv2.
    assert [name for name, _ in calls] == ["pointwise_conv", "fourier_unit", "fourier_unit", "pointwise_conv"] * 2
    assert {p for _, p in calls} == {"tf32"}
    for precision in ("bf16", None):
        calls.clear()
        set_precision(block, precision)
        with torch.no_grad():
            block(_x())
        assert len(calls) == 8 and {p for _, p in calls} == {precision}


def test_a_bf16_model_multiplies_in_bf16_unless_told_otherwise(monkeypatch):
    block = _block().to(torch.bfloat16)
    calls = _spy_on_fused_ops(monkeypatch)
    for precision, expected in ((None, "bf16"), ("tf32", "tf32")):
        calls.clear()
        set_precision(block, precision)
        with torch.no_grad():
            block(tuple(t.to(torch.bfloat16) for t in _x()))
        assert len(calls) == 8 and {p for _, p in calls} == {expected}


def test_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="fp32, tf32, bf16"):
        FastFFC_BN_ACT(16, 16, 3, 0.5, 0.5, padding=1, precision="tf32x3")
    with pytest.raises(ValueError, match="fp32, tf32, bf16"):
        set_precision(_block(), "highest")


@pytest.mark.parametrize("device,backend", TRITON)
def test_default_follows_cudnn_tf32_and_an_explicit_precision_wins(monkeypatch, cudnn_tf32, device, backend):
    backend_env(monkeypatch, backend)
    block = _block().to(device)
    x = tuple(t.to(device) for t in _x())

    def run(precision):
        set_precision(block, precision)
        with torch.no_grad():
            return torch.cat(block(x), dim=1)

    cudnn_tf32(False)
    split, tf32, bf16 = run("fp32"), run("tf32"), run("bf16")
    assert torch.equal(run(None), split)
    cudnn_tf32(True)
    assert torch.equal(run(None), tf32)
    assert torch.equal(run("fp32"), split)  # explicit: the switch is not read
    # The precisions differ as their roundings do: split TF32 is fp32-class, TF32 keeps 10
    # mantissa bits, bf16 7, against the fp64 block.
    with torch.no_grad():
        exact = torch.cat(copy.deepcopy(block).double()(tuple(t.double() for t in x)), dim=1)
    scale = exact.abs().max().item()
    errors = [max_err(y, exact) / scale for y in (split, tf32, bf16)]
    assert errors[0] < 1e-5 < errors[1] < 1e-3 < errors[2] < 2e-2, errors


def test_optimize_sets_the_precision_of_the_modules_it_converts():
    from lama_fast import optimize

    config = dict(reference.GENERATOR_CONFIGS["big-lama"], ngf=8, n_blocks=1)
    torch.manual_seed(3)
    generator = randomize_batchnorm(reference.FFCResNetGenerator(**config)).eval()
    fast = optimize(copy.deepcopy(generator), precision="fp32")
    with torch.inference_mode():
        fast(torch.rand(1, 4, 32, 24))
    fused = [m for m in fast.modules() if isinstance(m, fast_modules._FusedFFCMixin)]
    assert fused and {m.precision for m in fused} == {"fp32"}
