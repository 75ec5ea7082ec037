"""Tiles with halos for a chain of local layers (convolutions and transposed convolutions).

LaMa's full-resolution stages (the stem, the downsampling convolutions, the decoder's transposed
convolutions and the output convolution) are local: each output pixel reads a small window of
the layer's input. A chain of them can run one output tile at a time: walking the chain
backwards gives, per axis, the input range each tile needs (its halo) and which sides touch the
image border, where the layer's own padding (reflection or zeros) is applied to the tile. Every
layer then runs unpadded on its tile, so a tile's output equals the same region of the untiled
output (up to the summation order inside the convolutions), while no full-resolution
intermediate is ever whole in memory.

A ``Layer`` describes one step: its kernel extent, stride and padding along both axes (square
geometry), the padding mode (``"reflect"``, ``"zeros"``, or ``"transposed"`` for a transposed
convolution, whose ``pad`` crops its output), and ``run``: the step on a tile already padded as
needed, with no padding of its own. ``run`` may return a tuple (several outputs of one input).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Layer:
    extent: int            # (kernel - 1) * dilation + 1
    stride: int
    pad: int
    mode: str              # "reflect", "zeros" or "transposed"
    run: Callable
    output_padding: int = 0

    def out_size(self, n: int) -> int:
        if self.mode == "transposed":
            return (n - 1) * self.stride - 2 * self.pad + self.extent + self.output_padding
        return (n + 2 * self.pad - self.extent) // self.stride + 1


@dataclasses.dataclass
class _Span:
    """One layer's part of a tile along one axis: input [lo, hi), border padding before/after it,
    and (transposed) the crop of the unpadded output."""

    lo: int
    hi: int
    before: int = 0
    after: int = 0
    crop: int = 0


def check(layers: list[Layer], size: int) -> str | None:
    """Why the chain cannot be tiled for an input of ``size`` pixels along an axis, or None."""
    n = size
    for layer in layers:
        if layer.mode == "transposed":
            # Every output must be reached by some input: no output_padding beyond the kernel.
            if layer.extent < layer.stride or (n - 1) * layer.stride + layer.extent - 1 - layer.pad < layer.out_size(n) - 1:
                return "a transposed convolution whose output padding no input reaches"
        elif layer.mode == "reflect" and layer.pad >= n:
            return f"reflection padding {layer.pad} on a plane of {n}"
        n = layer.out_size(n)
        if n < 1:
            return "an empty output"
    return None


def spans(layers: list[Layer], size: int, o0: int, o1: int) -> list[_Span]:
    """Per layer (first to last), the input span that output range [o0, o1) of the last one needs."""
    sizes = [size]
    for layer in layers:
        sizes.append(layer.out_size(sizes[-1]))
    out = []
    for layer, n_in in zip(reversed(layers), reversed(sizes[:-1])):
        s, p, e = layer.stride, layer.pad, layer.extent
        if layer.mode == "transposed":
            lo = max(0, math.ceil((o0 + p - e + 1) / s))
            hi = min(n_in, (o1 - 1 + p) // s + 1)
            span = _Span(lo, hi, crop=o0 - (lo * s - p))
        else:
            lo, hi = o0 * s - p, (o1 - 1) * s - p + e
            span = _Span(max(lo, 0), min(hi, n_in), before=max(0, -lo), after=max(0, hi - n_in))
        out.append(span)
        o0, o1 = span.lo, span.hi
    return out[::-1]


def run_tile(layers: list[Layer], x: torch.Tensor, rows: list[_Span], cols: list[_Span], out_rows: int,
             out_cols: int):
    """The chain on one tile of ``x`` (N, C, H, W): the input spans of the first layer, then each
    layer on the previous one's output. Returns the last layer's output (a tensor or a tuple)."""
    t = x[:, :, rows[0].lo:rows[0].hi, cols[0].lo:cols[0].hi]
    for i, (layer, r, c) in enumerate(zip(layers, rows, cols)):
        if isinstance(t, tuple):  # several outputs (None where absent) feed the next layer as one
            parts = [u for u in t if u is not None]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if layer.mode == "transposed":
            t = layer.run(t)
            h, w = (rows[i + 1].hi - rows[i + 1].lo, cols[i + 1].hi - cols[i + 1].lo) if i + 1 < len(layers) \
                else (out_rows, out_cols)
            t = _crop(t, r.crop, h, c.crop, w)
            continue
        pads = (c.before, c.after, r.before, r.after)
        if any(pads):
            t = F.pad(t, pads, mode="reflect" if layer.mode == "reflect" else "constant")
        t = layer.run(t)
    return t


def _crop(t, top, h, left, w):
    if isinstance(t, tuple):
        return tuple(_crop(u, top, h, left, w) for u in t)
    return t[:, :, top:top + h, left:left + w]


def tiles(size: int, tile: int):
    """[start, stop) ranges of at most ``tile`` covering [0, size)."""
    tile = max(1, tile)
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


def run_chain(layers: list[Layer], x: torch.Tensor, tile: int, write: Callable) -> None:
    """Run ``layers`` on ``x`` tile by tile; ``write(output, rows, cols)`` receives each output tile
    (a tensor or a tuple) and the ranges of the last layer's output it covers."""
    h, w = x.shape[-2:]
    out_h, out_w = h, w
    for layer in layers:
        out_h, out_w = layer.out_size(out_h), layer.out_size(out_w)
    for r0, r1 in tiles(out_h, tile):
        row_spans = spans(layers, h, r0, r1)
        for c0, c1 in tiles(out_w, tile):
            col_spans = spans(layers, w, c0, c1)
            write(run_tile(layers, x, row_spans, col_spans, r1 - r0, c1 - c0), (r0, r1), (c0, c1))
