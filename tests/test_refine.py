"""LaMa's refinement (lama_fast.refine): pyramid and mask rules on hand-computed arrays, the
scale and budget rules, the algorithm's invariants on a reduced generator, the optimized plan's
backward against the reference's autograd, devices, precision and the CLI."""
import copy
import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from ffc_kernels import reference
from helpers import randomize_batchnorm
from lama_fast import inpaint, optimize, refine
from lama_fast.cli import main
from lama_fast.optimized import bf16_unsupported, generator_plan, plan_info
from lama_fast.refinement import (
    _refine,
    budget_size,
    ellipse_kernel,
    erode,
    gaussian_blur5,
    image_mask_pyramid,
    n_scales,
    pyrdown,
    pyrdown_mask,
)

# exp(-x^2 / 2) at x = 0, 1, 2, normalised over -2..2
_E1, _E2 = math.exp(-0.5), math.exp(-2.0)
_K = [v / (1 + 2 * _E1 + 2 * _E2) for v in (_E2, _E1, 1.0, _E1, _E2)]


# ------------------------------------------------------------------------------ pyramid and mask rules

def test_gaussian_blur_of_an_impulse_is_the_5x5_kernel():
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    x[0, 0, 4, 4] = 1
    y = gaussian_blur5(x)[0, 0]
    expected = torch.tensor(_K, dtype=torch.float64)
    torch.testing.assert_close(y[2:7, 2:7], torch.outer(expected, expected))
    assert y[:2].abs().max() == 0 and y[:, 7:].abs().max() == 0


def test_gaussian_blur_reflects_at_the_border():
    # An impulse at (1, 1): reflection (not edge repetition, not zeros) puts a copy at (-1, -1),
    # so the corner (0, 0) sees it at offsets -1 and +1 on both axes.
    x = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    x[0, 0, 1, 1] = 1
    assert gaussian_blur5(x)[0, 0, 0, 0].item() == pytest.approx((_K[1] + _K[3]) ** 2, rel=1e-12)
    # (0, 1): rows at offsets -1 and +1 again; columns at offset 0 and, through column -1, at -2.
    assert gaussian_blur5(x)[0, 0, 0, 1].item() == pytest.approx((_K[1] + _K[3]) * (_K[2] + _K[0]), rel=1e-12)


def test_pyrdown_halves_bilinearly_after_the_blur():
    # A constant is unchanged by the blur; halving keeps it, sizes round down.
    assert torch.equal(pyrdown(torch.full((1, 3, 9, 7), 0.25)), torch.full((1, 3, 4, 3), 0.25))
    # Bilinear halving with align_corners=False averages 2x2 blocks: a linear ramp along W
    # (which the symmetric blur keeps, away from the border) gives the block centres.
    ramp = torch.arange(12, dtype=torch.float64).repeat(1, 3, 12, 1)
    y = pyrdown(ramp)
    assert y.shape == (1, 3, 6, 6)
    torch.testing.assert_close(y[0, 0, 0, 1:5], torch.tensor([2.5, 4.5, 6.5, 8.5], dtype=torch.float64))


def test_pyrdown_mask_rounds_up_after_the_blur():
    # One set pixel in a corner spreads to rows and columns 0..2 by the 5x5 blur: the 2x2 blocks
    # (0, 0), (0, 1), (1, 0), (1, 1) of the halved mask touch it and are set, the others are 0.
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 0, 0] = 1
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 1
    assert torch.equal(pyrdown_mask(mask)[0, 0], expected)


def test_pyrdown_mask_without_blur_keeps_only_full_blocks():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1.0]])[None, None]
    # Block means 1, 0, 0.75, 0.5: only the full block reaches 1 - 1e-8.
    assert torch.equal(pyrdown_mask(mask, blur=False, round_up=False)[0, 0], torch.tensor([[1, 0], [0, 0.0]]))


