"""What every benchmark shares: LaMa's shapes, FLOP and byte models, timing, peak memory, results.

Shapes. big-lama runs its 18 FFC residual blocks at 1/8 of the input size with 512 channels,
ratio 0.75: 128 local and 384 global channels; the global branch's SpectralTransform halves
those to 192 channels for its FourierUnit, whose 1x1 convolution mixes 2 x 192 = 384 real
channels (real and imaginary parts stacked). Benchmarks are indexed by the LaMa *input* size
(512, 1024, 2048, 4096), so the bottleneck is 64^2 .. 512^2.

Models. FLOPs and bytes are re-derived from the shapes here (the performance notes, shared/PERFORMANCE.md, give targets, not
inputs). Bytes follow each op file's header: a list of kernels, each reading its inputs once and
writing its outputs once; where this count differs from a header, the function says why. For the
whole generator the same rule is applied mechanically to every aten op of one forward pass
(``count_model``), on the meta device, so 4096^2 costs nothing to count.

Timing. GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) after a warm-up,
median with p20/p80. CPU: paired rounds in one process, the providers alternating (and their
order reversing) round by round, so drift in the machine's load hits all of them alike.

Results. One JSON file per run, ``results/<device-slug>_<date>_<commit>.json``; every script of a
run adds its rows to it (rows with the same key are replaced), and it is rewritten after each
measurement so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------------- shapes

INPUT_SIZES = (512, 1024, 2048, 4096)
DOWNSAMPLING = 8  # three stride-2 FFCs
CHANNELS = 512
RATIO = 0.75
GLOBAL_CHANNELS = int(CHANNELS * RATIO)  # 384
LOCAL_CHANNELS = CHANNELS - GLOBAL_CHANNELS  # 128
FU_CHANNELS = GLOBAL_CHANNELS // 2  # 192: SpectralTransform's conv1 halves the global channels


def bottleneck(size: int) -> int:
    """Spatial side of the FFC residual blocks for a LaMa input of ``size`` x ``size``."""
    return size // DOWNSAMPLING


def spectral_points(h: int, w: int) -> int:
    """rfft2's output points per channel: N = H * (W // 2 + 1)."""
    return h * (w // 2 + 1)


# ------------------------------------------------------------------------------------ modes


@dataclasses.dataclass(frozen=True)
class Mode:
    """A precision setting. fp32: IEEE fp32 everywhere; tf32: fp32 data, TF32 tensor cores in
    matmuls, cuDNN convolutions and the fused spectral mix; bf16: bf16 activations and weights
    where LaMa's layers allow it, the FFTs and the spectral accumulation in fp32 (fp32 parts at TF32)."""

    name: str
    dtype: torch.dtype
    tf32: bool

    @property
    def dot_precision(self) -> str | None:
        """The ``precision`` argument of spectral_mix / fourier_unit, whose data is fp32 in every
        mode: None (the library's default, from torch's float32 matmul precision) for fp32 and tf32."""
        return "bf16" if self.name == "bf16" else None

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


MODES = {
    "fp32": Mode("fp32", torch.float32, False),
    "tf32": Mode("tf32", torch.float32, True),
    "bf16": Mode("bf16", torch.bfloat16, True),
}

# Largest ||fast - reference|| / ||reference|| accepted per mode (fused vs the eager reference;
# bf16 against the fp32 reference). METHOD.md: fp32 lands far under 1e-3, TF32 near 3e-4, bf16
# between 1e-3 and 1e-2; the margins cover the 18 blocks of the generator.
TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}


