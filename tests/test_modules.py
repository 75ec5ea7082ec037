"""FastFFC, FastFFC_BN_ACT and FastFFCResnetBlock against the reference modules."""
import copy

import pytest
import torch
import torch.nn as nn

from ffc_kernels import FastFFC, FastFFC_BN_ACT, FastFFCResnetBlock, reference
from ffc_kernels.modules import join_channels
from helpers import DEVICE_BACKENDS, assert_close_to_reference, backend_env, max_err, randomize_batchnorm, triple


def _split(x, ratio_gin):
    cg = int(x.shape[1] * ratio_gin)
    cl = x.shape[1] - cg
    if cg == 0:
        return (x, 0)
    if cl == 0:
        return (0, x)
    return (x[:, :cl], x[:, cl:])


def _run(module, x):
    with torch.no_grad():
        return module(x)


def _cast(x, dtype):
    return tuple(t.to(dtype) if torch.is_tensor(t) else t for t in x)


# (in, out, ratio_gin, ratio_gout, enable_lfu, stride, H, W, B): LaMa's own layers (stem,
# downsampling with the switch to 0.75, residual blocks) and awkward ones (odd H and W, ratio 1,
# LFU, stride 2 with a spectral branch, channels not multiples of 16, batch 1 to 3).
CASES = [
    (32, 32, 0.75, 0.75, False, 1, 9, 11, 2),
    (32, 32, 0.75, 0.75, True, 1, 8, 8, 1),
    (12, 20, 0.0, 0.75, False, 2, 10, 10, 1),
    (8, 12, 0.0, 0.0, False, 2, 9, 9, 3),
    (16, 16, 1.0, 1.0, True, 1, 6, 6, 2),
    (16, 16, 0.5, 1.0, False, 1, 7, 6, 1),
    (16, 32, 0.5, 0.5, True, 2, 12, 12, 2),
    (20, 28, 0.6, 0.4, False, 1, 5, 7, 3),
]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("channels_last", [False, True])
def test_ffc_bn_act_matches_reference(fp32, monkeypatch, device, backend, case, channels_last):
    backend_env(monkeypatch, backend)
    cin, cout, rin, rout, lfu, stride, h, w, b = case
    torch.manual_seed(0)
    ref = randomize_batchnorm(reference.FFC_BN_ACT(cin, cout, 3, rin, rout, stride=stride, padding=1,
                                                   activation_layer=nn.ReLU, enable_lfu=lfu))
    exact, plain, _ = triple(ref, device)
    fast = FastFFC_BN_ACT(cin, cout, 3, rin, rout, stride=stride, padding=1, activation_layer=nn.ReLU,
                          enable_lfu=lfu).to(device)
    fast.load_state_dict(ref.state_dict())
    fast.eval()
    x = torch.randn(b, cin, h, w, dtype=torch.float64, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = _run(fast, _split(x.float(), rin))
    assert fast.last_path == "fused"
    assert_close_to_reference(out, _run(exact, _split(x, rin)), _run(plain, _split(x.float(), rin)))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("padding_type,bias", [("reflect", False), ("zeros", True), ("replicate", True)])
def test_ffc_without_norms_matches_reference(fp32, monkeypatch, device, backend, padding_type, bias):
    backend_env(monkeypatch, backend)
    torch.manual_seed(1)
    ref = reference.FFC(32, 32, 3, 0.75, 0.75, padding=1, bias=bias, enable_lfu=True, padding_type=padding_type)
    ref = randomize_batchnorm(ref)
    exact, plain, _ = triple(ref, device)
    fast = FastFFC(32, 32, 3, 0.75, 0.75, padding=1, bias=bias, enable_lfu=True, padding_type=padding_type)
    fast.load_state_dict(ref.state_dict())
    fast = fast.to(device).eval()
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64, device=device)
    out = _run(fast, _split(x.float(), 0.75))
    assert fast.last_path == "fused"
    assert_close_to_reference(out, _run(exact, _split(x, 0.75)), _run(plain, _split(x.float(), 0.75)))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("lfu", [False, True])
