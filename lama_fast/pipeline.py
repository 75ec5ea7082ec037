"""LaMa's inference convention around any generator: convert, binarise, pad, run, composite.

It follows LaMa's ``bin/predict.py`` and ``DefaultInpaintingTrainingModule.forward``:

- the image is RGB float32 in [0, 1] (8-bit input is divided by 255);
- the mask is binarised: ``> 127`` for uint8 masks (8-bit files), ``> 0`` for everything else
  (LaMa's predict.py thresholds 8-bit masks at ``> 0``, so it also inpaints faint anti-aliased
  edges; pass ``mask > 0`` to get exactly that). A colour mask is set where any colour channel
  passes the threshold (a red stroke on black is a mask; as grey it would be 76, under 127); an
  alpha channel is not a colour and is ignored. A mask that sets no pixel inpaints nothing: a
  ``UserWarning`` says so and the image comes back unchanged, without running the generator;
- image and mask are padded at the bottom and right to a multiple of ``pad_modulo`` with numpy's
  ``symmetric`` mode, which repeats the edge pixel (torch's ``reflect`` would not);
- the generator sees ``cat([image * (1 - mask), mask], dim=1)``: RGB first, mask last, NCHW;
- the result is ``mask * prediction + (1 - mask) * image``, cropped back and converted with
  ``clip(x * 255, 0, 255).astype(uint8)``. For uint8 input the unmasked pixels are copied from the
  input, so they come back bit-identical whatever the generator returns (0 * NaN is NaN).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import warnings

import numpy as np
import PIL.Image
import torch

from ffc_kernels.reference import GENERATOR_CONFIGS
from lama_fast.memory import available_memory, choose_tile_size
from lama_fast.optimized import optimize

__all__ = ["inpaint", "pad_to_modulo"]

# PIL modes whose samples do not fit 8 bits: ``convert("RGB")`` / ``convert("L")`` would clip them.
_WIDE_PIL_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Mask channel counts: grey, RGB, RGBA.
_MASK_CHANNELS = (1, 3, 4)


def pad_to_modulo(array: np.ndarray, modulo: int) -> np.ndarray:
    """Pad the first two axes (H, W) at the bottom and right to multiples of ``modulo``, as LaMa does.

    Uses numpy's ``symmetric`` mode: the padding mirrors the array including its edge row/column.
    Returns the input itself when nothing needs padding.
    """
    pad_h = -array.shape[0] % modulo
    pad_w = -array.shape[1] % modulo
    if pad_h == 0 and pad_w == 0:
        return array
    return np.pad(array, [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2), mode="symmetric")


def inpaint(image, mask, generator, *, device=None, pad_modulo: int = 8, tile_size="auto", refine: bool = False,
            **refine_options) -> np.ndarray:
    """Inpaint ``image`` where ``mask`` is set, with a LaMa ``generator``; returns HxWx3 uint8 RGB.

    ``image``: numpy HxWx3 (uint8, or float in [0, 1]), a PIL image (converted to RGB), or a torch
    tensor 3xHxW / 1x3xHxW (uint8, or float in [0, 1]).
    ``mask``: numpy HxW / HxWx1 / HxWx3 / HxWx4, a PIL image of any 8-bit mode, or a torch tensor
    HxW / CxHxW / 1xCxHxW with C = 1, 3 or 4. uint8 masks are set where ``> 127``; bool, float and
    other integer masks where ``> 0``. With colour channels a pixel is set where any of R, G, B is;
    a fourth (alpha) channel is ignored. A mask that sets no pixel gives a ``UserWarning`` and the
    image unchanged (as uint8), without calling the generator.
    ``device``: where the generator input is placed; by default the device of the generator's
    parameters (CPU for a generator without any).
    ``tile_size`` (generators from ``lama_fast.optimize``): ``"auto"`` (default) runs the
    full-resolution stages in tiles when ``lama_fast.estimate_memory`` says the whole forward
    would not fit in the device's free memory, with the largest tile that fits, and raises
    ``MemoryError`` before running when nothing fits; an integer tiles with that size; None never
    tiles. Other generators run as they are.
    ``refine=True``: LaMa's multi-scale feature refinement for large images instead of one forward
    (``lama_fast.refine``, whose options ``n_iters``, ``lr``, ``min_side``, ``max_scales``,
    ``px_budget``, ``devices`` and ``progress`` are passed on); ``device`` then names the one
    device it runs on unless ``devices`` is given, and ``tile_size`` does not apply.
    """
    if refine:
        from lama_fast.refinement import refine as refine_

        if device is not None:
            refine_options.setdefault("devices", [device])
        return refine_(image, mask, generator, pad_modulo=pad_modulo, **refine_options)
    if refine_options:
        raise TypeError(f"inpaint got refinement options without refine=True: {', '.join(sorted(refine_options))}")
    result, _ = _inpaint(image, mask, generator, device=device, pad_modulo=pad_modulo, tile_size=tile_size)
    return result


def _inpaint(image, mask, generator, *, device=None, pad_modulo: int = 8,
             tile_size="auto") -> tuple[np.ndarray, torch.Tensor | None]:
    """``inpaint``, also returning the raw (padded) generator output for comparisons (None when the
    mask sets no pixel and the generator is not run)."""
    _check_generator(generator)
    prepared = prepare(image, mask, pad_modulo)
    _warn_if_training(generator)
    if prepared.empty:
        warnings.warn(EMPTY_MASK, UserWarning, stacklevel=3)
        return prepared.unchanged(), None
    device, dtype = _placement(generator, device)
    image_t, mask_t = prepared.tensors(device, dtype)
    with torch.inference_mode(), _tiles(generator, image_t.shape[-2:], device, tile_size):
        prediction, inpainted = forward_and_composite(generator, image_t, mask_t)
    return prepared.finish(inpainted[0]), prediction


EMPTY_MASK = ("the mask sets no pixel, so there is nothing to inpaint and the image is returned unchanged "
              "(8-bit masks are set where a channel is > 127, other masks where it is > 0)")


@dataclasses.dataclass
class Prepared:
    """One image and mask, converted, binarised and padded as LaMa does: everything before the
    generator, done on the CPU (a ``DataLoader`` worker does it for ``inpaint_many``)."""

    image: np.ndarray  # float32 3 x Hp x Wp in [0, 1], padded
    mask: np.ndarray  # float32 Hp x Wp, 0 or 1, padded
    selected: np.ndarray  # bool H x W, the binarised mask before padding
    original: np.ndarray | None  # the uint8 H x W x 3 input, or None for float input

    @property
    def empty(self) -> bool:
        return not self.selected.any()

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.mask.shape

    def unchanged(self) -> np.ndarray:
        """The result when the mask sets no pixel: the input as uint8."""
        if self.original is not None:
            return self.original.copy()
        height, width = self.selected.shape
        return np.clip(self.image[:, :height, :width].transpose(1, 2, 0) * 255, 0, 255).astype(np.uint8)

    def tensors(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(1x3xHpxWp image, 1x1xHpxWp mask) on ``device`` in ``dtype``."""
        image_t = torch.from_numpy(self.image)[None].to(device=device, dtype=dtype)
        mask_t = torch.from_numpy(self.mask)[None, None].to(device=device, dtype=dtype)
        return image_t, mask_t

    def finish(self, inpainted: torch.Tensor) -> np.ndarray:
        """The composited 3xHpxWp output -> uint8 HxWx3, unmasked pixels copied from uint8 input."""
        height, width = self.selected.shape
        array = inpainted[:, :height, :width].permute(1, 2, 0).float().cpu().numpy()
        result = np.clip(array * 255, 0, 255).astype(np.uint8)
        if self.original is not None:
            keep = ~self.selected
            result[keep] = self.original[keep]
        return result


