"""lama_fast.optimize: the whole generator as one plan, against LaMa's reference generator.

Generators are lama_fast.demo's seeded random ones (trained-like weight scales, BatchNorm
statistics measured on an image, pre-sigmoid output with standard deviation above 1), so the
comparisons exercise every folded BatchNorm and the sigmoid's whole range.
"""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from ffc_kernels import reference
from ffc_kernels.ops import dense
from lama_fast import optimized as optimize_module
from lama_fast.checkpoints import load_generator
from lama_fast.demo import demo_generator, demo_image, demo_mask
from lama_fast.optimized import optimize, plan_info
from lama_fast.pipeline import _inpaint

FP32_TOLERANCE = 1e-4  # max |optimized - reference| on the sigmoid output, fp32
# bf16 against the fp32 reference: the figures the README states (PSNR on [0, 1], SNR against
# the reference's variance so that a near-constant output cannot pass).
BF16_MIN_PSNR, BF16_MIN_SNR = 40.0, 30.0


@pytest.fixture(scope="module")
def big_lama():
    return demo_generator(seed=0)


@pytest.fixture(scope="module")
def lama_fourier():
    return demo_generator(seed=1, name="lama-fourier")


def _input(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, h, w, generator=g)
    mask = (torch.rand(n, 1, h, w, generator=g) > 0.7).float()
    return torch.cat([image * (1 - mask), mask], dim=1)


def _optimized(generator, **kwargs):
    return optimize(copy.deepcopy(generator), **kwargs)


def psnr_snr(out, ref):
    mse = ((out.double() - ref.double()) ** 2).mean().item()
    return 10 * math.log10(1 / mse), 10 * math.log10(ref.double().var().item() / mse)


@pytest.mark.parametrize("name", ["big-lama", "lama-fourier"])
@pytest.mark.parametrize("size", [(61, 83), (131, 141)], ids=["61x83", "131x141"])
def test_fp32_inpaint_matches_reference_at_odd_sizes(request, name, size):
    """Odd image sizes (padded to multiples of 8 by inpaint); 131x141 puts the full-resolution
    layers above dense.FIXUP_MIN_PIXELS, so their border recomputation runs too."""
    generator = request.getfixturevalue(name.replace("-", "_"))
    fast = _optimized(generator)
    h, w = size
    image = np.asarray(demo_image(max(h, w)))[:h, :w]
    mask = demo_mask(max(h, w))[:h, :w]
    ref_image, ref_out = _inpaint(image, mask, generator)
    fast_image, fast_out = _inpaint(image, mask, fast)
    assert plan_info(fast)["runs"] == "fp32" and plan_info(fast)["backend"] == "torch"
    assert fast_out.dtype == torch.float32 and fast_out.shape == ref_out.shape
    assert (fast_out - ref_out).abs().max().item() <= FP32_TOLERANCE
    assert np.abs(fast_image.astype(int) - ref_image.astype(int)).max() <= 1
    if size == (131, 141):
        assert 136 * 144 >= dense.FIXUP_MIN_PIXELS


def test_fp32_batch_of_two(big_lama):
    x = _input(2, 64, 72)
    fast = _optimized(big_lama)
    with torch.inference_mode():
        ref, out = big_lama(x), fast(x)
    assert out.shape == (2, 3, 64, 72) and out.is_contiguous()
    assert (out - ref).abs().max().item() <= FP32_TOLERANCE
    with torch.inference_mode():  # each image of the batch as it would be alone
        assert (fast(x[1:]) - out[1:]).abs().max().item() <= 1e-5