def test_resnet_block_matches_reference(fp32, monkeypatch, device, backend, lfu):
    backend_env(monkeypatch, backend)
    torch.manual_seed(2)
    kw = dict(ratio_gin=0.75, ratio_gout=0.75, enable_lfu=lfu)
    ref = randomize_batchnorm(reference.FFCResnetBlock(32, "reflect", nn.BatchNorm2d, nn.ReLU, **kw))
    exact, plain, _ = triple(ref, device)
    fast = FastFFCResnetBlock(32, "reflect", nn.BatchNorm2d, nn.ReLU, **kw)
    fast.load_state_dict(ref.state_dict())
    fast = fast.to(device).eval()
    x = torch.randn(1, 32, 8, 8, dtype=torch.float64, device=device)
    # The residual adds must not touch the caller's input.
    inp = _split(x.float(), 0.75)
    saved = tuple(t.clone() for t in inp)
    out = _run(fast, inp)
    assert all(torch.equal(a, b) for a, b in zip(inp, saved))
    assert fast.conv1.last_path == fast.conv2.last_path == "fused"
    assert_close_to_reference(out, _run(exact, _split(x, 0.75)), _run(plain, _split(x.float(), 0.75)))
    # A block's output feeds the next block as views of one buffer: no concatenation copy.
    assert join_channels(*out) is not None


def test_same_constructor_and_state_dict_keys():
    pairs = [
        (reference.FFC(16, 16, 3, 0.5, 0.5, padding=1, enable_lfu=True), FastFFC(16, 16, 3, 0.5, 0.5, padding=1, enable_lfu=True)),
        (reference.FFC_BN_ACT(16, 16, 3, 0.75, 0.75, padding=1), FastFFC_BN_ACT(16, 16, 3, 0.75, 0.75, padding=1)),
        (reference.FFCResnetBlock(16, "reflect", nn.BatchNorm2d, ratio_gin=0.75, ratio_gout=0.75),
         FastFFCResnetBlock(16, "reflect", nn.BatchNorm2d, ratio_gin=0.75, ratio_gout=0.75)),
    ]
    for ref, fast in pairs:
        assert isinstance(fast, type(ref))
        assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
        fast.load_state_dict(ref.state_dict(), strict=True)


def test_cache_follows_load_state_dict_and_optimizer_steps(fp32):
    torch.manual_seed(3)
    ref = randomize_batchnorm(reference.FFC_BN_ACT(16, 16, 3, 0.75, 0.75, padding=1, activation_layer=nn.ReLU, enable_lfu=False))
    fast = FastFFC_BN_ACT(16, 16, 3, 0.75, 0.75, padding=1, activation_layer=nn.ReLU, enable_lfu=False)
    fast.load_state_dict(ref.state_dict())
    ref.eval(), fast.eval()
    x = _split(torch.randn(1, 16, 8, 8), 0.75)
    assert max_err(_run(fast, x)[1], _run(ref, x)[1]) < 1e-5

    # New weights and statistics through load_state_dict.
    other = randomize_batchnorm(reference.FFC_BN_ACT(16, 16, 3, 0.75, 0.75, padding=1, activation_layer=nn.ReLU, enable_lfu=False), seed=7)
    fast.load_state_dict(other.state_dict())
    other.eval()
    assert max_err(_run(fast, x)[1], _run(other, x)[1]) < 1e-5

    # An optimizer step in train mode, then eval again: weights and running stats moved.
    fast.train(), other.train()
    opt_f = torch.optim.SGD(fast.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(other.parameters(), lr=0.1)
    xt = _split(torch.randn(2, 16, 8, 8), 0.75)
    for module, opt in ((fast, opt_f), (other, opt_o)):
        out_l, out_g = module(xt)
        (out_l.square().mean() + out_g.square().mean()).backward()
        opt.step()
    fast.eval(), other.eval()
    assert max_err(_run(fast, x)[0], _run(other, x)[0]) < 1e-5
    assert max_err(_run(fast, x)[1], _run(other, x)[1]) < 1e-5
    assert fast.last_path == "fused"


def test_train_mode_equals_reference_outputs_gradients_and_statistics(fp32):
    torch.manual_seed(4)
    ref = randomize_batchnorm(reference.FFCResnetBlock(32, "reflect", nn.BatchNorm2d, nn.ReLU, ratio_gin=0.75,
                                                       ratio_gout=0.75, enable_lfu=True))
    fast = copy.deepcopy(ref)
    from ffc_kernels import convert

    convert(fast)
    assert type(fast) is FastFFCResnetBlock
    ref.train(), fast.train()
    x = torch.randn(2, 32, 8, 8)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(_split(xr, 0.75)), fast(_split(xf, 0.75))
    assert fast.conv1.last_path == "reference"
    for a, b in zip(out_r, out_f):
        assert torch.equal(a, b)
    sum(o.square().sum() for o in out_r).backward()
    sum(o.square().sum() for o in out_f).backward()
    assert torch.equal(xr.grad, xf.grad)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, a), b in zip(ref.named_buffers(), fast.buffers()):
        assert torch.equal(a, b), name