def prepare(image, mask, pad_modulo: int = 8) -> Prepared:
    """Check, convert, binarise and pad one image and mask (see ``inpaint`` for what is accepted)."""
    if isinstance(pad_modulo, bool) or not isinstance(pad_modulo, int) or pad_modulo < 1:
        raise ValueError(f"pad_modulo must be a positive integer, got {pad_modulo!r}")
    image_f, original = _image_to_array(image)
    mask_b = _mask_to_array(mask)
    if image_f.shape[:2] != mask_b.shape:
        raise ValueError(
            f"image and mask sizes differ: image is {_hxw(image_f.shape)} (HxW), "
            f"mask is {_hxw(mask_b.shape)} (HxW)"
        )
    padded_image = np.ascontiguousarray(pad_to_modulo(image_f, pad_modulo).transpose(2, 0, 1))
    padded_mask = np.ascontiguousarray(pad_to_modulo(mask_b, pad_modulo).astype(np.float32))
    return Prepared(padded_image, padded_mask, mask_b, original)


def forward_and_composite(generator, image_t: torch.Tensor, mask_t: torch.Tensor):
    """(prediction, mask * prediction + (1 - mask) * image) for a batch of padded NCHW inputs."""
    prediction = generator(torch.cat([image_t * (1 - mask_t), mask_t], dim=1))
    if not torch.is_tensor(prediction) or prediction.shape != image_t.shape:
        got = tuple(prediction.shape) if torch.is_tensor(prediction) else type(prediction).__name__
        raise ValueError(f"the generator returned {got}; expected a tensor of shape {tuple(image_t.shape)}")
    if not torch.isfinite(prediction).all():
        raise ValueError("the generator output contains NaN or inf")
    return prediction, mask_t * prediction + (1 - mask_t) * image_t