def test_ellipse_kernel_is_opencvs_15x15():
    # OpenCV: row i spans 7 - d .. 7 + d, d = round(sqrt(49 - (i - 7)^2)):
    # |i - 7| = 0..7 -> sqrt 7, 6.93, 6.71, 6.32, 5.74, 4.90, 3.61, 0 -> d = 7, 7, 7, 6, 6, 5, 4, 0.
    kernel = ellipse_kernel(15)
    widths = [1, 9, 11, 13, 13, 15, 15, 15, 15, 15, 13, 13, 11, 9, 1]
    assert kernel.sum(dim=1).tolist() == widths
    # Symmetric about both axes, but not its own transpose: OpenCV's rows have a single tip pixel,
    # its columns 0 and 14 five (rows 5..9, where d = 7).
    assert torch.equal(kernel, kernel.flip(0)) and torch.equal(kernel, kernel.flip(1))
    assert kernel[:, 0].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    assert kernel[0].nonzero().flatten().tolist() == [7]
    assert kernel[1].nonzero().flatten().tolist() == list(range(3, 12))


def test_erosion_by_hand_and_geodesic_border():
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    mask = torch.ones(1, 1, 5, 5)
    mask[0, 0, 2, 2] = 0
    expected = torch.ones(5, 5)
    for r, c in ((2, 2), (1, 2), (3, 2), (2, 1), (2, 3)):
        expected[r, c] = 0
    assert torch.equal(erode(mask, cross)[0, 0], expected)
    # Outside the image does not erode (kornia's default geodesic border).
    assert torch.equal(erode(torch.ones(1, 1, 6, 7), ellipse_kernel()), torch.ones(1, 1, 6, 7))
    # A 15x15 ellipse erodes a 20x20 square to the pixels whose whole ellipse fits: 6x6.
    square = torch.zeros(1, 1, 40, 40)
    square[0, 0, 10:30, 10:30] = 1
    eroded = erode(square, ellipse_kernel())
    assert eroded.sum().item() == 36 and torch.equal(eroded[0, 0, 17:23, 17:23], torch.ones(6, 6))


def test_blur_resize_and_erosion_match_kornia():
    kornia = pytest.importorskip("kornia")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 21, 26, generator=g)
    blurred = kornia.filters.gaussian_blur2d(x, (5, 5), (1.0, 1.0))
    torch.testing.assert_close(gaussian_blur5(x), blurred, atol=1e-6, rtol=0)
    # LaMa's px_budget resize is kornia's resize; its pyramid halves with F.interpolate
    images, _ = image_mask_pyramid(x, torch.ones(1, 1, 21, 26), min_side=1000, px_budget=226)
    assert images[-1].shape[-2:] == (13, 16)  # sqrt(226 / 546) = 0.643: 13.5, 16.7 truncated
    resized = kornia.geometry.transform.resize(x, (13, 16), interpolation="bilinear", align_corners=False)
    torch.testing.assert_close(images[-1], resized, atol=1e-6, rtol=0)
    m = (torch.rand(1, 1, 40, 50, generator=g) > 0.2).float()
    expected = kornia.morphology.erosion(m, ellipse_kernel().float())
    assert torch.equal(erode(m, ellipse_kernel()), expected)


def test_scale_count_rule():
    # min(1 + round(max(0, log2(min(H, W) / min_side))), max_scales)
    assert n_scales(300, 2000, 512, 3) == 1
    assert n_scales(724, 900, 512, 3) == 1      # log2(724/512) = 0.4997 rounds to 0
    assert n_scales(725, 900, 512, 3) == 2      # 0.5017 rounds to 1
    assert n_scales(1024, 1024, 512, 3) == 2
    assert n_scales(2048, 4096, 512, 3) == 3
    assert n_scales(4096, 4096, 512, 3) == 3    # 4, capped
    assert n_scales(4096, 4096, 512, 5) == 4


def test_px_budget_rule():
    assert budget_size(1000, 1800, 1_800_000) == (1000, 1800)
    # sqrt(1.8e6 / 2e6) = 0.948683: 2000 -> 1897.37, 1000 -> 948.68, truncated
    assert budget_size(2000, 1000, 1_800_000) == (1897, 948)
    image = torch.rand(1, 3, 64, 80)
    mask = torch.zeros(1, 1, 64, 80)
    mask[..., 10:20, 10:20] = 1
    images, masks = image_mask_pyramid(image, mask, min_side=8, max_scales=5, px_budget=2000)
    # sqrt(2000 / 5120) = 0.625 -> 40 x 50; min side 40 / 8 = 5 -> 1 + round(2.32) = 3 scales
    assert [tuple(i.shape[-2:]) for i in images] == [(10, 12), (20, 25), (40, 50)]
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks[:-1])
    torch.testing.assert_close(images[-1], F.interpolate(image, size=(40, 50), mode="bilinear", align_corners=False))
    torch.testing.assert_close(images[1], pyrdown(images[2]))