def test_eval_with_gradients_uses_reference_math():
    torch.manual_seed(5)
    fast = FastFFC_BN_ACT(16, 16, 3, 0.75, 0.75, padding=1, enable_lfu=False).eval()
    x = _split(torch.randn(1, 16, 8, 8, requires_grad=True), 0.75)
    out = fast(x)
    assert fast.last_path == "reference"
    out[1].sum().backward()
    assert fast.ffc.convl2g.weight.grad is not None


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bf16_model_runs_with_fp32_ffts(monkeypatch, device, backend):
    # torch.fft rejects bf16, so LaMa's FourierUnit cannot run a bf16 model at all; the fast
    # module keeps the FFTs and the spectral accumulation in fp32. Its error against the fp64
    # reference is bounded by what bf16 convolutions alone cost: the reference with its
    # spatial convs rounded through bf16.
    backend_env(monkeypatch, backend)
    torch.manual_seed(6)
    ref = randomize_batchnorm(reference.FFC_BN_ACT(32, 32, 3, 0.75, 0.75, padding=1, activation_layer=nn.ReLU))
    exact, _, fast = triple(ref, device)
    from ffc_kernels import convert

    convert(fast)
    fast = fast.to(torch.bfloat16)
    x = torch.randn(1, 32, 8, 8, dtype=torch.float64, device=device)
    out = _run(fast, _split(x.to(torch.bfloat16), 0.75))
    assert fast.last_path == "fused" and out[0].dtype == torch.bfloat16
    with pytest.raises(RuntimeError):
        _run(copy.deepcopy(ref).to(device, torch.bfloat16), _split(x.to(torch.bfloat16), 0.75))
    ref_out = _run(exact, _split(x, 0.75))
    for o, r in zip(out, ref_out):
        scale = r.abs().max().item()
        assert max_err(o, r) <= 0.05 * scale  # a few bf16 roundings (2^-8 each) through three convs


def test_unsupported_configurations_fall_back_to_reference():
    torch.manual_seed(8)
    gated = reference.FFC(16, 16, 3, 0.5, 0.5, padding=1, gated=True)
    fast = FastFFC(16, 16, 3, 0.5, 0.5, padding=1, gated=True)
    fast.load_state_dict(gated.state_dict())
    gated.eval(), fast.eval()
    x = _split(torch.randn(1, 16, 8, 8), 0.5)
    assert max_err(_run(fast, x)[0], _run(gated, x)[0]) == 0
    assert fast.last_path == "reference"

    leaky = reference.FFC_BN_ACT(16, 16, 3, 0.5, 0.5, padding=1, activation_layer=nn.LeakyReLU)
    fast = FastFFC_BN_ACT(16, 16, 3, 0.5, 0.5, padding=1, activation_layer=nn.LeakyReLU)
    fast.load_state_dict(leaky.state_dict())
    leaky.eval(), fast.eval()
    # The norms and LeakyReLU run as modules; the FFC inside is still fused on its own.
    assert max_err(_run(fast, x)[1], _run(leaky, x)[1]) < 1e-5
    assert fast.last_path == "reference" and fast.ffc.last_path == "fused"


def test_shapes_lama_cannot_handle_raise_like_lama():
    # LFU tiles at h // 2 on both axes: LaMa fails on a non-square map, and so must the fast module.
    ref = reference.FFC_BN_ACT(32, 32, 3, 0.75, 0.75, padding=1, enable_lfu=True).eval()
    fast = FastFFC_BN_ACT(32, 32, 3, 0.75, 0.75, padding=1, enable_lfu=True).eval()
    x = _split(torch.randn(1, 32, 8, 12), 0.75)
    with pytest.raises(RuntimeError):
        _run(ref, x)
    with pytest.raises(RuntimeError):
        _run(fast, x)


def test_cache_follows_storage_swaps_and_can_be_cleared(fp32):
    torch.manual_seed(9)
    from ffc_kernels.modules import clear_fold_cache

    ref = randomize_batchnorm(reference.FFC_BN_ACT(16, 16, 3, 0.75, 0.75, padding=1, activation_layer=nn.ReLU,
                                                   enable_lfu=False)).eval()
    fast = copy.deepcopy(ref)
    from ffc_kernels import convert

    convert(fast)
    x = _split(torch.randn(1, 16, 8, 8), 0.75)
    _run(fast, x)
    new_weight = torch.randn_like(ref.ffc.convl2g.weight)
    ref.ffc.convl2g.weight.data = new_weight.clone()
    fast.ffc.convl2g.weight.data = new_weight.clone()  # new storage: seen without help
    assert max_err(_run(fast, x)[1], _run(ref, x)[1]) < 1e-5
    with torch.no_grad():
        ref.ffc.convl2g.weight.data.mul_(2)
        fast.ffc.convl2g.weight.data.mul_(2)  # through .data: no version bump, needs a clear
    clear_fold_cache(fast)
    assert max_err(_run(fast, x)[1], _run(ref, x)[1]) < 1e-5


