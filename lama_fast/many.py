"""Many images through one generator at throughput: ``inpaint_many``.

The device should never wait for the CPU. A torch ``DataLoader``'s worker processes read, decode,
convert, binarise and pad each pair (``pipeline.prepare``, the same code ``inpaint`` runs) while the
generator works on the previous batch; images whose padded sizes agree are batched together
(bucketed by the size read from the file header, before anything is decoded); each batch's results
are yielded as soon as its forward completes, so a consumer that encodes and writes them in a thread
(``lama_fast.folder`` does) overlaps that with the next forward. On CUDA the loader's batches sit in
pinned memory and are copied without blocking.

Every result equals ``inpaint`` of its pair with the same generator:
- on the CPU bit for bit: there a batch's images go through the generator one at a time, because
  oneDNN's convolutions and GEMMs round differently at different batch sizes (batched and
  one-by-one big-lama outputs differ by ~1e-5 in fp32), and the CPU gains nothing from a batch:
  the forward already keeps every core busy;
- on CUDA the batch is one forward, equal to one-by-one within the precision's tolerance.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.utils.data

from lama_fast import pipeline

__all__ = ["InpaintResult", "InputError", "MIN_SIDE", "inpaint_many", "read_image"]

# LaMa downsamples 8x and reflect-pads by 1 there, so the padded input needs 16 pixels a side.
MIN_SIDE = 9
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class InputError(ValueError):
    """An image or mask that cannot be inpainted; the message names the file."""


@dataclasses.dataclass
class InpaintResult:
    """What ``inpaint_many`` yields for one pair.

    ``output`` is the uint8 HxWx3 result (None when ``error`` says why there is none);
    ``seconds`` is the pair's reading and preparing time plus its share of its batch's forward;
    ``warnings`` are the per-image conditions ``inpaint`` would warn about (a mask that sets no
    pixel), as messages: ``inpaint_many`` does not raise Python warnings for them.
    """

    index: int
    image: Any
    mask: Any
    output: np.ndarray | None
    error: str | None = None
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


def read_image(path) -> PIL.Image.Image:
    """A file as a PIL image, turned upright by its EXIF orientation (as OpenCV's imread does in LaMa)."""
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            return PIL.ImageOps.exif_transpose(opened)
    except PIL.UnidentifiedImageError:
        raise InputError(f"cannot read {path}: not an image file, or a format Pillow cannot read") from None
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: no such file") from None
    except OSError as error:
        raise InputError(f"cannot read {path}: {' '.join(str(error).split())}") from None


def inpaint_many(pairs: Iterable[tuple[Any, Any]], generator, *, batch_size: int = 1, device=None,
                 num_workers: int | None = None, pad_modulo: int = 8, tile_size="auto") -> Iterator[InpaintResult]:
    """Inpaint every ``(image, mask)`` pair, yielding an ``InpaintResult`` per pair as batches complete.

    A pair's image and mask are anything ``inpaint`` takes, or paths of image files (read with EXIF
    orientation applied, as the CLI does). Results come in batch order, not input order: each says
    its ``index`` in ``pairs``. A pair that cannot be read or prepared, or whose forward fails (out
    of memory, say), yields a result with ``error`` set and the others go on.

    ``batch_size``: images of the same padded size run together (see the module's notes on the CPU).
    ``num_workers``: DataLoader worker processes that read and prepare pairs; default 4 (at most
    the CPU count) on CUDA, 1 on a CPU with two or more cores (the forward uses the rest), 0 (in
    this process) otherwise. ``device``, ``pad_modulo``, ``tile_size``: as for ``inpaint``; with
    ``"auto"`` the memory estimate counts the whole batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ValueError(f"num_workers must be a non-negative integer or None, got {num_workers!r}")
    if isinstance(pad_modulo, bool) or not isinstance(pad_modulo, int) or pad_modulo < 1:
        raise ValueError(f"pad_modulo must be a positive integer, got {pad_modulo!r}")
    pipeline._check_generator(generator)
    pairs = list(pairs)
    if not pairs:
        return
    device, dtype = pipeline._placement(generator, device)
    pipeline._warn_if_training(generator)
    if num_workers is None:
        cpus = os.cpu_count() or 1
        num_workers = min(4, cpus) if device.type == "cuda" else (1 if cpus >= 2 else 0)
    num_workers = min(num_workers, len(pairs))
    loader = torch.utils.data.DataLoader(
        _Pairs(pairs, pad_modulo), batch_sampler=_bucketed(pairs, batch_size, pad_modulo),
        collate_fn=_collate, num_workers=num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        yield from _run_batch(batch, pairs, generator, device, dtype, tile_size)


@dataclasses.dataclass
class _Item:
    index: int
    prepared: pipeline.Prepared | None
    error: str | None
    seconds: float


class _Pairs(torch.utils.data.Dataset):
    """Reads and prepares pair ``i``; failures come back as an error message, not an exception,
    so one bad file does not stop the loader."""

    def __init__(self, pairs, pad_modulo: int):
        self.pairs = pairs
        self.pad_modulo = pad_modulo

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> _Item:
        start = time.perf_counter()
        image, mask = self.pairs[index]
        try:
            prepared = _prepare(image, mask, self.pad_modulo)
        except (ValueError, TypeError, OSError) as error:
            return _Item(index, None, _message(error, image), time.perf_counter() - start)
        return _Item(index, prepared, None, time.perf_counter() - start)


def _prepare(image, mask, pad_modulo: int) -> pipeline.Prepared:
    name = image
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(mask, (str, os.PathLike)):
        mask = read_image(mask)
    prepared = pipeline.prepare(image, mask, pad_modulo)
    height, width = prepared.selected.shape
    if min(height, width) < MIN_SIDE:
        raise InputError(f"{_name(name)} is {height}x{width} (HxW); LaMa needs at least {MIN_SIDE} pixels a side")
    return prepared


def _name(image) -> str:
    return Path(image).name if isinstance(image, (str, os.PathLike)) else "image"


def _message(error: Exception, image) -> str:
    """One line that names the file: InputErrors already do, the others (Pillow, numpy) do not."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, InputError) or not isinstance(image, (str, os.PathLike)):
        return text
    return f"{_name(image)}: {text}"


def _padded_size(image, pad_modulo: int) -> tuple[int, int] | None:
    """The padded (H, W) of an image, from its header for a file; None when it cannot be told
    (the loader reports the error when it reads the file)."""
    try:
        if isinstance(image, (str, os.PathLike)):
            with PIL.Image.open(image) as opened:
                width, height = opened.size
                if opened.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                    width, height = height, width
        elif isinstance(image, PIL.Image.Image):
            width, height = image.size
        elif isinstance(image, np.ndarray):
            height, width = image.shape[:2]
        elif torch.is_tensor(image):
            height, width = image.shape[-2:]
        else:
            return None
    except Exception:  # noqa: BLE001 - any failure here is reported by the loader, which reads the file
        return None
    return -(-int(height) // pad_modulo) * pad_modulo, -(-int(width) // pad_modulo) * pad_modulo


def _bucketed(pairs, batch_size: int, pad_modulo: int) -> list[list[int]]:
    """Batches of indices whose images share a padded size, in order of their first index; a
    bucket is closed as soon as it holds ``batch_size`` images, so early results come early."""
    batches, open_buckets = [], {}
    for index, (image, _) in enumerate(pairs):
        key = _padded_size(image, pad_modulo)
        if key is None or batch_size == 1:
            batches.append([index])
            continue
        bucket = open_buckets.setdefault(key, [])
        if not bucket:
            batches.append(bucket)
        bucket.append(index)
        if len(bucket) == batch_size:
            del open_buckets[key]
    return batches


@dataclasses.dataclass
class _Group:
    positions: list  # the items (positions in the batch) stacked in image and mask
    image: torch.Tensor  # N x 3 x Hp x Wp float32
    mask: torch.Tensor  # N x 1 x Hp x Wp float32

    def pin_memory(self):
        return _Group(self.positions, self.image.pin_memory(), self.mask.pin_memory())


def _collate(items: list[_Item]) -> tuple[list[_Item], list[_Group]]:
    """Stack the prepared, non-empty items by padded size (one group when the header sizes held),
    moving their padded arrays into the tensors so they cross from the worker once."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for position, item in enumerate(items):
        if item.prepared is not None and not item.prepared.empty:
            by_size.setdefault(item.prepared.padded_size, []).append(position)
    groups = []
    for positions in by_size.values():
        prepared = [items[p].prepared for p in positions]
        image = torch.from_numpy(np.stack([p.image for p in prepared]))
        mask = torch.from_numpy(np.stack([p.mask for p in prepared]))[:, None]
        for p in positions:
            items[p].prepared = dataclasses.replace(items[p].prepared, image=None, mask=None)
        groups.append(_Group(positions, image, mask))
    return items, groups


def _run_batch(batch, pairs, generator, device, dtype, tile_size) -> Iterator[InpaintResult]:
    items, groups = batch
    results: dict[int, InpaintResult] = {}
    for position, item in enumerate(items):
        image, mask = pairs[item.index]
        if item.error is not None:
            results[position] = InpaintResult(item.index, image, mask, None, item.error, item.seconds)
        elif item.prepared.empty:
            results[position] = InpaintResult(item.index, image, mask, item.prepared.unchanged(), None,
                                              item.seconds, (pipeline.EMPTY_MASK,))
    for group in groups:
        start = time.perf_counter()
        try:
            outputs = _forward(generator, group, [items[p].prepared for p in group.positions], device, dtype,
                               tile_size)
            failure = None
        except (RuntimeError, ValueError, MemoryError) as exc:  # out of memory, a generator failing
            outputs, failure = [None] * len(group.positions), exc
        share = (time.perf_counter() - start) / len(group.positions)
        for position, output in zip(group.positions, outputs):
            item = items[position]
            image, mask = pairs[item.index]
            message = None if failure is None else _message(failure, image)
            results[position] = InpaintResult(item.index, image, mask, output, message, item.seconds + share)
    for position in sorted(results):
        yield results[position]


def _forward(generator, group: _Group, prepared: list[pipeline.Prepared], device, dtype, tile_size):
    image_t = group.image.to(device=device, dtype=dtype, non_blocking=True)
    mask_t = group.mask.to(device=device, dtype=dtype, non_blocking=True)
    batched = device.type == "cuda"
    with torch.inference_mode(), \
            pipeline._tiles(generator, image_t.shape[-2:], device, tile_size, batch=len(prepared) if batched else 1):
        if batched:
            _, inpainted = pipeline.forward_and_composite(generator, image_t, mask_t)
        else:
            inpainted = torch.cat([pipeline.forward_and_composite(generator, image_t[i:i + 1], mask_t[i:i + 1])[1]
                                   for i in range(len(prepared))])
        return [p.finish(inpainted[i]) for i, p in enumerate(prepared)]
