"""The H100 SXM roofline and LaMa's bottleneck geometry that the AOT report models kernels against.

Peaks are datasheet dense rates (../shared/PERFORMANCE.md keeps the full table and where they come from);
a modeled time is the floor a kernel would reach at those peaks, max(bytes / HBM, issued FLOPs / peak),
so a kernel measured at 70% of HBM bandwidth takes its memory floor / 0.7.
"""
from __future__ import annotations

import dataclasses
import math

from ffc_kernels.reference import GENERATOR_CONFIGS

HBM_BYTES_PER_S = 3.35e12
PEAK_FLOPS = {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12}
# The bar for the spectral mix and both pointwise convolutions: this share of HBM bandwidth.
TARGET_BANDWIDTH_SHARE = 0.70

# Tensor-core passes per dot and the rate they run at, by the kernels' dot precision: fp32-class
# (split TF32) multiplies the K-concatenated [hi, lo] x [hi, lo] operands, four TF32 products.
DOT_PASSES = {"tf32x3": (4, "tf32"), "tf32": (1, "tf32"), "bf16": (1, "bf16"), "fp16": (1, "fp16"),
              "ieee": (1, "fp32")}


@dataclasses.dataclass(frozen=True)
class Roofline:
    bytes: float  # moved to and from HBM, each operand once
    flops: float  # issued on the math units: tile padding and split-precision passes included
    rate: str  # key of PEAK_FLOPS

    @property
    def memory_seconds(self) -> float:
        return self.bytes / HBM_BYTES_PER_S

    @property
    def compute_seconds(self) -> float:
        return self.flops / PEAK_FLOPS[self.rate]

    @property
    def seconds(self) -> float:
        return max(self.memory_seconds, self.compute_seconds)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_seconds >= self.compute_seconds else "compute"

    @property
    def target_seconds(self) -> float:
        """The time a kernel moving these bytes at TARGET_BANDWIDTH_SHARE of HBM bandwidth takes."""
        return self.memory_seconds / TARGET_BANDWIDTH_SHARE


def issued_gemm_flops(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, precision: str) -> float:
    """2 M N K rounded up to whole tiles, times the tensor-core passes of ``precision``."""
    passes, _ = DOT_PASSES[precision]
    pad = lambda size, block: math.ceil(size / block) * block  # noqa: E731
    return 2.0 * pad(m, block_m) * pad(n, block_n) * pad(k, block_k) * passes


@dataclasses.dataclass(frozen=True)
class Bottleneck:
    """The SpectralTransform of one residual block at a generator's bottleneck."""
    batch: int
    height: int
    width: int
    global_channels: int  # the FFC's global branch: conv1's input and conv2's output
    fu_channels: int  # conv1's output, the FourierUnit's channels, conv2's input
    enable_lfu: bool

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def spectral_points(self) -> int:  # rfft2 keeps W // 2 + 1 frequencies on the last axis
        return self.height * (self.width // 2 + 1)


def bottleneck(generator: str = "big-lama", size: int = 2048, batch: int = 1) -> Bottleneck:
    """The bottleneck's geometry for a ``size`` x ``size`` input, read from the generator's configuration."""
    cfg = GENERATOR_CONFIGS[generator]
    downs = cfg["n_downsampling"]
    channels = min(cfg.get("max_features", 1024), cfg["ngf"] * 2 ** downs)
    resnet = cfg["resnet_conv_kwargs"]
    global_channels = int(channels * resnet["ratio_gout"])
    side = size // 2 ** downs
    return Bottleneck(batch, side, side, global_channels, global_channels // 2, resnet.get("enable_lfu", True))


def fourier_unit(b: Bottleneck, *, clone: bool, mix_precision: str = "tf32") -> Roofline:
    """The whole FourierUnit at the bottleneck, fp32 data: C = fu_channels, P pixels, N spectral points.

    cuFFT's 2-d transforms at these sizes run as two passes, each reading and writing its whole
    tensor: R2C reads x (4CP) and writes the row transforms (8CN), then reads and writes them again
    (16CN); C2R mirrors it (16CN + 8CN read + 4CP written). The mix reads and writes the spectrum
    once (16CN). torch's irfft2 clones its input first (another 16CN); csrc's FourierUnit runs C2R in
    place on the mix's own buffer and does not.
    """
    c, p, n = b.batch * b.fu_channels, b.pixels, b.spectral_points
    bytes_ = 4 * c * p + 24 * c * n + 16 * c * n + 24 * c * n + 4 * c * p + (16 * c * n if clone else 0)
    passes, rate = DOT_PASSES[mix_precision]
    flops = 8.0 * b.fu_channels ** 2 * b.batch * n * passes
    return Roofline(bytes_, flops, rate)
