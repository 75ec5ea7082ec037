"""fourier_unit: a whole LaMa FourierUnit (rfft2, spectral mix, irfft2) with the ortho scales folded in.

Shape: 192 channels (SpectralTransform's conv1 output) at the bottleneck, fp32 data in every
mode (torch.fft rejects bf16); ``--dtype bf16`` runs the fused mix's dot products in bf16.
Providers: eager = reference.FourierUnit, torch.compile of it, fused = ``fourier_unit`` with
BatchNorm folded (plus ``fused-<backend>`` for the other GPU backend of the mix, if any).
FLOPs: 8 C^2 N for the mix + 2 x 5 N log2 N per channel for the transforms, N = H (W//2 + 1);
bytes: eager ~16CP + 160CN, fused ~8CP + 48CN (see common.fourier_unit_traffic).

    python benchmarks/bench_fourier_unit.py [--sizes 512 1024 2048 4096] [--device cuda] [--dtype fp32 bf16]
    python -m pytest benchmarks/bench_fourier_unit.py --benchmark-only
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from ffc_kernels import reference  # noqa: E402
from ffc_kernels.fold import batchnorm_affine, fold  # noqa: E402
from ffc_kernels.ops.fourier_unit import fourier_unit  # noqa: E402
from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight  # noqa: E402


def make_cases(size, mode, device, args):
    h = w = common.bottleneck(size)
    c = common.FU_CHANNELS
    torch.manual_seed(args.seed)
    unit = common.randomize_batchnorm(reference.FourierUnit(c, c), args.seed).eval().to(device)
    weight, bias = fold(unit.conv_layer.weight, batchnorm_affine(unit.bn), unit.conv_layer.bias)
    packed, packed_bias = pack_weight(weight.float()), pack_bias(bias.float())
    x = torch.randn(1, c, h, w, device=device)

    def fused(backend):
        return lambda: fourier_unit(x, packed, packed_bias, fft_norm="ortho", precision=mode.dot_precision,
                                    backend=backend)

    note = None
    if mode.dtype != torch.float32:
        note = "reference in fp32 with TF32: LaMa's FourierUnit cannot run in bf16"
    default = common.fused_backend(device, has_cuda_impl=True)
    fused_traffic = lambda b: common.fourier_unit_traffic("fused", c, h, w) if b != "torch" else None  # noqa: E731
    providers = [
        common.Provider("eager", lambda: unit(x), "torch", common.fourier_unit_traffic("eager", c, h, w), check=False),
        common.compile_provider(unit, x, enabled=args.compile_here),
        common.Provider("fused", fused(default), default, fused_traffic(default)),
    ]
    for b in common.extra_fused_backends(device, has_cuda_impl=True):
        providers.append(common.Provider(f"fused-{b}", fused(b), b, fused_traffic(b)))
    yield common.Case(
        op="fourier_unit", case="fu192", size=size,
        shape={"B": 1, "C": c, "H": h, "W": w, "N": common.spectral_points(h, w)},
        flops=common.fourier_unit_flops(c, h, w), providers=providers,
        reference=lambda: unit(x), tolerance=common.TOLERANCE[mode.name], mode=mode, note=note,
        spectral_dot=mode.dot_precision)


# ------------------------------------------------------------------------------------- pytest

@pytest.mark.parametrize("provider", ["eager", "compile", "fused"])
def test_fourier_unit(benchmark, provider, bench_device, bench_compile):
    case = common.pytest_single_case(make_cases, common.script_parser(__doc__), bench_device, bench_compile)
    common.pytest_case(case, provider, benchmark, bench_device)


if __name__ == "__main__":
    sys.exit(common.run_script(common.script_parser(__doc__), make_cases))