def _check_generator(generator) -> None:
    if not callable(generator):
        raise TypeError(f"generator must be a torch.nn.Module (or callable), got {type(generator).__name__}")


def _warn_if_training(generator) -> None:
    if getattr(generator, "training", False):
        warnings.warn(
            "the generator is in training mode, so its BatchNorm layers use batch statistics; "
            "call generator.eval() first",
            stacklevel=4,
        )


@contextlib.contextmanager
def _tiles(generator, size, device, tile_size, batch: int = 1):
    """The optimized generator's tile size for a forward of ``batch`` images of ``size`` (see
    ``inpaint``), restored afterwards."""
    state = getattr(generator, "_lama_fast", None)
    if tile_size != "auto" and tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int)):
        raise ValueError(f"tile_size must be 'auto', None or an integer, got {tile_size!r}")
    if state is None or not hasattr(state, "tile_size"):
        yield
        return
    saved = state.tile_size
    if tile_size == "auto":
        if saved is None:
            budget = available_memory(device)
            if budget is not None:
                blocks = sum(1 for m in generator.modules() if type(m).__name__.endswith("FFCResnetBlock"))
                name = next((n for n, c in GENERATOR_CONFIGS.items() if c["n_blocks"] == blocks), "big-lama")
                chosen = choose_tile_size(int(size[0]), int(size[1]), budget, generator=name, batch=batch,
                                          precision=state.requested, device=device)
                if chosen is not None:
                    optimize(generator, precision=state.requested, cuda_graphs=state.cuda_graphs, tile_size=chosen)
    else:
        optimize(generator, precision=state.requested, cuda_graphs=state.cuda_graphs, tile_size=tile_size)
    try:
        yield
    finally:
        if state.tile_size != saved:
            optimize(generator, precision=state.requested, cuda_graphs=state.cuda_graphs, tile_size=saved)


