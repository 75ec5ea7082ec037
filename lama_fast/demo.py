"""The embedded default for ``lama-fast verify``: a seeded random big-lama, a test image and mask.

No weights ship with this package, so ``verify`` checks the fused path against the reference on
a generator whose weights are random but behave like a trained one's: convolutions at a
variance-preserving scale, random BatchNorm affine parameters, running statistics measured on the
demo image (so every BatchNorm really normalises, and folding it into a convolution is exercised
with means and variances far from 0 and 1), and residual branches scaled down as in trained
ResNets. Activations then keep a standard deviation between about 0.5 and 1 through all 18
blocks, and the sigmoid output spreads over (0, 1) instead of saturating.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn as nn

import ffc_kernels
from ffc_kernels.reference import FFCResnetBlock
from lama_fast.generator import build_generator
from lama_fast.optimized import optimize, plan_info
from lama_fast.pipeline import _inpaint

__all__ = ["demo_generator", "demo_image", "demo_mask", "verify", "VerifyReport", "FP32_TOLERANCE"]

# Largest |fast - reference| allowed on the generator output (a sigmoid in [0, 1]) in fp32.
FP32_TOLERANCE = 1e-3

# Gain of the last BatchNorm of each residual branch relative to the others. Trained LaMa
# generators keep the residual branches small; with gain 1 the 18 branches would add up.
_RESIDUAL_BRANCH_GAIN = 0.2

# Standard deviation of the generator's pre-sigmoid output on the demo image.
_OUTPUT_STD = 1.5


def demo_generator(seed: int = 0, n_blocks: int | None = None, name: str = "big-lama") -> nn.Module:
    """A LaMa reference generator (``name``'s configuration, ``n_blocks`` residual blocks if given)
    with seeded random weights and BatchNorm statistics, in eval mode on the CPU."""
    generator = build_generator(name, n_blocks=n_blocks)
    rng = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=rng) * (high - low) + low

    residual_bns = set()
    for module in generator.modules():
        if isinstance(module, FFCResnetBlock):
            residual_bns.update((module.conv2.bn_l, module.conv2.bn_g))

    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                weight = module.weight
                if isinstance(module, nn.ConvTranspose2d):
                    # Each output pixel of a stride-s transposed conv sees 1/s^2 of the kernel taps.
                    fan_in = weight.shape[0] * weight[0, 0].numel() / (module.stride[0] * module.stride[1])
                else:
                    fan_in = weight[0].numel()
                weight.copy_(torch.randn(weight.shape, generator=rng) * math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(uniform(module.bias.shape, -0.1, 0.1))
            elif isinstance(module, nn.BatchNorm2d):
                gain = _RESIDUAL_BRANCH_GAIN if module in residual_bns else 1.0
                module.weight.copy_(uniform(module.weight.shape, 0.5, 1.5) * gain)
                module.bias.copy_(uniform(module.bias.shape, -0.2, 0.2) * gain)
    _calibrate_batchnorm(generator)
    _calibrate_output(generator)
    return generator.eval()


def _calibrate_batchnorm(generator: nn.Module, size: int = 128) -> None:
    """Set every BatchNorm's running statistics to those of its input on the demo image.

    In training mode each BatchNorm normalises with the statistics of the batch it sees, so one
    forward pass with cumulative averaging (momentum None) records exactly the statistics that
    the same input produces in eval mode, layer after layer.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    image = torch.from_numpy(demo_image(size)).permute(2, 0, 1)[None].float() / 255
    mask = torch.from_numpy(demo_mask(size) > 127)[None, None].float()
    with torch.no_grad():
        generator(torch.cat([image * (1 - mask), mask], dim=1))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
        norm.eval()


def _calibrate_output(generator: nn.Module, size: int = 128) -> None:
    """Scale the output convolution so that its pre-sigmoid values have standard deviation
    ``_OUTPUT_STD`` on the demo image: the output then uses the sigmoid's range, as a trained
    model's does, and a precision test cannot pass on a near-constant output."""
    last = [m for m in generator.modules() if isinstance(m, nn.Conv2d)][-1]
    seen = {}
    handle = last.register_forward_hook(lambda module, args, out: seen.setdefault("out", out))
    image = torch.from_numpy(demo_image(size)).permute(2, 0, 1)[None].float() / 255
    mask = torch.from_numpy(demo_mask(size) > 127)[None, None].float()
    with torch.no_grad():
        generator.eval()(torch.cat([image * (1 - mask), mask], dim=1))
        handle.remove()
        out = seen["out"]
        mean, gain = out.mean(), _OUTPUT_STD / out.std()
        last.weight.mul_(gain)
        if last.bias is not None:  # keep the mean where it was: gain * (out - bias) + new bias = mean
            last.bias.mul_(gain).add_((1 - gain) * mean)


def demo_image(size: int = 256) -> np.ndarray:
    """A smooth synthetic RGB scene (sky, sun, hills, a house, a textured field), size x size uint8."""
    if size < 8:
        raise ValueError(f"demo image size must be at least 8, got {size}")
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    image = np.empty((size, size, 3), np.float32)
    # Sky: vertical gradient from deep blue to pale near the horizon.
    image[..., 0] = 0.25 + 0.55 * y
    image[..., 1] = 0.45 + 0.40 * y
    image[..., 2] = 0.95 - 0.15 * y
    # Sun with a soft halo.
    sun = np.exp(-((x - 0.75) ** 2 + (y - 0.2) ** 2) / 0.006)
    image += sun[..., None] * np.array([0.6, 0.5, 0.1], np.float32)
    # Rolling hills with a textured field.
    horizon = 0.6 + 0.06 * np.sin(2 * np.pi * 1.5 * x) + 0.03 * np.sin(2 * np.pi * 4.0 * x + 1.0)
    ground = y > horizon
    texture = 0.05 * np.sin(2 * np.pi * 24 * x) * np.sin(2 * np.pi * 18 * y)
    field = np.stack([0.25 + 0.3 * (1 - y) + texture, 0.55 - 0.2 * y + texture, 0.2 + 0.1 * x], axis=-1)
    image[ground] = field[ground]
    # A house: wall and roof.
    wall = (x > 0.15) & (x < 0.4) & (y > 0.5) & (y < 0.75)
    image[wall] = np.array([0.8, 0.75, 0.6], np.float32) - 0.2 * (y[wall, None] - 0.5)
    roof = (y > 0.38) & (y <= 0.5) & (np.abs(x - 0.275) < (y - 0.38) * 1.3)
    image[roof] = np.array([0.6, 0.15, 0.1], np.float32)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def demo_mask(size: int = 256) -> np.ndarray:
    """A mask with a large rectangle and a few thick strokes, size x size uint8 in {0, 255}."""
    if size < 8:
        raise ValueError(f"demo mask size must be at least 8, got {size}")
    mask = PIL.Image.new("L", (size, size), 0)
    draw = PIL.ImageDraw.Draw(mask)
    s = size / 256
    draw.rectangle([int(150 * s), int(100 * s), int(215 * s), int(175 * s)], fill=255)
    width = max(2, int(14 * s))
    for points in (
        [(20, 30), (90, 60), (130, 40)],
        [(40, 220), (110, 150), (180, 230), (240, 200)],
        [(60, 110), (70, 180)],
    ):
        draw.line([(px * s, py * s) for px, py in points], fill=255, width=width, joint="curve")
    return np.asarray(mask).copy()


@dataclass
class VerifyReport:
    """What ``verify`` measured: fast path against the reference on the demo generator."""

    size: int
    n_blocks: int
    device: str
    backend: str
    output_max_abs_diff: float
    image_max_abs_diff: int
    image_values_differing: int
    image_values: int
    reference_seconds: float
    fast_seconds: float
    tolerance: float = FP32_TOLERANCE
    images: dict | None = None
    plan: str = ""

    @property
    def passed(self) -> bool:
        return self.output_max_abs_diff <= self.tolerance


def verify(size: int = 256, device=None, n_blocks: int | None = None, seed: int = 0) -> VerifyReport:
    """Run the reference demo generator and an optimized copy on the demo image, in fp32.

    Each is run once to warm up (Triton compiles its kernels on first use), then timed once.
    TF32 is switched off for the comparison and restored afterwards.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reference = demo_generator(seed=seed, n_blocks=n_blocks).to(device)
    fast = optimize(copy.deepcopy(reference))
    image, mask = demo_image(size), demo_mask(size)

    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        backend = str(ffc_kernels.backend_info(device))
        runs = {}
        for name, generator in (("reference", reference), ("fast", fast)):
            _inpaint(image, mask, generator)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result, prediction = _inpaint(image, mask, generator)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs[name] = (result, prediction.float(), time.perf_counter() - start)
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]

    (ref_image, ref_out, ref_time), (fast_image, fast_out, fast_time) = runs["reference"], runs["fast"]
    image_diff = np.abs(ref_image.astype(np.int16) - fast_image.astype(np.int16))
    return VerifyReport(
        size=size,
        n_blocks=sum(isinstance(m, FFCResnetBlock) for m in reference.modules()),
        device=str(device),
        backend=backend,
        output_max_abs_diff=float((fast_out - ref_out).abs().max()),
        image_max_abs_diff=int(image_diff.max()),
        image_values_differing=int((image_diff > 0).sum()),
        image_values=image_diff.size,
        reference_seconds=ref_time,
        fast_seconds=fast_time,
        images={"image": image, "mask": mask, "result": fast_image, "result_reference": ref_image},
        plan=_describe_plan(plan_info(fast)),
    )


def _describe_plan(info: dict) -> str:
    if info.get("runs") is None:
        return f"fused FFC modules only (whole-generator plan not used: {info.get('why_not')})"
    return f"whole-generator plan, precision {info['runs']}, spectral ops on {info['backend']}"
