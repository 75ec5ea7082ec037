"""LaMa's high-resolution refinement: optimise the features entering the residual blocks, coarse to fine.

It follows LaMa's ``saicinpainting/evaluation/refinement.py`` (``refine_predict``, after
Kulshreshtha et al., "Feature Refinement to Improve High Resolution Image Inpainting", 2022):

- one image, float in [0, 1]; the mask binarised as ``inpaint`` does. When H * W exceeds
  ``px_budget``, image and mask are resized bilinearly by sqrt(px_budget / (H * W)) per side
  (sides truncated to integers) and every mask value above 1e-8 set to 1;
- ``min(1 + round(max(0, log2(min(H, W) / min_side))), max_scales)`` scales; each coarser one is
  the finer one blurred (Gaussian 5x5, sigma 1, reflected border) and bilinearly halved, the mask
  the same, then set to 1 wherever it is at least 1e-8;
- coarsest first, each scale padded at the bottom and right to a multiple of ``pad_modulo`` by
  reflection (torch's ``reflect``: LaMa's refinement pads so, where its plain prediction repeats
  the edge pixel), the mask binarised again; the generator's front (every layer before the first
  residual block) runs once, without gradients, on ``(image * (1 - mask), mask)``, giving the
  local and global features z_l, z_g;
- at the coarsest scale the rear (residual blocks and decoder) runs once. At each finer scale
  z_l, z_g are optimised by Adam (``lr``) through the rear for ``n_iters`` iterations, on
  ``mean |pred - image|`` over the unmasked pixels (padding included, as LaMa's) plus
  ``mean |pyrdown(pred) - previous result|`` over the pixels where the mask, bilinearly halved
  (no blur), set to 1 where at least 1 - 1e-8 and eroded by a 15x15 elliptical structuring element
  (OpenCV's MORPH_ELLIPSE; outside the image counts as set), is 1. Every iteration but the last
  takes a step; the last one's prediction is kept;
- each scale's result is ``mask * pred + (1 - mask) * image``, cropped to the scale's size.

Where LaMa takes the mean of an empty set (a mask that covers every pixel, or one whose halved
and eroded version is empty), its loss reads NaN while the gradient of that term is zero; here
the term is left out, so the features and results are the same and the loss shown is finite.
The result is returned as ``inpaint``'s: uint8 HxWx3 at the input's size, unmasked pixels copied
from the input; where ``px_budget`` shrank the image, the refined result is resized back
bilinearly and pasted into the mask (LaMa returns the smaller image).

The generator is split as LaMa splits it: LaMa's module layout (``generator.model``, a
Sequential whose residual blocks are ``FFCResnetBlock``), or a generator from
``lama_fast.optimize``, whose plan runs the front in inference and the rear with its own
backward (see ``lama_fast.optimized``). In bf16 the features and Adam's state stay fp32; only
the rear's compute is bf16. ``devices=[...]`` splits the residual blocks over several devices
as LaMa does (the front and the first blocks on the first, the decoder on the last).
"""
from __future__ import annotations

import copy
import math
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tqdm

from ffc_kernels.ops.winograd import workspace
from lama_fast.optimized import _ResidualBlock, generator_plan, optimize, refold
from lama_fast.pipeline import _image_to_array, _mask_to_array, _placement

__all__ = ["refine", "pyrdown", "pyrdown_mask", "erode", "ellipse_kernel", "image_mask_pyramid", "n_scales"]

_EPS = 1e-8  # LaMa's threshold for binarising masks
_EROSION_SIZE = 15


# ------------------------------------------------------------------------------ pyramid and masks

def _gaussian_taps5() -> list[float]:
    """The 5-tap Gaussian of sigma 1 (kornia's ``gaussian_blur2d((5, 5), (1.0, 1.0))`` factors)."""
    k = [math.exp(-x * x / 2) for x in range(-2, 3)]
    return [v / sum(k) for v in k]