def _placement(generator, device) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the generator input should have."""
    tensors = itertools.chain(
        getattr(generator, "parameters", tuple)(), getattr(generator, "buffers", tuple)()
    )
    first = next((t for t in tensors if t.is_floating_point()), None)
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    return torch.device(device), dtype


def _describe_type(value) -> str:
    if isinstance(value, (str, os.PathLike)):
        return f"{type(value).__name__} {str(value)!r} (a path? open it with PIL.Image.open first)"
    return type(value).__name__


def _hxw(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def _image_to_array(image) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 HxWx3 in [0, 1], the uint8 HxWx3 original or None for float input)."""
    if isinstance(image, PIL.Image.Image):
        if image.mode in _WIDE_PIL_MODES:
            raise ValueError(
                f"PIL image mode {image.mode!r} (16/32-bit samples) is not supported; convert it to 8-bit RGB first"
            )
        array = np.asarray(image.convert("RGB"))
    elif torch.is_tensor(image):
        tensor = image.detach()
        if tensor.ndim == 4:
            if tensor.shape[0] != 1:
                raise ValueError(f"image tensor holds a batch of {tensor.shape[0]}; inpaint takes one image (1x3xHxW)")
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            hint = " (channels last? use .permute(2, 0, 1))" if tensor.ndim == 3 and tensor.shape[-1] == 3 else ""
            raise ValueError(f"image tensor must be 3xHxW or 1x3xHxW, got shape {tuple(image.shape)}{hint}")
        if tensor.is_floating_point():
            tensor = tensor.float()
        elif tensor.dtype != torch.uint8:
            raise TypeError(f"image tensor must be uint8 or floating point in [0, 1], got {tensor.dtype}")
        array = tensor.cpu().permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"image must be a numpy array, a PIL image or a torch tensor, got {_describe_type(image)}")

    if array.ndim == 2:
        raise ValueError(f"image is {_hxw(array.shape)} with no channel axis (grayscale?); expected HxWx3 RGB")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {array.shape}"
                         + (" (RGBA? drop the alpha channel)" if array.ndim == 3 and array.shape[2] == 4 else ""))
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image is empty ({_hxw(array.shape)})")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255, array
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"image must be uint8 or floating point in [0, 1], got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or inf")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"float image values must lie in [0, 1], got [{low:g}, {high:g}]; "
            "divide 0-255 data by 255, or pass it as uint8"
        )
    return array.astype(np.float32), None


def _mask_to_array(mask) -> np.ndarray:
    """The mask as a bool HxW array (True = inpaint)."""
    if isinstance(mask, PIL.Image.Image):
        if mask.mode in _WIDE_PIL_MODES:
            raise ValueError(
                f"PIL mask mode {mask.mode!r} (16/32-bit samples) is not supported; convert it to 8-bit 'L' first"
            )
        # Grey stays one channel; every other mode (RGB, RGBA, P, CMYK, ...) is read as its RGB
        # colours, which also drops alpha, so the channels are tested one by one below.
        array = np.asarray(mask.convert("L" if mask.mode in ("1", "L") else "RGB"))
    elif torch.is_tensor(mask):
        tensor = mask.detach()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim == 3 and tensor.shape[0] in _MASK_CHANNELS:
            tensor = tensor.permute(1, 2, 0)
        elif tensor.ndim != 2:
            channels_last = tensor.ndim == 3 and tensor.shape[-1] in _MASK_CHANNELS
            hint = " (channels last? use .permute(2, 0, 1))" if channels_last else ""
            raise ValueError(
                f"mask tensor must be HxW, CxHxW or 1xCxHxW with C = 1, 3 or 4, got shape {tuple(mask.shape)}{hint}"
            )
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        array = tensor.cpu().numpy()
    elif isinstance(mask, np.ndarray):
        array = mask
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in _MASK_CHANNELS):
            raise ValueError(f"mask must be HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), got shape {array.shape}")
    else:
        raise TypeError(f"mask must be a numpy array, a PIL image or a torch tensor, got {_describe_type(mask)}")

    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"mask is empty ({_hxw(array.shape)})")
    if array.ndim == 3:
        array = array[:, :, :3]  # a fourth channel is alpha, not a colour
    if array.dtype == np.uint8:
        selected = array > 127
    elif array.dtype == np.bool_:
        selected = array.copy()
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("mask contains NaN or inf")
        selected = array > 0
    elif np.issubdtype(array.dtype, np.integer):
        selected = array > 0
    else:
        raise TypeError(f"mask must be bool, integer or floating point, got dtype {array.dtype}")
    return selected.any(axis=2) if selected.ndim == 3 else selected