def _save_formats(generator, folder):
    """The generator in each checkpoint format load_generator reads (see test_checkpoints)."""
    from test_checkpoints import _traced_wrapper, lightning_checkpoint

    paths = {"state_dict": folder / "generator.pth", "lightning": folder / "best.ckpt",
             "torchscript": folder / "big-lama.pt"}
    torch.save(generator.state_dict(), paths["state_dict"])
    torch.save(lightning_checkpoint(generator), paths["lightning"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _traced_wrapper(generator).save(str(paths["torchscript"]))
    return paths


def test_loaded_from_every_checkpoint_format(tmp_path):
    source = demo_generator(seed=3, n_blocks=2)
    x = _input(1, 64, 64, seed=1)
    with torch.inference_mode():
        ref = source(x)
    for fmt, path in _save_formats(source, tmp_path).items():
        fast = optimize(load_generator(path))
        with torch.inference_mode():
            out = fast(x)
        assert plan_info(fast)["runs"] == "fp32", fmt
        assert (out - ref).abs().max().item() <= FP32_TOLERANCE, fmt


def test_refolds_after_load_state_dict_and_to():
    a, b = demo_generator(seed=4, n_blocks=2), demo_generator(seed=5, n_blocks=2)
    x = _input(1, 48, 40)
    fast = _optimized(a)
    with torch.inference_mode():
        before = fast(x)
        assert (before - a(x)).abs().max().item() <= FP32_TOLERANCE
    fast.load_state_dict(b.state_dict())
    with torch.inference_mode():
        after = fast(x)
        assert (after - b(x)).abs().max().item() <= FP32_TOLERANCE
        assert (after - before).abs().max().item() > 1e-2
    with torch.no_grad():  # an in-place change of one BatchNorm statistic is seen too
        fast.model[5].conv1.bn_g.running_mean.add_(0.5)
        b.model[5].conv1.bn_g.running_mean.add_(0.5)
    with torch.inference_mode():
        assert (fast(x) - b(x)).abs().max().item() <= FP32_TOLERANCE


def test_bf16_accuracy_or_fallback(big_lama):
    x = _input(1, 128, 128, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = _optimized(big_lama, precision="bf16")
        with torch.inference_mode():
            out, ref = fast(x), big_lama(x)
    assert out.dtype == torch.float32
    info = plan_info(fast)
    if optimize_module.bf16_unsupported(torch.device("cpu")) is not None:
        assert info["runs"] == "fp32" and any("runs fp32" in str(w.message) for w in caught)
        assert (out - ref).abs().max().item() <= FP32_TOLERANCE
        return
    assert info["runs"] == "bf16"
    assert all(t.dtype == torch.bfloat16 for t in _plan_weights(fast))
    psnr, snr = psnr_snr(out, ref)
    assert psnr >= BF16_MIN_PSNR and snr >= BF16_MIN_SNR, (psnr, snr)
    assert (out - ref).abs().max().item() > FP32_TOLERANCE  # it really ran in bf16


def _plan_weights(fast):
    plan = fast._lama_fast.plan
    for step in plan.steps:
        for conv in vars(step).values():
            if isinstance(conv, optimize_module._Conv):
                yield conv.weight


def test_bf16_without_hardware_support_says_so_and_runs_fp32(monkeypatch, big_lama):
    monkeypatch.setattr(optimize_module, "bf16_unsupported", lambda device: "no bf16 here (test)")
    monkeypatch.setattr(optimize_module.backends, "_warned", set())
    fast = _optimized(big_lama, precision="bf16")
    x = _input(1, 32, 32)
    with pytest.warns(RuntimeWarning, match="runs fp32: no bf16 here"), torch.inference_mode():
        out = fast(x)
    assert plan_info(fast)["runs"] == "fp32"
    with torch.inference_mode():
        assert (out - big_lama(x)).abs().max().item() <= FP32_TOLERANCE


def test_global_precision_flags_are_neither_read_nor_changed(big_lama):
    x = _input(1, 32, 40)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    fast = _optimized(big_lama, precision="tf32")
    try:
        torch.set_float32_matmul_precision("medium")  # would make fp32 dots bf16 if it were read
        with torch.inference_mode():
            out = fast(x)
            ref = big_lama(x)
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.backends.cudnn.allow_tf32 == saved[1]
        assert plan_info(fast)["runs"] == "fp32"  # tf32 is fp32 on the CPU
        assert (out - ref).abs().max().item() <= FP32_TOLERANCE
    finally:
        torch.set_float32_matmul_precision(saved[0])


class _CopyCounter(TorchDispatchMode):
    """Every op that moves data into new memory rather than computing: (op name, shape written)."""

    MOVES = {"copy_", "clone", "_to_copy", "to", "cat", "contiguous", "pad", "reflection_pad2d", "constant_pad_nd",
             "repeat", "reshape", "flatten", "narrow_copy"}

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in self.MOVES and torch.is_tensor(out):
            source = args[0] if torch.is_tensor(args[0]) else None
            if name == "copy_" or source is None or out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
                self.copies.append((name, tuple(args[0].shape if name == "copy_" else out.shape)))
        return out


def test_copies_are_counted_and_small(big_lama):
    """Every data movement of an fp32 forward, accounted for. Per residual FFC: [x_l | x_g]
    reflect-padded into one buffer (its two halves and four border lines), the Winograd tiles
    gathered and the two outputs' tiles scattered back (ops/winograd.py), the FourierUnit's
    input to channels-first and back, its spectrum to channels-last (torch's CPU FFT works
    channels-first). Once:
    the concatenation before the decoder, the last downsampling input's pad, the output
    convolution's 2x2 regrouping (dense.space_to_depth_weight), and thin border strips of the
    full-resolution layers. Nothing else."""
    import collections

    h = w = 256
    x = _input(1, h, w)
    fast = _optimized(big_lama)
    with torch.inference_mode():
        fast(x)
        counter = _CopyCounter()
        with counter:
            fast(x)
    seen = collections.Counter(counter.copies)
    n_ffc = 36
    hb, wb = h // 8, w // 8
    per_ffc = {
        ("copy_", (1, 128, hb, wb)): 1, ("copy_", (1, 384, hb, wb)): 1,  # pad-cat interiors
        ("copy_", (1, 512, wb)): 2, ("copy_", (1, 512, hb + 2)): 2,  # its border lines
        ("copy_", (1, hb // 4, wb // 4, 6, 6, 512)): 1,  # Winograd input tiles
        ("copy_", (4, 4, 1, hb // 4, wb // 4, 128)): 1, ("copy_", (4, 4, 1, hb // 4, wb // 4, 384)): 1,
        # The FourierUnit: its input to fp32 channels-first and back, its spectrum to channels-last.
        ("to", (1, 192, hb, wb)): 2, ("reshape", (hb * (wb // 2 + 1), 384)): 1,
    }
    once = {
        ("cat", (1, 512, hb, wb)): 1,
        ("pad", (1, 256, h // 4 + 2, w // 4 + 2)): 1,  # below dense.FIXUP_MIN_PIXELS
        ("copy_", (1, h // 2, w // 2, 64)): 4, ("copy_", (1, h // 2, 2, w // 2, 2, 3)): 1,
    }
    assert h * w // 16 < dense.FIXUP_MIN_PIXELS <= h * w // 4
    for key, count in list(per_ffc.items()) + list(once.items()):
        expected = count * (n_ffc if key in per_ffc else 1)
        assert seen.pop(key, 0) == expected, key
    # What is left: border strips of full-resolution layers, at most 9 input rows (or columns)
    # padded and at most 3 output rows written back.
    strips = [shape for (name, shape), count in seen.items() for _ in range(count) if name == "pad"]
    written = [shape for (name, shape), count in seen.items() for _ in range(count) if name == "copy_"]
    assert sorted({name for name, _ in seen}) == ["copy_", "pad"], seen
    assert strips and len(strips) == len(written)
    assert all(min(shape[2:]) <= 9 for shape in strips) and all(min(shape[2:]) <= 3 for shape in written)


def test_forward_contract_and_errors(big_lama):
    fast = _optimized(big_lama)
    x = _input(1, 40, 48)
    with torch.inference_mode():
        out = fast(x)
        assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (1, 3, 40, 48)
        assert 0 <= out.min().item() and out.max().item() <= 1
        assert torch.equal(fast(x.double()), out)  # any float input is taken as fp32
        with pytest.raises(ValueError, match="N x 4 x H x W"):
            fast(x[:, :3])
        with pytest.raises(ValueError, match="N x 4 x H x W"):
            fast(x[0])
        with pytest.raises(TypeError, match="floating point"):
            fast((x * 255).to(torch.uint8))
        with pytest.raises(TypeError, match="takes a tensor"):
            fast(x.numpy())
        with pytest.raises(ValueError, match="the input is on meta but the generator is on cpu"):
            fast(x.to("meta"))
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16"):
        optimize(copy.deepcopy(big_lama), precision="fp16")
    with pytest.raises(TypeError, match="nn.Module"):
        optimize("big-lama")


def test_training_and_gradients_run_the_generators_own_math():
    generator = demo_generator(seed=6, n_blocks=1)
    fast = _optimized(generator)
    x = _input(1, 32, 32).requires_grad_()
    out = fast(x)  # a forward that needs gradients: reference math, differentiable
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    generator(ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-5, rtol=1e-4)
    fast.train()
    generator.train()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), generator(x), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:lama_fast.optimize. a submodule has forward hooks")
def test_hooks_see_every_module(big_lama):
    fast = _optimized(big_lama)
    seen = []
    handle = fast.model[7].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    x = _input(1, 32, 32)
    with torch.inference_mode():
        out = fast(x)
        assert seen == ["FastFFCResnetBlock"]
        handle.remove()
        assert (out - fast(x)).abs().max().item() <= FP32_TOLERANCE
    assert len(seen) == 1


def test_unknown_layout_warns_and_runs_the_modules(monkeypatch):
    generator = demo_generator(seed=7, n_blocks=1)
    generator.model.insert(7, nn.Identity().eval())  # after the blocks' ConcatTupleLayer: unknown to the plan
    monkeypatch.setattr(optimize_module.backends, "_warned", set())
    fast = _optimized(generator)
    x = _input(1, 32, 32)
    with pytest.warns(RuntimeWarning, match="plan does not apply .layer 7: Identity"), torch.inference_mode():
        out = fast(x)
    assert plan_info(fast)["why_not"].startswith("layer 7")
    with torch.inference_mode():
        assert (out - generator(x)).abs().max().item() <= 1e-4


def test_lama_original_class_names_convert():
    """A generator from LaMa's own code: same structure and names, classes defined elsewhere."""
    generator = demo_generator(seed=8, n_blocks=1)
    foreign = {}
    for cls in (reference.FFC_BN_ACT, reference.FFCResnetBlock, reference.FFC, reference.SpectralTransform,
                reference.FourierUnit, reference.ConcatTupleLayer):
        foreign[cls] = type(cls.__name__, (cls,), {"__module__": "saicinpainting.training.modules.ffc"})
    fast = copy.deepcopy(generator)
    for m in fast.modules():
        if type(m) in foreign:
            m.__class__ = foreign[type(m)]
    optimize(fast)
    x = _input(1, 40, 40)
    with torch.inference_mode():
        assert (fast(x) - generator(x)).abs().max().item() <= FP32_TOLERANCE
    assert plan_info(fast)["why_not"] is None and plan_info(fast)["runs"] == "fp32"


def test_deepcopy_and_state_dict_keys(big_lama):
    fast = _optimized(big_lama)
    assert list(fast.state_dict()) == list(big_lama.state_dict())
    twin = copy.deepcopy(fast)
    x = _input(1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), fast(x), atol=0, rtol=0)
    assert twin._lama_fast is not fast._lama_fast


def test_torch_compile_fullgraph(big_lama):
    """The plan traces without graph breaks (fullgraph=True raises on one)."""
    fast = _optimized(demo_generator(seed=9, n_blocks=2))
    x = _input(1, 32, 40)
    with torch.inference_mode():
        eager = fast(x)  # builds the plan (checks run outside compilation)
        compiled = torch.compile(fast, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("merged", [False, True], ids=["winograd", "merged"])
def test_torch_compile_traces_the_precision_pinned_convolutions(monkeypatch, merged):
    """On CUDA in fp32 the compiled forward's convolutions are lama_fast::conv_at_precision, which
    sets cuDNN's TF32 switch itself (the eager forward's switches are not traced). Forced here on
    the CPU: the op, its fake implementation (plain, reflect-padded and transposed convolutions,
    and the blocks' merged exchange as CUDA runs it) and the trace without breaks; the result
    equals the eager plan's."""
    if merged:
        monkeypatch.setattr(optimize_module, "_MERGED_EXCHANGE", True)
    fast = _optimized(demo_generator(seed=9, n_blocks=1))
    x = _input(1, 32, 40)
    with torch.inference_mode():
        eager = fast(x)
        convs = list(optimize_module._convs(fast._lama_fast.plan.steps))
        assert any(c.transposed for c in convs) and any(c.reflect for c in convs)
        for conv in convs:
            conv.cuda_tf32 = False
        calls = []
        original = optimize_module._conv_fake

        def counted(*args):
            calls.append(args[6])
            return original(*args)

        monkeypatch.setattr(optimize_module, "_conv_fake", counted)
        compiled = torch.compile(fast, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)
    assert len(calls) >= len(convs) and True in calls and False in calls


@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
def test_merged_exchange_matches_reference(monkeypatch, padding_mode):
    """The residual blocks' exchange as CUDA runs it (one convolution of the padded [x_l | x_g],
    convl2g on its x_l channels), forced on the CPU: within fp32 tolerance of LaMa, with the
    blocks' reflection padding and with zero padding."""
    monkeypatch.setattr(optimize_module, "_MERGED_EXCHANGE", True)
    generator = demo_generator(seed=21, n_blocks=2)
    if padding_mode == "zeros":
        for block in generator.model:
            if type(block).__name__.endswith("FFCResnetBlock"):
                for conv in block.modules():
                    if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3):
                        conv.padding_mode = "zeros"
    fast = _optimized(generator)
    x = _input(1, 136, 144)  # a 1/8-resolution plane of 17 x 18
    with torch.inference_mode():
        ref, out = generator(x), fast(x)
    blocks = [s for s in fast._lama_fast.plan.steps if isinstance(s, optimize_module._ResidualBlock)]
    assert blocks and all(f.merged and f.l2l is None and f.winograd is None
                          for b in blocks for f in (b.conv1, b.conv2))
    assert all(b.conv1.g2l.reflect == (1 if padding_mode == "reflect" else 0) for b in blocks)
    assert (out - ref).abs().max().item() <= FP32_TOLERANCE


def _exact_cuda_reference(module, x):
    """LaMa's generator on CUDA with TF32 off (cuDNN's default is TF32 on)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return module(x)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_triton_path_under_the_interpreter(monkeypatch, precision):
    """A reduced generator (ngf 8, one block) with the Triton fused ops forced, in Triton's interpreter."""
    if not optimize_module.backends.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    config = dict(reference.GENERATOR_CONFIGS["big-lama"], ngf=8, n_blocks=1)
    torch.manual_seed(10)
    generator = reference.FFCResNetGenerator(**config)
    from helpers import randomize_batchnorm

    generator = randomize_batchnorm(generator, seed=10).eval()
    monkeypatch.setenv("FFC_KERNELS_BACKEND", "triton")
    fast = _optimized(generator, precision=precision)
    x = _input(1, 32, 24)
    with torch.inference_mode():
        out = fast(x)
    assert plan_info(fast)["backend"] == "triton"
    with torch.inference_mode():
        exact = copy.deepcopy(generator).double()(x.double())
        plain = generator(x)
    err, plain_err = (out.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()
    if precision == "fp32":
        assert err <= 4 * plain_err + 1e-6, (err, plain_err)
    else:
        psnr, _ = psnr_snr(out, exact)
        assert plan_info(fast)["runs"] == "bf16" and psnr >= BF16_MIN_PSNR and err > 4 * plain_err


def test_a_hook_on_the_generator_itself_keeps_the_plan(big_lama):
    fast = _optimized(big_lama)
    outputs = []
    fast.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.inference_mode():
        out = fast(_input(1, 32, 32))
    assert plan_info(fast)["runs"] == "fp32" and outputs[0] is out


def test_biases_and_identity_norms_fold_like_the_reference():
    """Layouts LaMa's code allows beyond the released configs: conv2 with a bias, convolution
    biases everywhere, bn_g an Identity."""
    generator = demo_generator(seed=14, n_blocks=2)
    torch.manual_seed(14)
    for block in (generator.model[5], generator.model[6]):
        for layer in (block.conv1, block.conv2):
            ffc = layer.ffc
            st = ffc.convg2g
            old = st.conv2
            st.conv2 = nn.Conv2d(old.in_channels, old.out_channels, 1, bias=True).eval()
            with torch.no_grad():
                st.conv2.weight.copy_(old.weight)
                st.conv2.bias.uniform_(-0.2, 0.2)
    generator.model[6].conv2.bn_g = nn.Identity().eval()
    x = _input(1, 40, 40)
    fast = _optimized(generator)
    with torch.inference_mode():
        assert (fast(x) - generator(x)).abs().max().item() <= FP32_TOLERANCE
    assert plan_info(fast)["runs"] == "fp32"


def test_changes_without_a_new_tensor_version_are_seen():
    generator = demo_generator(seed=15, n_blocks=1)
    fast = _optimized(generator)
    x = _input(1, 32, 32)
    with torch.inference_mode():
        fast(x)
        fast.model[-1] = generator.model[-1] = nn.Tanh().eval()  # a module swapped for another
        assert (fast(x) - generator(x)).abs().max().item() <= FP32_TOLERANCE
        for g in (fast, generator):  # a setting changed
            g.model[5].conv1.ffc.convg2g.fu.fft_norm = "forward"
        assert (fast(x) - generator(x)).abs().max().item() <= FP32_TOLERANCE
    with torch.no_grad():  # writes through .data bump no version: refold() says so
        for g in (fast, generator):
            g.model[1].ffc.convl2l.weight.data.mul_(1.5)
    optimize_module.refold(fast)
    with torch.inference_mode():
        assert (fast(x) - generator(x)).abs().max().item() <= FP32_TOLERANCE


def test_load_state_dict_of_inference_tensors_refolds():
    with torch.inference_mode():  # inference tensors have no version counter
        a, b = demo_generator(seed=16, n_blocks=1), demo_generator(seed=17, n_blocks=1)
        fast = optimize(copy.deepcopy(a))
        x = _input(1, 32, 32)
        fast(x)
        fast.load_state_dict(b.state_dict())
        assert (fast(x) - b(x)).abs().max().item() <= FP32_TOLERANCE


def test_unknown_layout_is_not_refolded_on_every_forward(monkeypatch):
    generator = demo_generator(seed=18, n_blocks=1)
    generator.model.insert(7, nn.Identity().eval())
    fast = _optimized(generator)
    builds = []
    original = optimize_module._build_plan
    monkeypatch.setattr(optimize_module, "_build_plan", lambda *a: builds.append(1) or original(*a))
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        for _ in range(3):
            fast(_input(1, 32, 32))
    assert len(builds) == 1


def test_pickle_round_trip(tmp_path, big_lama):
    fast = _optimized(big_lama)
    x = _input(1, 32, 32)
    with torch.inference_mode():
        out = fast(x)
    torch.save(fast, tmp_path / "g.pt")
    loaded = torch.load(tmp_path / "g.pt", weights_only=False)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), out, atol=0, rtol=0)
    assert plan_info(loaded)["runs"] == "fp32"


@pytest.mark.parametrize("set_with", ["default", "legacy", "matmul_precision", "fp32_precision"])
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_cuda_precision_switches_are_restored(set_with, allow_tf32):
    """The switches the plan sets around a CUDA forward (exercised without a GPU: they are plain
    process flags) come back as they were, read through the API that set them, without torch's
    error for mixed legacy and new APIs."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = torch.get_float32_matmul_precision(), conv.allow_tf32
    legacy = set_with != "fp32_precision"
    try:
        if set_with == "legacy":
            conv.allow_tf32, matmul.allow_tf32 = False, True
        elif set_with == "matmul_precision":
            torch.set_float32_matmul_precision("medium")  # the legacy matmul flag cannot say this
        elif set_with == "fp32_precision":
            matmul.fp32_precision, conv.conv.fp32_precision = "tf32", "ieee"

        def state():
            if legacy:
                return torch.get_float32_matmul_precision(), conv.allow_tf32
            return matmul.fp32_precision, conv.conv.fp32_precision

        before = state()
        with optimize_module.backends.cuda_fp32_precision(torch.device("cuda"), allow_tf32):
            inside = state()
        assert state() == before
        if legacy:
            assert inside == (("high", True) if allow_tf32 else ("highest", False))
        else:
            assert inside == (("tf32", "tf32") if allow_tf32 else ("ieee", "ieee"))
    finally:
        if not legacy:
            matmul.fp32_precision, conv.conv.fp32_precision = "none", "none"
        torch.set_float32_matmul_precision(saved[0])
        conv.allow_tf32 = saved[1]
        assert torch.get_float32_matmul_precision() == saved[0]  # the next tests see the default again


def test_a_lama_layer_swapped_in_after_optimize_is_planned():
    generator = demo_generator(seed=19, n_blocks=2)
    fast = _optimized(generator)
    x = _input(1, 32, 32)
    with torch.inference_mode():
        fast(x)
        fast.model[6] = copy.deepcopy(demo_generator(seed=20, n_blocks=2).model[6])  # LaMa's own class
        generator.model[6] = copy.deepcopy(fast.model[6])
        assert type(fast.model[6]) is reference.FFCResnetBlock
        assert (fast(x) - generator(x)).abs().max().item() <= FP32_TOLERANCE
    assert plan_info(fast)["runs"] == "fp32" and plan_info(fast)["why_not"] is None


# ------------------------------------------------------------------------------------ CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_full_generator(big_lama, precision):
    x = _input(1, 256, 256).cuda()
    reference_gpu = copy.deepcopy(big_lama).cuda()
    fast = _optimized(big_lama, precision=precision).cuda()
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            ref = reference_gpu(x)
            outs = [fast(x) for _ in range(3)]  # warm-up, capture, replay
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert plan_info(fast)["backend"] in ("triton", "cuda")
    for out in outs:
        if precision == "fp32":
            assert (out - ref).abs().max().item() <= FP32_TOLERANCE
        else:
            psnr, snr = psnr_snr(out, ref)
            assert psnr >= BF16_MIN_PSNR and snr >= BF16_MIN_SNR, (psnr, snr)
    assert len(fast._lama_fast.graphs) == 1 and not isinstance(next(iter(fast._lama_fast.graphs.values())), str)


@pytest.mark.gpu
def test_cuda_graphs_replay_new_inputs_and_recapture_after_new_weights():
    a, b = demo_generator(seed=11, n_blocks=2).cuda(), demo_generator(seed=12, n_blocks=2).cuda()
    fast = _optimized(a)
    xs = [_input(1, 64, 64, seed=s).cuda() for s in range(4)]
    with torch.inference_mode():
        for x in xs:
            assert (fast(x) - _exact_cuda_reference(a, x)).abs().max().item() <= FP32_TOLERANCE
        fast.load_state_dict(b.state_dict())
        for x in xs:
            assert (fast(x) - _exact_cuda_reference(b, x)).abs().max().item() <= FP32_TOLERANCE


@pytest.mark.gpu
def test_cuda_torch_compile_fullgraph():
    fast = _optimized(demo_generator(seed=13, n_blocks=2), cuda_graphs=False).cuda()
    x = _input(1, 64, 64).cuda()
    with torch.inference_mode():
        eager = fast(x)
        compiled = torch.compile(fast, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, atol=1e-4, rtol=1e-4)