def _block_and_input(seed=10):
    torch.manual_seed(seed)
    ref = randomize_batchnorm(reference.FFCResnetBlock(32, "reflect", nn.BatchNorm2d, nn.ReLU, ratio_gin=0.75,
                                                       ratio_gout=0.75, enable_lfu=False)).eval()
    from ffc_kernels import convert

    return ref, convert(copy.deepcopy(ref)), _split(torch.randn(1, 32, 8, 8), 0.75)


def test_hooked_outputs_are_not_modified_in_place():
    ref, fast, x = _block_and_input()
    seen = {}
    for name, m in (("ref", ref), ("fast", fast)):
        m.conv2.register_forward_hook(lambda mod, i, o, name=name: seen.setdefault(name, o))
        _run(m, x)
    expected = _run(ref.conv2, _run(ref.conv1, x))
    for name in ("ref", "fast"):
        assert max_err(seen[name][0], expected[0]) < 1e-5 and max_err(seen[name][1], expected[1]) < 1e-5, name


def test_submodule_hooks_run_and_weight_reparametrisations_apply():
    torch.manual_seed(11)
    base = randomize_batchnorm(reference.FFC_BN_ACT(32, 32, 3, 0.75, 0.75, padding=1, activation_layer=nn.ReLU))
    ref, fast = copy.deepcopy(base).eval(), copy.deepcopy(base).eval()
    from ffc_kernels import convert

    convert(fast)
    x = _split(torch.randn(1, 32, 8, 8), 0.75)
    _run(fast, x)
    for m in (ref, fast):
        torch.manual_seed(0)  # the same power-iteration start vector for both
        nn.utils.spectral_norm(m.ffc.convl2l)
    with torch.no_grad():
        for m in (ref, fast):
            m.ffc.convl2l.weight_orig.mul_(3)
    assert max_err(_run(fast, x)[0], _run(ref, x)[0]) < 1e-4
    assert fast.last_path == "reference"


def test_model_built_under_inference_mode():
    with torch.inference_mode():
        torch.manual_seed(12)
        ref = randomize_batchnorm(reference.FFC_BN_ACT(16, 16, 3, 0.75, 0.75, padding=1, enable_lfu=False)).eval()
        from ffc_kernels import convert

        fast = convert(copy.deepcopy(ref))
        x = _split(torch.randn(1, 16, 8, 8), 0.75)
        assert max_err(fast(x)[1], ref(x)[1]) < 1e-5 and fast.last_path == "fused"


def test_cache_follows_batchnorm_eps_and_inner_train_mode():
    torch.manual_seed(13)
    ref = randomize_batchnorm(reference.FFC_BN_ACT(32, 32, 3, 0.75, 0.75, padding=1, activation_layer=nn.ReLU)).eval()
    from ffc_kernels import convert

    fast = convert(copy.deepcopy(ref))
    x = _split(torch.randn(1, 32, 8, 8), 0.75)
    _run(fast, x)
    for m in (ref, fast):
        m.bn_l.eps = 10.0
    assert max_err(_run(fast, x)[0], _run(ref, x)[0]) < 1e-5
    for m in (ref, fast):
        m.ffc.convg2g.conv1[1].train()  # batch statistics inside an eval FFC: not foldable
    assert max_err(_run(fast, x)[1], _run(ref, x)[1]) < 1e-5
    assert fast.last_path == "reference"


def test_torch_compile_of_a_fast_block_matches_reference():
    # The fold cache and buffer checks break the graph; the fused ops inside are custom ops.
    ref, fast, x = _block_and_input(seed=14)
    compiled = torch.compile(fast, backend="aot_eager")
    out = _run(compiled, x)
    assert fast.conv1.last_path == "fused"
    for a, b in zip(out, _run(ref, x)):
        assert max_err(a, b) < 1e-5


def test_global_hooks_run_reference_math_and_warn_once():
    ref, fast, x = _block_and_input(seed=15)
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        with pytest.warns(RuntimeWarning, match="global module forward hooks"):
            out = _run(fast, x)
    finally:
        handle.remove()
    assert fast.conv1.last_path == "reference" and "Conv2d" in calls
    for a, b in zip(out, _run(ref, x)):
        assert max_err(a, b) < 1e-5
    _run(fast, x)
    assert fast.conv1.last_path == "fused"


def test_last_path_is_reported_at_every_level():
    ref, fast, x = _block_and_input(seed=16)
    _run(fast, x)
    assert fast.last_path == "fused"
    assert fast.conv1.last_path == fast.conv1.ffc.last_path == "fused"
    fast.train()
    fast(x)
    assert fast.last_path == fast.conv1.last_path == fast.conv1.ffc.last_path == "reference"
