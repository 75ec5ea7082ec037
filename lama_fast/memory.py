"""How much memory an optimized LaMa forward needs, and the tile size that fits it in what is free.

``estimate_memory`` counts, stage by stage, the tensors the optimized plan (``lama_fast.optimize``)
holds at once, plus the weights it folds: the bytes a forward needs on top of the loaded
generator and its input. It mirrors the plan:

- full resolution, untiled: each stage holds its input and its output (the stem's 64 channels at
  H x W, the decoder's last 64 channels and the output convolution's 2x2-block copy of them are
  the largest); the fp32 output (3 channels);
- tiled (``tile_size``): those stages hold one tile and its halo at a time, so what stays is the
  input cast to the compute dtype, the fp32 output and the 1/8-resolution blocks;
- the residual blocks at 1/8 resolution: the block's input, its FFC outputs, the
  SpectralTransform's fp32 FFT buffers and, in fp32 on the CPU, the Winograd transforms;
- what a first forward adds whatever the size (library code, primitive caches, FFT plans);
- the folded weights: the blocks' 3x3 weights (4x as Winograd transforms in fp32 on the CPU),
  the spectral weights (a float64 master and a working copy) and the rest.

On the CPU the measure is the growth of the process's peak resident memory over a forward
(``ru_maxrss``), on CUDA ``torch.cuda.max_memory_allocated``; ``choose_tile_size`` picks the
largest tile whose estimate fits in a budget.
"""
from __future__ import annotations

import math
import os

import torch

from ffc_kernels.reference import GENERATOR_CONFIGS

__all__ = ["estimate_memory", "choose_tile_size", "available_memory", "TILE_SIZES"]

TILE_SIZES = (2048, 1024, 512, 256)  # tried largest first by choose_tile_size
_MODULO = 8  # inpaint pads images to multiples of 8
_HIDDEN = 0.5  # the SpectralTransform's hidden channels: half its output channels
# What a first forward adds whatever the image size: on the CPU the library code it pages in,
# oneDNN's primitive cache and scratchpads, the FFT plans (measured 240-260 MiB over 1024² to
# 4096² on a 2-core EPYC; below about 1024² it adds less, so the estimate is high there, by up
# to 50% at 768²); on CUDA cuDNN's and cuBLAS's workspaces.
_CPU_OVERHEAD = 256 * 2**20
_CUDA_OVERHEAD = 128 * 2**20


def _geometry(generator: str):
    if generator not in GENERATOR_CONFIGS:
        raise ValueError(f"unknown generator {generator!r}; known: {', '.join(sorted(GENERATOR_CONFIGS))}")
    cfg = GENERATOR_CONFIGS[generator]
    ngf, downs, blocks = cfg["ngf"], cfg["n_downsampling"], cfg["n_blocks"]
    max_features = cfg.get("max_features", 1024)
    channels = [min(max_features, ngf * 2 ** i) for i in range(downs + 1)]
    ratio = cfg["resnet_conv_kwargs"]["ratio_gout"]
    return cfg, channels, blocks, ratio


def _weight_bytes(channels, blocks, ratio, cfg, b: int, winograd: bool, cuda: bool) -> float:
    c = channels[-1]
    cg = int(c * ratio)
    cl = c - cg
    hidden = int(cg * _HIDDEN)
    # Per FFC (two per block): [l2l | g2l] (cl x c) and l2g (cg x cl), 3x3.
    local = 9 * (cl * c + cg * cl)
    local_bytes = local * 4 * 4 if winograd else local * b
    spectral = cg * hidden + (2 * hidden) ** 2 + hidden * cg  # conv1, the FourierUnit's mix, conv2
    spectral_bytes = spectral * (8 + (4 if cuda else b))      # float64 master + working copy
    per_ffc = local_bytes + spectral_bytes
    # Encoder and decoder: stem 7x7, the downsamplings and transposed convolutions 3x3, output 7x7.
    edge = 49 * cfg["input_nc"] * channels[0] + 49 * channels[0] * cfg["output_nc"]
    edge += sum(2 * 9 * a * b_ for a, b_ in zip(channels[:-1], channels[1:]))
    return 2 * blocks * per_ffc + edge * b