# ------------------------------------------------------------------------------ refinement on a reduced generator

def _generator(n_blocks=2, seed=1):
    torch.manual_seed(seed)
    config = dict(reference.GENERATOR_CONFIGS["big-lama"], ngf=8, n_blocks=n_blocks)
    generator = randomize_batchnorm(reference.FFCResNetGenerator(**config), seed=seed).eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return generator


@pytest.fixture(scope="module")
def generator():
    return _generator()


@pytest.fixture(scope="module")
def optimized(generator):
    return optimize(copy.deepcopy(generator))


def _inputs(height=64, width=80, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    image = (127 + 60 * np.sin(x / 7.0)[..., None] + 40 * np.cos(y / 5.0)[..., None]
             + rng.integers(-20, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4:height * 3 // 4, width // 3:width * 3 // 4] = 255
    return image, mask


@pytest.mark.parametrize("which", ["reference", "optimized"])
@pytest.mark.parametrize("min_side", [512, 32])  # one scale; two scales
def test_one_iteration_equals_plain_inpainting(generator, optimized, which, min_side):
    """With n_iters=1 no step is taken: the finest scale's prediction is the generator's own
    (sizes multiple of 8, so refine's reflection and inpaint's symmetric padding agree)."""
    model = generator if which == "reference" else optimized
    image, mask = _inputs()
    result, info = _refine(image, mask, model, n_iters=1, min_side=min_side, progress=False)
    assert len(info["sizes"]) == (1 if min_side == 512 else 2)
    assert np.array_equal(result, inpaint(image, mask, model))


def test_refinement_lowers_the_loss_and_keeps_unmasked_pixels(generator):
    image, mask = _inputs()
    result, info = _refine(image, mask, generator, n_iters=6, lr=0.01, min_side=32, progress=False)
    assert info["sizes"] == [(32, 40), (64, 80)]
    (losses,) = info["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    keep = mask <= 127
    assert np.array_equal(result[keep], image[keep])
    assert not np.array_equal(result, inpaint(image, mask, generator))  # it did change the hole


def test_px_budget_refines_smaller_and_pastes_back(generator):
    image, mask = _inputs(64, 80)
    result, info = _refine(image, mask, generator, n_iters=2, min_side=16, px_budget=2000, progress=False)
    assert info["sizes"] == [(20, 25), (40, 50)]  # 0.625 per side, then 1 + round(log2(40 / 16)) = 2 scales
    assert result.shape == image.shape
    keep = mask <= 127
    assert np.array_equal(result[keep], image[keep])
    assert np.abs(result[~keep].astype(int) - image[~keep]).max() > 0


def test_devices_split_equals_one_device(generator, optimized):
    image, mask = _inputs()
    for model in (generator, optimized):
        one = _refine(image, mask, model, n_iters=3, lr=0.01, min_side=32, progress=False)
        two = _refine(image, mask, model, n_iters=3, lr=0.01, min_side=32, devices=["cpu", torch.device("cpu")],
                      progress=False)
        assert np.array_equal(one[0], two[0])
        assert [one[1][key] for key in ("sizes", "losses")] == [two[1][key] for key in ("sizes", "losses")]
        assert len(one[1]["seconds"]) == len(one[1]["sizes"]) and all(t > 0 for t in one[1]["seconds"])


def test_optimized_agrees_with_reference(generator, optimized):
    image, mask = _inputs()
    ref, ref_info = _refine(image, mask, generator, n_iters=4, lr=0.01, min_side=32, progress=False)
    fast, fast_info = _refine(image, mask, optimized, n_iters=4, lr=0.01, min_side=32, progress=False)
    np.testing.assert_allclose(fast_info["losses"], ref_info["losses"], rtol=1e-4)
    assert np.abs(fast.astype(int) - ref).max() <= 1


def test_bf16_keeps_features_and_adam_state_fp32(generator, monkeypatch):
    if bf16_unsupported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16")
    fast = optimize(copy.deepcopy(generator), precision="bf16")
    seen = []
    adam = torch.optim.Adam

    class Spy(adam):
        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            for group in self.param_groups:
                for p in group["params"]:
                    seen.append((p.dtype, p.grad.dtype, self.state[p]["exp_avg"].dtype))
            return out

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    image, mask = _inputs()
    result, info = _refine(image, mask, fast, n_iters=3, lr=0.01, min_side=32, progress=False)
    assert plan_info(fast)["runs"] == "bf16"
    assert seen and all(d == (torch.float32,) * 3 for d in seen)
    ref, ref_info = _refine(image, mask, generator, n_iters=3, lr=0.01, min_side=32, progress=False)
    np.testing.assert_allclose(info["losses"], ref_info["losses"], rtol=0.05)
    assert np.abs(result.astype(int) - ref).mean() < 3


def test_refine_after_inpaint_with_the_same_optimized_generator(generator):
    """inpaint folds the plan's weights under inference_mode, whose tensors autograd cannot save:
    refine must still work afterwards, and give what it gives on a fresh generator."""
    fast, fresh = optimize(copy.deepcopy(generator)), optimize(copy.deepcopy(generator))
    image, mask = _inputs()
    inpaint(image, mask, fast)
    after, _ = _refine(image, mask, fast, n_iters=2, min_side=32, progress=False)
    alone, _ = _refine(image, mask, fresh, n_iters=2, min_side=32, progress=False)
    np.testing.assert_array_equal(after, alone)
    np.testing.assert_array_equal(inpaint(image, mask, fast), inpaint(image, mask, fresh))


def test_bf16_features_start_from_an_fp32_front(generator):
    """Only the rear computes in bf16: the features refine optimises start as LaMa's fp32 front gives them."""
    from lama_fast.refinement import _stages

    fast = optimize(copy.deepcopy(generator), precision="bf16")
    first = next(i for i, m in enumerate(generator.model) if type(m).__name__ == "FFCResnetBlock")
    x = torch.rand(1, 4, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = _stages(fast, [torch.device("cpu")]).run_front(x)
        expected = generator.model[:first](x)
    assert [t.dtype for t in z] == [torch.float32, torch.float32]
    for got, want in zip(z, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_inpaint_refine_option(generator):
    image, mask = _inputs()
    expected = refine(image, mask, generator, n_iters=2, min_side=32, progress=False)
    assert np.array_equal(inpaint(image, mask, generator, refine=True, n_iters=2, min_side=32, progress=False),
                          expected)
    with pytest.raises(TypeError, match="refine=True"):
        inpaint(image, mask, generator, n_iters=2)


@pytest.mark.parametrize("option, value", [("n_iters", 0), ("n_iters", 1.5), ("lr", 0), ("lr", float("nan")),
                                           ("min_side", -1), ("max_scales", 0), ("px_budget", 0), ("lr", True)])
def test_bad_options(generator, option, value):
    image, mask = _inputs(16, 16)
    with pytest.raises(ValueError, match=option):
        refine(image, mask, generator, progress=False, **{option: value})


def test_refuses_training_mode_and_other_layouts(generator):
    image, mask = _inputs(16, 16)
    with pytest.raises(ValueError, match="eval"):
        refine(image, mask, copy.deepcopy(generator).train(), progress=False)
    with pytest.raises(ValueError, match="layout"):
        refine(image, mask, torch.nn.Conv2d(4, 3, 1).eval(), progress=False)


def test_empty_mask_returns_the_image(generator):
    image, _ = _inputs(16, 16)
    with pytest.warns(UserWarning, match="no pixel"):
        result = refine(image, np.zeros((16, 16), np.uint8), generator, progress=False)
    assert np.array_equal(result, image)


# ------------------------------------------------------------------------------ the plan's backward

def _rear_grads(model, x, dtype=torch.float32):
    """Gradients of sum(output * ramp) with respect to the features entering the residual blocks."""
    plan = generator_plan(model)
    if plan is None:
        model = copy.deepcopy(model).to(dtype)
        first = next(i for i, m in enumerate(model.model) if type(m).__name__.endswith("FFCResnetBlock"))
        with torch.no_grad():
            z = model.model[:first](x.to(dtype))
        z = [t.detach().requires_grad_() for t in z]
        y = model.model[first:](tuple(z))
    else:
        first = plan.first_block()
        with torch.no_grad():
            state = plan.run_steps((x.to(plan.precision.dtype), None), 0, first)
        z = [t.float().requires_grad_() for t in state]
        state = plan.run_steps(tuple(t.to(plan.precision.dtype) for t in z), first)
        y = plan.output(state)
    ramp = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    (y * ramp).sum().backward()
    return tuple(t.grad for t in z)


@pytest.mark.parametrize("backend, exchange", [("torch", "winograd"), ("torch", "merged"), ("triton", "winograd")])
def test_plan_backward_matches_reference_autograd(generator, monkeypatch, backend, exchange):
    """The optimized residual blocks and decoder, their backward (the exchange's adjoint by
    Winograd on the CPU in fp32, or by transposed convolutions as with CUDA's merged exchange; the
    FourierUnit recomputed, through the fused ops' own backward with Triton), against LaMa's
    modules under autograd in fp64."""
    from lama_fast import optimized as optimized_module

    if exchange == "merged":
        monkeypatch.setattr(optimized_module, "_MERGED_EXCHANGE", True)
    if backend == "triton":
        from ffc_kernels import backends

        if not backends.triton_interpret():
            pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
        monkeypatch.setenv("FFC_KERNELS_BACKEND", "triton")
    x = torch.rand(1, 4, 40, 48, generator=torch.Generator().manual_seed(3))
    fast = optimize(copy.deepcopy(generator))
    got = _rear_grads(fast, x)
    assert plan_info(fast)["backend"] == backend
    conv = generator_plan(fast).steps[generator_plan(fast).first_block()].conv1
    assert (conv.winograd is not None, conv.merged) == (exchange == "winograd", exchange == "merged")
    exact = _rear_grads(generator, x, torch.float64)
    plain = _rear_grads(generator, x, torch.float32)
    for g, e, p in zip(got, exact, plain, strict=True):
        scale = e.abs().max().item()
        assert scale > 0
        err, err_plain = (g.double() - e).abs().max().item(), (p.double() - e).abs().max().item()
        assert err <= 10 * err_plain + 1e-6 * scale, (err, err_plain, scale)


@pytest.mark.parametrize("size", [(5, 7), (8, 6)])  # odd and even widths, sizes not multiples of 4
def test_one_residual_block_input_gradient_matches_reference(generator, size):
    """One optimized residual block (two FFCs with the residual adds) against LaMa's FFCResnetBlock
    under autograd: the gradients of both feature halves."""
    fast = optimize(copy.deepcopy(generator))
    x = torch.rand(1, 4, 8 * size[0], 8 * size[1], generator=torch.Generator().manual_seed(6))
    plan = generator_plan(fast)
    first = plan.first_block()
    with torch.no_grad():
        z = [t.float() for t in plan.run_steps((x, None), 0, first)]
    ramps = [torch.linspace(-1, 1, t.numel(), dtype=torch.float64).view(t.shape) for t in z]

    def grads(run, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in z]
        out = run(leaves)
        sum((o.to(dtype) * r.to(dtype)).sum() for o, r in zip(out, ramps)).backward()
        return tuple(t.grad for t in leaves)

    block = next(m for m in generator.model if isinstance(m, reference.FFCResnetBlock))
    exact = grads(lambda t: copy.deepcopy(block).double()(tuple(t)), torch.float64)
    plain = grads(lambda t: block(tuple(t)), torch.float32)
    got = grads(lambda t: plan.run_steps(tuple(v.contiguous(memory_format=torch.channels_last) for v in t), first,
                                         first + 1), torch.float32)
    for g, e, p in zip(got, exact, plain, strict=True):
        err, err_plain = (g.double() - e).abs().max().item(), (p.double() - e).abs().max().item()
        assert err <= 10 * err_plain + 1e-6 * e.abs().max().item(), (err, err_plain)


@pytest.mark.parametrize("kind", ["reflect7", "reflect3_relu", "transposed_relu", "zeros3"])
def test_frozen_convolution_backward_matches_autograd(kind):
    """A plan's convolution on an input needing its gradient (``_FrozenConv``): the fast forward
    (border recomputation, the space-to-depth form of a 7x7 with 3 outputs, at a size above
    dense.FIXUP_MIN_PIXELS) and its adjoint, against autograd of the plain pad and convolution in fp64."""
    from ffc_kernels.ops import dense
    from lama_fast.optimized import _Conv

    g = torch.Generator().manual_seed(8)
    ci, size = 6, 136
    spec = {"reflect7": (3, 7, 3, False, False), "reflect3_relu": (5, 3, 1, True, False),
            "transposed_relu": (4, 3, 0, True, True), "zeros3": (5, 3, 0, False, False)}[kind]
    co, k, reflect, relu, transposed = spec
    weight = torch.randn(*((ci, co) if transposed else (co, ci)), k, k, generator=g, dtype=torch.float64) / k
    bias = torch.randn(co, generator=g, dtype=torch.float64)
    conv = _Conv(weight.float().contiguous(memory_format=torch.channels_last), bias.float(), reflect=reflect, relu=relu,
                 transposed=transposed, stride=(2, 2) if transposed else (1, 1),
                 padding=(1, 1) if transposed or kind == "zeros3" else (0, 0),
                 output_padding=(1, 1) if transposed else (0, 0),
                 s2d=dense.space_to_depth_weight(weight.float(), bias.float()) if kind == "reflect7" else None)
    x = torch.randn(1, ci, size, size, generator=g, dtype=torch.float64)

    def exact(t):
        if transposed:
            y = F.conv_transpose2d(t, weight, bias, 2, 1, 1)
        else:
            y = F.conv2d(F.pad(t, (reflect,) * 4, mode="reflect") if reflect else t, weight, bias,
                         padding=conv.padding)
        return y.relu() if relu else y

    x64 = x.clone().requires_grad_()
    y64 = exact(x64)
    ramp = torch.linspace(-1, 1, y64.numel(), dtype=torch.float64).view(y64.shape)
    (y64 * ramp).sum().backward()
    x32 = x.float().contiguous(memory_format=torch.channels_last).requires_grad_()
    y32 = conv(x32)
    assert y32.grad_fn is not None and type(y32.grad_fn).__name__ == "_FrozenConvBackward"
    (y32 * ramp.float()).sum().backward()
    torch.testing.assert_close(y32.double(), y64.detach(), rtol=1e-4, atol=1e-4)
    scale = x64.grad.abs().max().item()
    assert scale > 0 and (x32.grad.double() - x64.grad).abs().max().item() <= 1e-5 * scale * k


def test_plan_backward_bf16_is_close(generator):
    if bf16_unsupported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16")
    x = torch.rand(1, 4, 40, 48, generator=torch.Generator().manual_seed(4))
    got = _rear_grads(optimize(copy.deepcopy(generator), precision="bf16"), x)
    exact = _rear_grads(generator, x, torch.float64)
    for g, e in zip(got, exact, strict=True):
        assert g.dtype == torch.float32
        assert (g.double() - e).norm() / e.norm() < 0.05


# ------------------------------------------------------------------------------ command line

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A plain state dict of a seeded one-block big-lama (the loader takes LaMa's real widths)."""
    from lama_fast.demo import demo_generator

    path = tmp_path_factory.mktemp("weights") / "generator.pth"
    torch.save(demo_generator(seed=1, n_blocks=1).state_dict(), path)
    return path


def _files(tmp_path, size=(40, 48)):
    image, mask = _inputs(*size)
    PIL.Image.fromarray(image).save(tmp_path / "image.png")
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    return image, mask


@pytest.mark.parametrize("extra", [[], ["--reference"]])
def test_cli_refine_writes_the_refined_image(tmp_path, checkpoint, extra):
    from lama_fast.checkpoints import load_generator

    image, mask = _files(tmp_path)
    out = tmp_path / "out.png"
    args = ["inpaint", tmp_path / "image.png", tmp_path / "mask.png", "-o", out, "--checkpoint", checkpoint,
            "--device", "cpu", "--refine", "--refine-iters", "2", "--refine-min-side", "16"] + extra
    assert main([str(a) for a in args]) == 0
    written = np.asarray(PIL.Image.open(out))
    expected = refine(image, mask, load_generator(str(checkpoint)).eval(), n_iters=2, min_side=16, progress=False)
    assert np.abs(written.astype(int) - expected).max() <= 1  # optimized or reference, same weights


@pytest.mark.parametrize("option, value, message", [
    ("--refine-iters", "0", "at least 1"), ("--refine-iters", "x", "expected an integer"),
    ("--refine-lr", "0", "positive"), ("--refine-lr", "-1e-3", "positive"), ("--refine-lr", "nan", "positive"),
    ("--refine-lr", "fast", "expected a number"), ("--refine-min-side", "0", "at least 1"),
    ("--refine-max-scales", "0", "at least 1"), ("--refine-px-budget", "-5", "at least 1"),
])
def test_cli_refuses_bad_refine_options(tmp_path, checkpoint, capsys, option, value, message):
    _files(tmp_path)
    args = ["inpaint", tmp_path / "image.png", tmp_path / "mask.png", "-o", tmp_path / "out.png", "--checkpoint",
            checkpoint, "--refine", f"{option}={value}"]
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and message in err
    assert not (tmp_path / "out.png").exists()


def test_cli_refine_refuses_tiles_and_directories(tmp_path, checkpoint, capsys):
    _files(tmp_path)
    base = ["inpaint", tmp_path / "image.png", tmp_path / "mask.png", "-o", tmp_path / "out.png", "--checkpoint",
            checkpoint, "--refine"]
    assert main([str(a) for a in base + ["--tile-size", "64"]]) == 1
    assert "--tile-size" in capsys.readouterr().err
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    (tmp_path / "image.png").rename(images / "a.png")
    (tmp_path / "mask.png").rename(masks / "a_mask.png")
    assert main([str(a) for a in ["inpaint", images, masks, "-o", tmp_path / "o", "--checkpoint", checkpoint,
                                  "--refine"]]) == 1
    assert "directories" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_refinement_matches_the_reference(generator, precision):
    """On CUDA (cuDNN convolutions, cuFFT, the fused Triton ops and their backward): the optimized
    generator's refinement against the reference module's on the same GPU, and the split over two
    device entries (two GPUs when there are, else the same one twice) equal to one device."""
    image, mask = _inputs()
    reference_gpu = copy.deepcopy(generator).cuda()
    fast = optimize(copy.deepcopy(generator).cuda(), precision=precision)
    ref, ref_info = _refine(image, mask, reference_gpu, n_iters=4, lr=0.01, min_side=32, progress=False)
    got, info = _refine(image, mask, fast, n_iters=4, lr=0.01, min_side=32, progress=False)
    assert plan_info(fast)["device"].startswith("cuda")
    rtol, atol = (1e-3, 1) if precision == "fp32" else (0.05, 8)
    np.testing.assert_allclose(info["losses"], ref_info["losses"], rtol=rtol)
    assert np.abs(got.astype(int) - ref).max() <= atol
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    split, split_info = _refine(image, mask, fast, n_iters=4, lr=0.01, min_side=32, devices=["cuda:0", second],
                                progress=False)
    # The first loss comes before any step: the same forward, to fp32 rounding.
    # Later ones follow Adam steps on gradients that differ run to run on CUDA (bilinear
    # interpolation's backward in the pyramid loss adds with atomics, in no fixed order), and
    # Adam's normalisation magnifies that for tiny gradients, most in bf16 (seen: 4e-5 on an H200).
    split_losses, losses = np.asarray(split_info["losses"]), np.asarray(info["losses"])
    np.testing.assert_allclose(split_losses[0, 0], losses[0, 0], rtol=1e-6)
    np.testing.assert_allclose(split_losses, losses, rtol=1e-5 if precision == "fp32" else 1e-3)
    assert np.abs(split.astype(int) - got).max() <= (1 if precision == "fp32" else 2)