@contextlib.contextmanager
def precision(mode: Mode):
    """Set torch's TF32 switches for ``mode`` (legacy API only: mixing it with the
    ``fp32_precision`` API raises in recent torch), restoring them afterwards."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if mode.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = mode.tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def modes_from_args(dtypes, tf32s) -> list[Mode]:
    """``--dtype fp32 bf16 --tf32 off on`` -> [fp32, tf32, bf16] (``--tf32`` applies to fp32 data)."""
    modes = []
    for d in dtypes:
        if d == "bf16":
            modes.append(MODES["bf16"])
        else:
            modes.extend(MODES["tf32" if t == "on" else "fp32"] for t in tf32s)
    return modes


# ---------------------------------------------------------------------------------- FLOPs

def fft_flops(channels: int, h: int, w: int, batch: int = 1) -> float:
    """One 2-D real transform (forward or inverse) of ``channels`` planes: 5 N log2 N per plane
    with N = H * (W//2 + 1), the usual complex-FFT count applied to the half spectrum
    (the performance notes' 36 GFLOP of FFTs in big-lama at 2048^2 is this count)."""
    n = spectral_points(h, w)
    return 5.0 * n * math.log2(n) * channels * batch


def spectral_mix_flops(ci: int, co: int, n: int, batch: int = 1) -> float:
    """The 1x1 convolution (2Co x 2Ci real weights) over N spectral points: 8 Co Ci N."""
    return 8.0 * co * ci * n * batch


def pointwise_conv_flops(ci: int, co: int, p: int, batch: int = 1) -> float:
    return 2.0 * ci * co * p * batch


def fourier_unit_flops(c: int, h: int, w: int, batch: int = 1) -> float:
    """Mix plus the forward and inverse transforms."""
    return spectral_mix_flops(c, c, spectral_points(h, w), batch) + 2 * fft_flops(c, h, w, batch)


def conv_flops(ci: int, co: int, k: int, p_out: int, batch: int = 1) -> float:
    return 2.0 * ci * co * k * k * p_out * batch


def ffc_bn_act_flops(h: int, w: int, batch: int = 1, cl: int = LOCAL_CHANNELS, cg: int = GLOBAL_CHANNELS,
                     k: int = 3) -> float:
    """An FFC_BN_ACT cl+cg -> cl+cg, stride 1, no LFU (big-lama's residual-block convolution)."""
    p = h * w
    c_fu = cg // 2
    spatial = conv_flops(cl, cl, k, p) + conv_flops(cg, cl, k, p) + conv_flops(cl, cg, k, p)
    spectral = pointwise_conv_flops(cg, c_fu, p) + fourier_unit_flops(c_fu, h, w) + pointwise_conv_flops(c_fu, cg, p)
    return (spatial + spectral) * batch


# ---------------------------------------------------------------------------------- bytes

F32, C64 = 4, 8


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Traffic:
    """Device-memory bytes of a sequence of kernels: each reads its inputs once and writes its outputs once."""

    def __init__(self):
        self.kernels: list[tuple[str, float, float]] = []

    def add(self, name: str, read: float, write: float) -> "Traffic":
        self.kernels.append((name, float(read), float(write)))
        return self

    def extend(self, other: "Traffic", prefix: str = "") -> "Traffic":
        self.kernels.extend((prefix + n, r, w) for n, r, w in other.kernels)
        return self

    @property
    def total(self) -> float:
        return sum(r + w for _, r, w in self.kernels)

    def __repr__(self):
        return f"Traffic({self.total / 1e6:.1f} MB in {len(self.kernels)} kernels)"


def spectral_mix_traffic(kind: str, ci: int, co: int, n: int, batch: int = 1, lama_bn: bool = True) -> Traffic:
    """spectral_mix (op header). eager: LaMa's stack, permute, conv, BN, ReLU, permute, complex.

    112CN at Ci = Co, as in the op header. fused: read 8CiN, write 8CoN, plus the packed weights (16 Ci Co)."""
    b = batch
    weights = 16 * ci * co
    t = Traffic()
    if kind == "fused":
        return t.add("spectral_mix", C64 * ci * n * b + weights + 8 * co, C64 * co * n * b)
    if kind != "eager":
        raise ValueError(kind)
    x, y = C64 * ci * n * b, C64 * co * n * b  # complex64 bytes == stacked fp32 bytes
    t.add("stack(real, imag)", x, x).add("permute.contiguous", x, x).add("conv 1x1", x + weights, y)
    if lama_bn:
        t.add("BatchNorm", y, y)
    return t.add("ReLU", y, y).add("permute.contiguous", y, y).add("complex", y, y)


def fourier_unit_traffic(kind: str, c: int, h: int, w: int, batch: int = 1) -> Traffic:
    """A FourierUnit at C channels, fp32 data (op header of fourier_unit).

    eager: rfftn (read 4CP, write 8CN), ortho scale (16CN), the mix chain (112CN), irfftn's
    copy of its input (C2R overwrites it: 16CN), the C2R transform (8CN + 4CP) and its ortho
    scale on the real output (8CP): 16CP + 160CN.
    fused: rfft2 (4CP + 8CN), spectral_mix (16CN), the C2R copy (16CN) and transform (8CN + 4CP):
    8CP + 48CN, as in the op header.
    FFTs are counted as one pass each; cuFFT takes two or more at these sizes."""
    p, n, b = h * w, spectral_points(h, w), batch
    real, spec = F32 * c * p * b, C64 * c * n * b
    t = Traffic().add("rfft2", real, spec)
    if kind == "eager":
        t.add("ortho scale (forward)", spec, spec)
    t.extend(spectral_mix_traffic(kind, c, c, n, batch), "mix: ")
    t.add("irfft2 input copy", spec, spec).add("irfft2", spec, real)
    if kind == "eager":
        t.add("ortho scale (inverse)", real, real)
    return t


def conv1_traffic(kind: str, ci: int, co: int, p: int, act: int, batch: int = 1) -> Traffic:
    """SpectralTransform.conv1: 1x1 conv + BN + ReLU. Activations of ``act`` bytes; the fused
    op writes fp32 (its output feeds the FFTs). Op header: eager 24CP -> fused 8CP in fp32."""
    x, y, weights = act * ci * p * batch, act * co * p * batch, F32 * ci * co
    t = Traffic()
    if kind == "fused":
        return t.add("pointwise_conv", x + weights + F32 * co, F32 * co * p * batch)
    return t.add("conv 1x1", x + weights, y).add("BatchNorm", y, y).add("ReLU", y, y)


def conv2_traffic(kind: str, ci: int, co: int, p: int, act: int, batch: int = 1, lfu: bool = False) -> Traffic:
    """SpectralTransform.conv2 and the FFC's global output: bn_g(conv2(x + fu(x) + xs) + convl2g(x_l)), ReLU.

    eager (LaMa): x + fu, then + xs (the tiled LFU output, repeated: or LaMa's ``+ 0`` when the
    LFU is off, still one pass), conv2, + convl2g, bn_g, act_g. fused: reads x and fu(x) in fp32
    (the Fourier unit's output), the LFU tile (a quarter plane) and the residual, writes once."""
    b = batch
    xi, yo, weights = act * ci * p * b, act * co * p * b, F32 * ci * co
    t = Traffic()
    if kind == "fused":
        read = 2 * F32 * ci * p * b + (F32 * ci * p * b // 4 if lfu else 0) + yo + weights + F32 * co
        return t.add("pointwise_conv", read, yo)
    t.add("x + fu(x)", 2 * xi, xi)
    if lfu:
        t.add("xs.repeat(1, 1, 2, 2)", xi // 4, xi).add("+ xs", 2 * xi, xi)
    else:
        t.add("+ 0 (LFU off)", xi, xi)
    return (t.add("conv2 1x1", xi + weights, yo).add("+ convl2g(x_l)", 2 * yo, yo)
            .add("bn_g", yo, yo).add("act_g", yo, yo))


def ffc_bn_act_traffic(kind: str, h: int, w: int, act: int, batch: int = 1, cl: int = LOCAL_CHANNELS,
                       cg: int = GLOBAL_CHANNELS, k: int = 3) -> Traffic:
    """An FFC_BN_ACT cl+cg -> cl+cg, k x k reflect-padded, stride 1, LFU off (big-lama's blocks).

    eager: LaMa pads x_l twice (convl2l, convl2g) and x_g once, runs three convolutions,
    multiplies two of them by the ungated FFC's gate (the integer 1: still a pass each), adds,
    runs the SpectralTransform unfused, adds, and applies bn_l, act_l, bn_g, act_g separately.
    fused (modules.py): one padding pass over the joined input, convl2g into the residual,
    one convolution [convl2l | convg2l], ReLU into the output buffer, conv1 (pointwise_conv,
    fp32 out), the fused Fourier unit, conv2 with residual, bn_g and ReLU into the output."""
    p, pp = h * w, (h + k - 1) * (w + k - 1)
    c_fu = cg // 2
    b = batch
    ws = lambda ci, co: F32 * ci * co * k * k  # noqa: E731
    t = Traffic()
    if kind == "eager":
        t.add("pad x_l (convl2l)", act * cl * p * b, act * cl * pp * b)
        t.add("convl2l", act * cl * pp * b + ws(cl, cl), act * cl * p * b)
        t.add("pad x_g (convg2l)", act * cg * p * b, act * cg * pp * b)
        t.add("convg2l", act * cg * pp * b + ws(cg, cl), act * cl * p * b)
        t.add("convg2l * g2l_gate (1)", act * cl * p * b, act * cl * p * b)
        t.add("convl2l + convg2l", 2 * act * cl * p * b, act * cl * p * b)
        t.add("pad x_l (convl2g)", act * cl * p * b, act * cl * pp * b)
        t.add("convl2g", act * cl * pp * b + ws(cl, cg), act * cg * p * b)
        t.add("convl2g * l2g_gate (1)", act * cg * p * b, act * cg * p * b)
        t.extend(conv1_traffic("eager", cg, c_fu, p, act, b), "conv1: ")
        t.extend(fourier_unit_traffic("eager", c_fu, h, w, b), "fu: ")
        spectral = conv2_traffic("eager", c_fu, cg, p, act, b)
        spectral.kernels = spectral.kernels[:3]  # x + fu, + 0, conv2: the rest is the FFC's
        t.extend(spectral, "conv2: ")
        t.add("convl2g + convg2g", 2 * act * cg * p * b, act * cg * p * b)
        for name, c in (("bn_l", cl), ("act_l", cl), ("bn_g", cg), ("act_g", cg)):
            t.add(name, act * c * p * b, act * c * p * b)
        return t
    t.add("pad [x_l | x_g]", act * (cl + cg) * p * b, act * (cl + cg) * pp * b)
    t.add("convl2g (residual)", act * cl * pp * b + ws(cl, cg), act * cg * p * b)
    t.add("[convl2l | convg2l]", act * (cl + cg) * pp * b + ws(cl + cg, cl), act * cl * p * b)
    t.add("ReLU into output", act * cl * p * b, act * cl * p * b)
    t.extend(conv1_traffic("fused", cg, c_fu, p, act, b), "conv1: ")
    t.extend(fourier_unit_traffic("fused", c_fu, h, w, b), "fu: ")
    t.extend(conv2_traffic("fused", c_fu, cg, p, act, b), "conv2: ")
    return t


# ------------------------------------------------------- counting a whole model (meta device)

_NO_TRAFFIC = re.compile(r"^aten::(empty|empty_strided|new_empty|new_empty_strided|lift_fresh|detach|alias"
                         r"|_local_scalar_dense|set_|resize_)")
_WRITE_ONLY_SELF = {"aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_", "aten::uniform_"}


class _AtenCounter(TorchDispatchMode):
    """Bytes and FFT FLOPs of every aten (or custom) op that moves data: views move nothing;
    an op reads each tensor argument once and writes each output once; mutated arguments are
    written (``out=``, ``copy_``) or read and written (``relu_``, ``add_``). Library-internal
    passes (cuFFT's multiple passes, C2R's input copy) are not visible at this level."""

    def __init__(self):
        super().__init__()
        self.bytes = 0.0
        self.fft_flops = 0.0
        self.ops: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        name = schema.name
        if _NO_TRAFFIC.match(name):
            return out
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out  # a view
        moved = 0
        bound = dict(zip((a.name for a in schema.arguments), args))
        bound.update(kwargs)
        for arg in schema.arguments:
            value = bound.get(arg.name)
            tensors = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if torch.is_tensor(v)]
            for v in tensors:
                if arg.alias_info is not None and arg.alias_info.is_write:
                    moved += v.nbytes * (1 if (arg.name != "self" or name in _WRITE_ONLY_SELF) else 2)
                else:
                    moved += v.nbytes
        for r, v in zip(schema.returns, out if isinstance(out, (list, tuple)) else [out]):
            if r.alias_info is None and torch.is_tensor(v):
                moved += v.nbytes
        self.bytes += moved
        self.ops[name] = self.ops.get(name, 0.0) + moved
        if name in ("aten::_fft_r2c", "aten::_fft_c2r", "aten::_fft_c2c"):
            spec = out if name == "aten::_fft_r2c" else args[0]
            dims = args[1]
            n = math.prod(spec.shape[d] for d in dims)
            self.fft_flops += 5.0 * n * math.log2(max(n, 2)) * (spec.numel() // n)
        return out


def count_model(module: nn.Module, *inputs) -> dict:
    """FLOPs and aten-level bytes of one forward of ``module`` on ``inputs`` (meta tensors are
    the point: nothing is computed). A first forward warms caches, so one-time work (BatchNorm
    folding) is left out of the count. Convolution FLOPs by torch's FlopCounterMode, FFTs at
    5 N log2 N per plane."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():  # not inference_mode: composite ops decompose, so views are exact
        module(*inputs)
        counter = _AtenCounter()
        with counter:
            module(*inputs)
        # Separately: FlopCounterMode installs global module hooks, and FastFFC modules run the
        # reference math while any hook is installed. The FLOPs are the model's either way.
        flops = FlopCounterMode(display=False)
        with flops:
            module(*inputs)
    return {"flops": flops.get_total_flops() + counter.fft_flops, "bytes": counter.bytes,
            "fft_flops": counter.fft_flops, "ops": counter.ops}


# ---------------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_gpu(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100, min_runs: int = 10) -> Timing:
    """do_bench's median and p20/p80, with enough repetitions for ``min_runs`` samples of a slow ``fn``."""
    import triton.testing

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - start) * 1e3
    rep = max(rep_ms, min_runs * estimate_ms)
    warmup = max(warmup_ms, 2 * estimate_ms)
    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80, max(1, int(rep / max(estimate_ms, 1e-3))))


def time_cpu_paired(fns: dict[str, Callable[[], Any]], *, rounds: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Paired rounds: each round runs every provider once, the order reversing each round."""
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            start = time.perf_counter()
            fns[n]()
            elapsed = (time.perf_counter() - start) * 1e3
            if r >= warmup:
                samples[n].append(elapsed)
    out = {}
    for n, s in samples.items():
        a = np.asarray(s)
        out[n] = Timing(float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80)), len(a))
    return out


def peak_memory_mb(fn: Callable[[], Any], device) -> float | None:
    """GPU: memory one call adds at its peak over what was allocated before it (inputs, weights
    and caches excluded, its output included). CPU: None (not measured)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


# ---------------------------------------------------------------------------------- checks

def _flat(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return torch.cat([_flat(o) for o in out if torch.is_tensor(o)])
    if out.is_complex():
        out = torch.view_as_real(out)
    return out.detach().reshape(-1).double()


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| over all outputs (complex as real pairs, tuples concatenated); NaN -> inf."""
    a, b = _flat(out), _flat(ref).to(_flat(out).device)
    if a.shape != b.shape:
        raise ValueError(f"output has {a.numel()} elements, reference {b.numel()}")
    err = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))
    return err if math.isfinite(err) else float("inf")


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BatchNorm folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.8)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return module


def set_compile_limits() -> None:
    """Each benchmark compiles one module class at several shapes and precisions: allow it."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


# ---------------------------------------------------------------------------------- cases

@dataclasses.dataclass
class Provider:
    """One way to run a case. ``fn`` runs it once and returns its output; ``traffic`` is the byte
    model of what runs (None where it is not modelled: torch.compile, and the torch fallback of a
    fused op, which runs other kernels than the fused ones it stands in for)."""

    name: str  # eager | compile | fused | fused-<backend>
    fn: Callable[[], Any] | None
    backend: str
    traffic: Traffic | float | None = None
    skip: str | None = None
    check: bool = True  # compare the output with the case's reference


@dataclasses.dataclass
class Case:
    op: str
    case: str
    size: int  # LaMa input size
    shape: dict
    flops: float
    providers: list[Provider]
    reference: Callable[[], Any]  # the output every provider is checked against
    tolerance: float
    mode: Mode
    note: str | None = None  # how the reference ran, where not in ``mode`` itself
    spectral_dot: str | None = None  # the fused spectral mix's dot precision, where the case sets it
    metrics: Callable[[Any, Any], dict] | None = None  # extra accuracy columns: (output, expected) -> row fields
    _expected: Any = dataclasses.field(default=None, repr=False)

    def expected(self):
        if self._expected is None:
            self._expected = self.reference()
        return self._expected


def fused_backend(device, has_cuda_impl: bool = False) -> str:
    from ffc_kernels import backends

    return backends.select(torch.device(device), has_cuda_impl=has_cuda_impl)


def extra_fused_backends(device, has_cuda_impl: bool) -> list[str]:
    """GPU backends of an op other than the default one, to time explicitly (triton when the
    CUDA extension is the default)."""
    if torch.device(device).type != "cuda":
        return []
    from ffc_kernels import backend_info

    default = fused_backend(device, has_cuda_impl)
    reasons = backend_info(device).reasons
    return [name for name in (("cuda", "triton") if has_cuda_impl else ("triton",))
            if name != default and reasons.get(name) is None]


def compile_provider(target: Callable, *inputs, enabled: bool, skip: str | None = None) -> Provider:
    """torch.compile(target) called on ``inputs``; compiled lazily, on the provider's first call."""
    if not enabled:
        return Provider("compile", None, "inductor", skip="compile not requested (--compile)")
    if skip:
        return Provider("compile", None, "inductor", skip=skip)
    set_compile_limits()
    compiled = torch.compile(target, dynamic=False)
    return Provider("compile", lambda: compiled(*inputs), "inductor")


# ---------------------------------------------------------------------------------- results

def git_commit() -> tuple[str, bool]:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20)

    if os.environ.get("FFC_BENCH_COMMIT"):  # a copy of the tree without .git (a lent GPU): say it
        return os.environ["FFC_BENCH_COMMIT"], os.environ.get("FFC_BENCH_DIRTY", "") not in ("", "0")
    try:
        head = git("rev-parse", "--short=10", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else "nocommit"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "nogit", False
    return commit, dirty


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def device_slug(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_results_path(device, out_dir: Path | str = RESULTS_DIR) -> Path:
    commit, dirty = git_commit()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return Path(out_dir) / f"{device_slug(device)}_{date}_{commit}{'-dirty' if dirty else ''}.json"


def environment(device) -> dict:
    import ffc_kernels

    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_commit()
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "git_commit": commit,
        "git_dirty": dirty,
        "backend_info": str(ffc_kernels.backend_info(device)),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1),
                   l2_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                   capability=f"{props.major}.{props.minor}")
    return env


def _row_key(row: dict) -> tuple:
    return (row["op"], row["case"], row["size"], row["mode"], row["provider"])


class Results:
    """The JSON file of one run: environment, settings, rows; merged with what the file holds."""

    def __init__(self, device, path: Path | str | None = None, out_dir: Path | str = RESULTS_DIR):
        self.path = Path(path) if path else default_results_path(device, out_dir)
        self.data = {"schema": 1, "environment": {}, "commands": [], "rows": []}
        if self.path.exists():
            self.data.update(json.loads(self.path.read_text()))
        self.data["environment"] = environment(device)
        env = self.data["environment"]
        self.data["commands"].append({
            "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "git_commit": env["git_commit"] + ("-dirty" if env["git_dirty"] else ""),
            "threads": torch.get_num_threads(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": _loadavg(),
        })

    def add(self, row: dict) -> None:
        rows = [r for r in self.data["rows"] if _row_key(r) != _row_key(row)]
        rows.append(row)
        self.data["rows"] = rows
        self.save()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data["settings"] = sorted({(r["mode"], r["dtype"], r["matmul_precision"], r["cudnn_tf32"])
                                        for r in self.data["rows"] if "matmul_precision" in r})
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------- running

class Budget:
    def __init__(self, seconds: float | None):
        self.deadline = None if not seconds else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def _library_dot_precision() -> str:
    from ffc_kernels import backends

    return backends.matmul_precision()


def _row(case: Case, p: Provider, device) -> dict:
    return {
        "op": case.op, "case": case.case, "provider": p.name, "backend": p.backend,
        "size": case.size, "shape": case.shape, "mode": case.mode.name, "dtype": case.mode.dtype_name,
        "tf32": case.mode.tf32, "matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_tf32": torch.backends.cudnn.allow_tf32, "device": str(device),
        "flops": case.flops, "bytes": None, "median_ms": None, "p20_ms": None, "p80_ms": None, "runs": 0,
        "gbps": None, "tflops": None, "peak_mem_mb": None, "rel_err": None, "check": None,
        "skipped": p.skip, "compile_s": None, "loadavg": _loadavg(), "threads": torch.get_num_threads(),
        "note": case.note if p.name in ("eager", "compile") else None,
        "spectral_dot": (case.spectral_dot or _library_dot_precision()) if p.name.startswith("fused") else None,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_case(case: Case, device, results: Results | None, *, rounds: int = 5, budget: Budget | None = None,
             rep_ms: float = 100) -> list[dict]:
    """Check every provider against the reference, time them, record one row each."""
    device = torch.device(device)
    rows = {}
    live = []
    with precision(case.mode), torch.inference_mode():
        try:
            expected = case.expected()
        except Exception as exc:  # e.g. out of memory: record the case as not run, go on
            reason = f"reference failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            out_rows = []
            for p in case.providers:
                row = _row(case, p, device)
                row["skipped"] = p.skip or reason
                out_rows.append(row)
                if results is not None:
                    results.add(row)
            return out_rows
        for p in case.providers:
            row = rows[p.name] = _row(case, p, device)
            if p.skip or p.fn is None:
                row["skipped"] = p.skip or "not available"
                continue
            if budget is not None and budget.expired():
                row["skipped"] = "time budget"
                continue
            try:
                start = time.perf_counter()
                out = p.fn()  # first call: compiles, folds, autotunes
                sync(device)
                if p.name == "compile":
                    row["compile_s"] = round(time.perf_counter() - start, 2)
                if p.check:
                    row["rel_err"] = rel_error(out, expected)
                    row["check"] = "ok" if row["rel_err"] <= case.tolerance else "FAIL"
                    if case.metrics is not None:
                        row.update(case.metrics(out, expected))
                del out
                row["peak_mem_mb"] = peak_memory_mb(p.fn, device)
                live.append(p)
            except Exception as exc:  # one provider failing must not lose the others' numbers
                row["skipped"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        del expected
        case._expected = None
        if device.type == "cuda":
            timings = {}
            for p in live:
                try:
                    timings[p.name] = time_gpu(p.fn, rep_ms=rep_ms)
                except Exception as exc:
                    rows[p.name]["skipped"] = f"error while timing: {type(exc).__name__}: {str(exc)[:300]}"
        else:
            timings = time_cpu_paired({p.name: p.fn for p in live}, rounds=rounds)
    for p in case.providers:
        row = rows[p.name]
        t = timings.get(p.name) if live else None
        if t is not None:
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs)
            row["tflops"] = case.flops / (t.median_ms * 1e-3) / 1e12
            nbytes = p.traffic.total if isinstance(p.traffic, Traffic) else p.traffic
            if nbytes:
                row["bytes"] = nbytes
                row["gbps"] = nbytes / (t.median_ms * 1e-3) / 1e9
        if results is not None:
            results.add(row)
    return list(rows.values())


def format_rows(rows: list[dict]) -> str:
    head = (f"{'op':<15} {'case':<10} {'size':>5} {'mode':<5} {'provider':<13} {'backend':<9} "
            f"{'median ms':>10} {'p20-p80 ms':>19} {'GB/s':>8} {'TFLOP/s':>8} {'peak MB':>8} {'rel err':>9} "
            f"{'vs eager':>8}")
    lines = [head, "-" * len(head)]
    eager = {(r["op"], r["case"], r["size"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "eager"}
    num = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if r["median_ms"] is None:
            lines.append(f"{r['op']:<15} {r['case']:<10} {r['size']:>5} {r['mode']:<5} {r['provider']:<13} "
                         f"{r['backend']:<9} skipped: {r['skipped']}"
                         + (f"  (check {r['check']}, rel err {r['rel_err']:.1e})" if r["check"] else ""))
            continue
        e = eager.get((r["op"], r["case"], r["size"], r["mode"]))
        speed = f"{e / r['median_ms']:.2f}x" if e else ""
        check = "" if r["check"] is None else f"{r['rel_err']:.1e}" + ("" if r["check"] == "ok" else " FAIL")
        lines.append(
            f"{r['op']:<15} {r['case']:<10} {r['size']:>5} {r['mode']:<5} {r['provider']:<13} {r['backend']:<9} "
            f"{r['median_ms']:>10.3f} {r['p20_ms']:>9.3f}-{r['p80_ms']:<9.3f} {num(r['gbps'], '8.1f'):>8} "
            f"{num(r['tflops'], '8.3f'):>8} {num(r['peak_mem_mb'], '8.1f'):>8} {check:>9} {speed:>8}")
    return "\n".join(lines)


def script_parser(description: str, sizes=INPUT_SIZES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help=f"LaMa input sizes (default: {' '.join(map(str, sizes))} on cuda, 512 on cpu)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    parser.add_argument("--tf32", nargs="+", choices=("off", "on"), default=["off"],
                        help="TF32 for fp32 data (cuDNN convolutions, matmuls, the fused spectral mix)")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=None,
                        help="precision modes in this order (overrides --dtype/--tf32): fp32 = TF32 off, "
                             "tf32 = fp32 data with TF32, bf16")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="time torch.compile(reference) (default: on for cuda, off for cpu)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-modes", nargs="+", default=None, choices=sorted(MODES),
                        help="modes in which to time torch.compile (default: all)")
    parser.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                        help="only these providers (eager, compile, fused; 'fused' includes fused-<backend>)")
    parser.add_argument("--rounds", type=int, default=5, help="CPU: paired rounds per case")
    parser.add_argument("--rep-ms", type=float, default=100, help="GPU: do_bench repetition time per provider")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting providers after this many seconds")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for the results JSON")
    parser.add_argument("--results-file", default=None, help="exact results file (run_gpu.py passes one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch threads (default: torch's, one per core). On a shared machine "
                             "1 thread resists other processes' load better than OpenMP barriers do")
    parser.add_argument("--seed", type=int, default=0)
    parser._default_sizes = sizes
    return parser


def run_script(parser: argparse.ArgumentParser, make_cases: Callable, argv=None, setup: Callable | None = None) -> int:
    """Parse args, run every (mode, size) case from ``make_cases(size, mode, device, args)``, print, save.

    ``setup(results, args, device)``, if given, runs once before the cases (measurements the
    whole run shares, stored with ``results.set``)."""
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    args.sizes = args.sizes or (list(parser._default_sizes) if device.type == "cuda" else [512])
    if args.compile is None:
        args.compile = device.type == "cuda"
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Results(device, path=args.results_file, out_dir=args.out)
    budget = Budget(args.budget_s)
    print(f"# {device_name(device)} | torch {torch.__version__} | results: {results.path}", flush=True)
    if setup is not None:
        setup(results, args, device)
    all_rows = []
    failed = False
    modes = [MODES[m] for m in args.modes] if args.modes else modes_from_args(args.dtype, args.tf32)
    for mode in modes:
        for size in args.sizes:
            if budget.expired():
                print(f"# time budget spent: skipping {mode.name} {size}", flush=True)
                continue
            args.compile_here = args.compile and (args.compile_modes is None or mode.name in args.compile_modes)
            try:
                with precision(mode):
                    cases = list(make_cases(size, mode, device, args))
            except torch.cuda.OutOfMemoryError as exc:
                print(f"# {mode.name} {size}: out of memory building the case: {exc}", flush=True)
                continue
            for case in cases:
                if args.providers:
                    case.providers = [p for p in case.providers
                                      if any(p.name == s or p.name.startswith(s + "-") for s in args.providers)]
                rows = run_case(case, device, results, rounds=args.rounds, budget=budget, rep_ms=args.rep_ms)
                all_rows.extend(rows)
                failed |= any(r["check"] == "FAIL" for r in rows)
                print(format_rows(rows), flush=True)
                del case
            del cases
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n# summary\n" + format_rows(all_rows))
    print(f"# wrote {results.path}")
    if failed:
        print("# CHECK FAILED: a fused output differs from the reference beyond tolerance", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------- pytest

PYTEST_SIZE = 512  # 64^2 bottleneck
PYTEST_ROUNDS = 2
_PYTEST_CASES: dict = {}


def pytest_cases(make_cases, parser, device: str, compile_: bool) -> dict:
    """A bench file's cases at the pytest size, by case name; built once per device and setting."""
    key = (make_cases, device, compile_)
    if key not in _PYTEST_CASES:
        args = parser.parse_args([])
        args.compile_here = compile_
        _PYTEST_CASES[key] = {c.case: c for c in make_cases(PYTEST_SIZE, MODES["fp32"], torch.device(device), args)}
    return _PYTEST_CASES[key]


def pytest_single_case(make_cases, parser, device: str, compile_: bool) -> "Case":
    """The one case of a bench file that has a single case."""
    (case,) = pytest_cases(make_cases, parser, device, compile_).values()
    return case


def pytest_case(case: Case, provider: str, benchmark, device, rounds: int = PYTEST_ROUNDS) -> None:
    """Check ``provider`` against the reference (asserted), then time it with pytest-benchmark.
    The checked call doubles as the warm-up; speed is never asserted."""
    import pytest

    p = next(p for p in case.providers if p.name == provider)
    if p.skip or p.fn is None:
        pytest.skip(p.skip or "not available")
    with precision(case.mode), torch.inference_mode():
        if p.check:
            out = p.fn()
            err = rel_error(out, case.expected())
            del out
            assert err <= case.tolerance, f"{case.op} {provider}: rel err {err:.2e} > {case.tolerance:.0e}"

        def timed():
            p.fn()
            sync(device)

        benchmark.extra_info.update(op=case.op, case=case.case, size=case.size, shape=case.shape,
                                    backend=p.backend, flops=case.flops,
                                    bytes=p.traffic.total if isinstance(p.traffic, Traffic) else p.traffic)
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)


def replace_readme_block(name: str, text: str, path: Path | str | None = None) -> None:
    """Replace what lies between ``<!-- NAME -->`` and ``<!-- /NAME -->`` in README.md with ``text``."""
    path = Path(path) if path is not None else ROOT / "README.md"
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    readme = path.read_text()
    if begin not in readme or end not in readme:
        raise ValueError(f"{path} has no {begin} ... {end} block")
    start, stop = readme.index(begin) + len(begin), readme.index(end)
    path.write_text(readme[:start] + "\n" + text.strip() + "\n" + readme[stop:])


def new_results(kind: str, device, out_dir: Path | str = RESULTS_DIR, **fields) -> tuple[dict, Path]:
    """A benchmark run's results, ``{"schema": "<kind>-1", "environment": ..., **fields}``, and the
    file they go to, ``out_dir/<kind>_<device>_<date>_<commit>.json``."""
    env = environment(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    path = Path(out_dir) / f"{kind}_{device_slug(device)}_{date}_{env.get('git_commit') or 'nocommit'}.json"
    result = {"schema": f"{kind}-1", "environment": {k: v for k, v in env.items() if k != "backend_info"}, **fields}
    return result, path


def save_results(result: dict, path: Path) -> None:
    """Write (or rewrite, after each measurement) a run's results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def readme_from(results_file: str, block: str, markdown) -> int:
    """``--readme-from``: README.md's ``block`` rewritten as ``markdown(results)`` of one results file."""
    replace_readme_block(block, markdown(json.loads(Path(results_file).read_text())))
    print("# updated README.md")
    return 0