def estimate_memory(height: int, width: int, *, generator: str = "big-lama", batch: int = 1,
                    precision: str = "fp32", tile_size: int | None = None, device="cpu") -> int:
    """Bytes an optimized forward of ``generator`` needs for ``batch`` images of height x width
    (padded to multiples of 8 as ``inpaint`` does), on top of the loaded generator and its input:
    the folded weights and the activations at the peak. ``tile_size`` as in ``optimize``."""
    for name, value in (("height", height), ("width", width), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be fp32, tf32 or bf16, got {precision!r}")
    device = torch.device(device)
    cfg, channels, blocks, ratio = _geometry(generator)
    h, w = (math.ceil(n / _MODULO) * _MODULO for n in (height, width))
    b = 2 if precision == "bf16" else 4
    cuda = device.type == "cuda"
    winograd = device.type == "cpu" and b == 4
    p = batch * h * w  # full-resolution pixels
    scale = [4 ** i for i in range(len(channels))]  # pixels per pixel of each level

    cast = cfg["input_nc"] * b * p if b != 4 else 0  # the input in the compute dtype
    output = cfg["output_nc"] * 4 * p               # the fp32 result
    # Residual blocks: input, FFC outputs and the residual sum (four planes of c channels), the
    # SpectralTransform's fp32 buffers (conv1's output, its fp32 copy, its spectrum, the mixed
    # spectrum, the inverse FFT; about a hidden-size fp32 plane each) and, with Winograd, the
    # input and output transforms (36 / 16 of a plane each).
    q = p / scale[-1]
    c = channels[-1]
    hidden = int(c * ratio * _HIDDEN)
    block = 4 * c * b * q + 5 * hidden * 4 * q
    if winograd:
        block += 2 * (36 / 16) * c * 4 * q
    stages = [block]
    if tile_size is None:
        level = [ch * b * p / s for ch, s in zip(channels, scale)]
        stages.append(level[0])  # the stem's output (its fp32 input belongs to the caller)
        stages += [a + b_ for a, b_ in zip(level[:-1], level[1:])]  # each down/up-sampling: input + output
        # The output convolution: the decoder's last activation, its 2x2-block copy (4x the
        # channels on a quarter of the pixels), the 12-channel block result, then the output.
        stages.append(2 * level[0] + 2 * cfg["output_nc"] * b * p)
        peak = cast + output + max(stages)
    else:
        t = tile_size + 2 * 16  # the tile and its halo
        tile = sum(ch * b * batch * (t * t) / s for ch, s in zip(channels, scale)) * 3
        peak = cast + output + max(block, tile)
    overhead = _CUDA_OVERHEAD if cuda else _CPU_OVERHEAD
    return int(_weight_bytes(channels, blocks, ratio, cfg, b, winograd, cuda) + overhead + peak)


def available_memory(device="cpu") -> int | None:
    """Bytes the device has free now: ``MemAvailable`` on a Linux CPU, ``cudaMemGetInfo`` plus
    what torch's allocator holds unused on CUDA; None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_tile_size(height: int, width: int, budget: int, **kwargs) -> int | None:
    """None when the untiled forward's estimate fits in ``budget`` bytes, else the largest of
    ``TILE_SIZES`` that fits. Raises MemoryError when none does, saying how much is needed."""
    if estimate_memory(height, width, tile_size=None, **kwargs) <= budget:
        return None
    for tile in TILE_SIZES:
        if tile < max(height, width) and estimate_memory(height, width, tile_size=tile, **kwargs) <= budget:
            return tile
    need = estimate_memory(height, width, tile_size=TILE_SIZES[-1], **kwargs)
    raise MemoryError(
        f"inpainting {height}x{width} needs about {need / 2**30:.1f} GiB even in tiles of {TILE_SIZES[-1]} pixels, "
        f"and {budget / 2**30:.1f} GiB is free: free memory, use precision='bf16', a smaller batch, "
        "or downscale the image")