def gaussian_blur5(x: torch.Tensor) -> torch.Tensor:
    """Gaussian blur, 5x5, sigma 1, reflected border (torch's ``reflect``), of N x C x H x W."""
    k = _gaussian_taps5()
    h, w = x.shape[-2:]
    # Separable, as weighted sums of shifted views: a one-channel convolution would unfold 5 copies of x.
    y = F.pad(x, (2, 2, 2, 2), mode="reflect")
    y = sum(k[i] * y[:, :, :, i:i + w] for i in range(5))
    return sum(k[i] * y[:, :, i:i + h] for i in range(5))


def _halve(x: torch.Tensor, size=None) -> torch.Tensor:
    size = size or (x.shape[2] // 2, x.shape[3] // 2)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pyrdown(image: torch.Tensor, size=None) -> torch.Tensor:
    """LaMa's ``_pyrdown``: blur (5x5, sigma 1) then bilinear resize to ``size`` (default: halved, rounded down)."""
    return _halve(gaussian_blur5(image), size)


def pyrdown_mask(mask: torch.Tensor, size=None, *, blur: bool = True, round_up: bool = True) -> torch.Tensor:
    """LaMa's ``_pyrdown_mask``: (blur then) bilinear resize; then binarised: 1 where >= 1e-8
    (``round_up``) or where >= 1 - 1e-8 (otherwise), 0 elsewhere."""
    mask = _halve(gaussian_blur5(mask) if blur else mask, size)
    return (mask >= (_EPS if round_up else 1.0 - _EPS)).to(mask.dtype)


def ellipse_kernel(size: int = _EROSION_SIZE) -> torch.Tensor:
    """OpenCV's ``getStructuringElement(MORPH_ELLIPSE, (size, size))`` as a bool tensor.

    Row i spans the columns c - d .. c + d with r = c = size // 2, d = round(c * sqrt(1 - ((i - r) / r)^2)).
    """
    r = size // 2
    kernel = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        dy = i - r
        d = int(np.rint(r * math.sqrt(max(0.0, (r * r - dy * dy) / (r * r))))) if r else 0
        kernel[i, max(r - d, 0):min(r + d + 1, size)] = True
    return kernel


def erode(mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Binary erosion of a 0/1 mask N x 1 x H x W by a bool ``kernel`` (odd sides, centred), with
    kornia's default (geodesic) border: pixels outside the image do not erode. A pixel stays 1
    when every pixel under the kernel is 1: no 0 among them, counted by one convolution."""
    kh, kw = kernel.shape
    holes = F.conv2d(1 - mask, kernel.to(mask.dtype).view(1, 1, kh, kw), padding=(kh // 2, kw // 2))
    return (holes < 0.5).to(mask.dtype)


def n_scales(height: int, width: int, min_side: int, max_scales: int) -> int:
    """LaMa's scale count: min(1 + round(max(0, log2(min(H, W) / min_side))), max_scales)."""
    return min(1 + int(round(max(0.0, math.log2(min(height, width) / min_side)))), max_scales)


def budget_size(height: int, width: int, px_budget: int) -> tuple[int, int]:
    """The size LaMa refines at: the input's, or scaled by sqrt(px_budget / (H * W)) and truncated."""
    if height * width <= px_budget:
        return height, width
    ratio = math.sqrt(px_budget / float(height * width))
    return int(height * ratio), int(width * ratio)


def image_mask_pyramid(image, mask, *, min_side: int = 512, max_scales: int = 3, px_budget: int = 1_800_000):
    """(images, masks), coarsest first, from 1 x 3 x H x W and 1 x 1 x H x W float tensors (LaMa's
    ``_get_image_mask_pyramid``)."""
    h, w = image.shape[-2:]
    if (h, w) != budget_size(h, w, px_budget):
        size = budget_size(h, w, px_budget)
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
        mask = torch.where(mask > _EPS, torch.ones_like(mask), mask)
        h, w = size
    images, masks = [image], [mask]
    for _ in range(n_scales(h, w, min_side, max_scales) - 1):
        images.append(pyrdown(images[-1]))
        masks.append(pyrdown_mask(masks[-1]))
    return images[::-1], masks[::-1]


def _pad_reflect(x: torch.Tensor, modulo: int) -> torch.Tensor:
    pad_h, pad_w = -x.shape[2] % modulo, -x.shape[3] % modulo
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")


def _l1_loss(pred, pred_down, reference, mask, mask_down, image):
    """LaMa's ``_l1_loss``; a term over no pixel is left out (LaMa's reads NaN, with a zero gradient)."""
    known = mask < _EPS
    loss = pred.new_zeros(())
    if known.any():
        loss = loss + (pred[known] - image[known]).abs().mean()
    kept = mask_down >= _EPS
    if kept.any():
        loss = loss + (pred_down[kept] - reference[kept]).abs().mean()
    return loss


# ------------------------------------------------------------------------------ front and rear

class _Modules:
    """LaMa's split of a module generator: ``model[:first]`` and the rest, in parts over devices."""

    def __init__(self, generator: nn.Module, devices):
        model = getattr(generator, "model", None)
        if not isinstance(model, nn.Sequential):
            raise ValueError("refine needs LaMa's generator layout (a .model Sequential with residual blocks), "
                             f"or a generator from lama_fast.optimize; got {type(generator).__name__}")
        blocks = [i for i, m in enumerate(model) if type(m).__name__.removeprefix("Fast") in
                  ("FFCResnetBlock", "ResnetBlock")]
        if not blocks:
            raise ValueError("refine needs a generator with residual blocks (LaMa's FFCResnetBlock)")
        first, per = blocks[0], len(blocks) // len(devices)
        bounds = [first + per * k for k in range(len(devices))] + [len(model)]
        self.devices = devices
        self.front = _on(model[:first], devices[0])
        self.rears = [_on(model[bounds[k]:bounds[k + 1]], devices[k]) for k in range(len(devices))]

    def run_front(self, x):
        z = self.front(x)
        return list(z) if isinstance(z, tuple) else [z]

    def run_rear(self, z, k):
        out = self.rears[k](tuple(z) if len(z) > 1 else z[0])
        return list(out) if isinstance(out, tuple) else [out]


def _on(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` itself when it is on ``device`` already, else a copy there (the caller's stays)."""
    tensors = list(module.parameters()) + list(module.buffers())
    if all(t.device == device for t in tensors):
        return module
    return copy.deepcopy(module).to(device)


class _Planned:
    """An optimized generator's plan split the same way: ``steps[:first_block()]``, then the rest."""

    def __init__(self, generator: nn.Module, plan, devices):
        self.devices = devices
        plans, self.twins = {}, []  # copies of the generator on the other devices (their plans' owners)
        for device in dict.fromkeys(devices):
            if device == plan.device:
                plans[device] = plan
            else:
                twin = optimize(copy.deepcopy(generator).to(device), precision=generator._lama_fast.requested)
                self.twins.append(twin)
                plans[device] = generator_plan(twin)
        first, n_steps = plan.first_block(), len(plan.steps)
        n_blocks = sum(1 for step in plan.steps[first:] if isinstance(step, _ResidualBlock))
        per = n_blocks // len(devices)
        self.bounds = [0, first] + [first + per * k for k in range(1, len(devices))] + [n_steps]
        self.plans = [plans[device] for device in devices]
        # Only the rear computes in bf16: the features start from an fp32 front (the generator's own
        # modules up to the first residual block; it runs once per scale).
        self.front = None
        if plan.precision.dtype != torch.float32:
            self.front = _Modules(generator, devices[:1]).front

    def run_front(self, x):
        if self.front is not None:
            z = self.front(x)
            return list(z) if isinstance(z, tuple) else [z]
        plan = self.plans[0]
        state = plan.run_steps((x.to(plan.precision.dtype), None), 0, self.bounds[1])
        return [t.float() for t in state if t is not None]

    def run_rear(self, z, k):
        plan = self.plans[k]
        state = tuple(t.to(plan.precision.dtype).contiguous(memory_format=torch.channels_last) for t in z)
        if len(state) == 1:
            state = (state[0], None)
        state = plan.run_steps(state, self.bounds[k + 1], self.bounds[k + 2])
        if k == len(self.plans) - 1:
            return [plan.output(state)]
        return [t for t in state if t is not None]


def _stages(generator: nn.Module, devices):
    # A plan folded under torch.inference_mode (by an earlier inpaint) holds inference tensors,
    # which autograd cannot save: fold again, without autograd history.
    refold(generator)
    with torch.no_grad():
        plan = generator_plan(generator)
    if plan is not None:
        return _Planned(generator, plan, devices)
    return _Modules(generator, devices)


# ------------------------------------------------------------------------------ refinement

def _check_options(n_iters, lr, min_side, max_scales, px_budget, pad_modulo):
    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    for name, value in (("n_iters", n_iters), ("min_side", min_side), ("max_scales", max_scales),
                        ("px_budget", px_budget), ("pad_modulo", pad_modulo)):
        positive_int(name, value)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")


def _devices(generator, devices) -> list[torch.device]:
    if devices is None:
        return [_placement(generator, None)[0]]
    if isinstance(devices, (str, torch.device)):
        devices = [devices]
    devices = [torch.device(d) for d in devices]
    if not devices:
        raise ValueError("devices must name at least one device")
    # "cuda" is the current CUDA device, which tensors name with its index
    return [torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
            for d in devices]


def refine(image, mask, generator, *, n_iters: int = 15, lr: float = 0.002, min_side: int = 512,
           max_scales: int = 3, px_budget: int = 1_800_000, devices=None, pad_modulo: int = 8,
           progress: bool = True) -> np.ndarray:
    """Inpaint ``image`` where ``mask`` is set with LaMa's multi-scale feature refinement; HxWx3 uint8.

    Inputs as ``lama_fast.inpaint`` takes them. ``n_iters``, ``lr``, ``min_side``, ``max_scales``,
    ``px_budget``: LaMa's refiner settings (its defaults); ``devices``: None (the generator's
    device) or a list to split the residual blocks over, as LaMa's ``gpu_ids``; ``progress``: a
    progress bar on stderr over scales and iterations, with the loss. See the module docstring.
    """
    return _refine(image, mask, generator, n_iters=n_iters, lr=lr, min_side=min_side, max_scales=max_scales,
                   px_budget=px_budget, devices=devices, pad_modulo=pad_modulo, progress=progress)[0]


def _refine(image, mask, generator, *, n_iters=15, lr=0.002, min_side=512, max_scales=3, px_budget=1_800_000,
            devices=None, pad_modulo=8, progress=True):
    """``refine``, also returning a dict: ``sizes`` (each scale's H, W, coarsest first), ``losses``
    (per finer scale, the loss at each iteration) and ``seconds`` (each scale's wall time, its
    result back on the CPU)."""
    _check_options(n_iters, lr, min_side, max_scales, px_budget, pad_modulo)
    if not isinstance(generator, nn.Module):
        raise TypeError(f"generator must be a torch.nn.Module, got {type(generator).__name__}")
    if generator.training:
        raise ValueError("refine needs the generator in eval mode (its BatchNorm layers would use and update "
                         "batch statistics); call generator.eval() first")
    image_f, original = _image_to_array(image)
    mask_b = _mask_to_array(mask)
    if image_f.shape[:2] != mask_b.shape:
        raise ValueError(f"image and mask sizes differ: image is {image_f.shape[0]}x{image_f.shape[1]} (HxW), "
                         f"mask is {mask_b.shape[0]}x{mask_b.shape[1]} (HxW)")
    info = {"sizes": [], "losses": [], "seconds": []}
    if not mask_b.any():
        warnings.warn("the mask sets no pixel, so there is nothing to inpaint and the image is returned unchanged",
                      UserWarning, stacklevel=3)
        result = original.copy() if original is not None else np.clip(image_f * 255, 0, 255).astype(np.uint8)
        return result, info
    devices = _devices(generator, devices)
    height, width = mask_b.shape
    image_t = torch.from_numpy(np.ascontiguousarray(image_f.transpose(2, 0, 1)))[None]
    mask_t = torch.from_numpy(mask_b.astype(np.float32))[None, None]
    images, masks = image_mask_pyramid(image_t, mask_t, min_side=min_side, max_scales=max_scales,
                                       px_budget=px_budget)
    for im in images:
        if min(im.shape[-2:]) <= -min(im.shape[-2:]) % pad_modulo or min(im.shape[-2:]) < 2:
            raise ValueError(f"the image is too small to refine: its coarsest scale is {im.shape[2]}x{im.shape[3]} "
                             f"(HxW) and cannot be reflect-padded to a multiple of {pad_modulo}")
    stages = _stages(generator, devices)
    kernel = ellipse_kernel().to(devices[-1])
    total = 1 + (len(images) - 1) * n_iters
    bar = tqdm.tqdm(total=total, disable=not progress, leave=False, unit="it", dynamic_ncols=True)
    result = None
    try:
        # Winograd's temporaries (CPU fp32) are reused by every iteration, backward passes included
        with workspace():
            for index, (im, msk) in enumerate(zip(images, masks)):
                size = tuple(im.shape[-2:])
                info["sizes"].append(size)
                start = time.perf_counter()
                bar.set_description(f"refine scale {index + 1}/{len(images)} ({size[0]}x{size[1]})")
                im = _pad_reflect(im, pad_modulo)
                msk = (_pad_reflect(msk, pad_modulo) >= _EPS).float()
                result, losses = _infer(im, msk, stages, result, size, kernel, n_iters, lr, bar)
                result = result[:, :, :size[0], :size[1]]
                info["seconds"].append(time.perf_counter() - start)
                if losses:
                    info["losses"].append(losses)
    finally:
        bar.close()
    out = result
    if tuple(out.shape[-2:]) != (height, width):  # px_budget shrank it: back to the input's size, in the mask
        out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
        out = torch.where(mask_t.bool(), out, image_t)
    out = out[0].permute(1, 2, 0).numpy()
    if not np.isfinite(out).all():
        raise ValueError("the refined result contains NaN or inf")
    result_u8 = np.clip(out * 255, 0, 255).astype(np.uint8)
    if original is not None:
        keep = ~mask_b
        result_u8[keep] = original[keep]
    return result_u8, info


def _rear(stages, z):
    for k in range(len(stages.devices)):
        if k:
            z = [t.to(stages.devices[k]) for t in z]
        z = stages.run_rear(z, k)
    return z[0]


def _infer(image, mask, stages, reference, size, kernel, n_iters, lr, bar):
    """One scale (LaMa's ``_infer``): (mask * pred + (1 - mask) * image on the CPU, the losses)."""
    first, last = stages.devices[0], stages.devices[-1]
    x = torch.cat([image * (1 - mask), mask], dim=1).to(first)
    with torch.no_grad():
        z = stages.run_front(x)
    image, mask = image.to(last), mask.to(last)
    losses = []
    if reference is None:  # the coarsest scale: one prediction, no optimisation
        with torch.no_grad():
            pred = _rear(stages, z)
        bar.update(1)
    else:
        reference = reference.to(last)
        h, w = size
        mask_down = erode(pyrdown_mask(mask[:, :, :h, :w], blur=False, round_up=False), kernel)
        mask3, mask_down3 = mask.expand(-1, 3, -1, -1), mask_down.expand(-1, 3, -1, -1)
        z = [t.detach().clone().requires_grad_() for t in z]
        optimizer = torch.optim.Adam(z, lr=lr)
        for i in range(n_iters):
            final = i == n_iters - 1
            optimizer.zero_grad()
            with torch.set_grad_enabled(not final):  # the last prediction is kept, not stepped from
                pred = _rear(stages, z)
                pred_down = pyrdown(pred[:, :, :h, :w])
                loss = _l1_loss(pred, pred_down, reference, mask3, mask_down3, image)
            losses.append(loss.item())
            bar.set_postfix_str(f"loss {losses[-1]:.4f}")
            bar.update(1)
            if not final:
                loss.backward(inputs=z)
                optimizer.step()
    return (mask * pred + (1 - mask) * image).detach().float().cpu(), losses
