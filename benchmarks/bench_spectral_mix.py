"""spectral_mix: the FourierUnit's 1x1 convolution applied to rfft2's output in place.

Providers: eager = LaMa's chain between rfftn and irfftn (stack, permute, conv, BatchNorm, ReLU,
permute, complex), torch.compile of that chain, fused = ``spectral_mix`` with BatchNorm folded
(plus ``fused-<backend>`` for the other GPU backend when both the CUDA extension and Triton run).
Shape: 192 complex channels (384 real) at the bottleneck's H x (W//2 + 1) spectral points.
Bytes per the op header (eager ~112CN, fused 16CN); FLOPs 8 C^2 N.

    python benchmarks/bench_spectral_mix.py [--sizes 512 1024 2048 4096] [--device cuda] [--dtype fp32 bf16]
    python -m pytest benchmarks/bench_spectral_mix.py --benchmark-only
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import common  # noqa: E402
from ffc_kernels import reference  # noqa: E402
from ffc_kernels.fold import batchnorm_affine, fold  # noqa: E402
from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight, spectral_mix  # noqa: E402


class LamaSpectralChain(nn.Module):
    """The middle of LaMa's FourierUnit.forward (reference.py), from rfftn's output to irfftn's input."""

    def __init__(self, unit: reference.FourierUnit):
        super().__init__()
        self.unit = unit

    def forward(self, ffted):
        batch = ffted.shape[0]
        ffted = torch.stack((ffted.real, ffted.imag), dim=-1)
        ffted = ffted.permute(0, 1, 4, 2, 3).contiguous()
        ffted = ffted.view((batch, -1) + ffted.size()[3:])
        ffted = self.unit.relu(self.unit.bn(self.unit.conv_layer(ffted)))
        ffted = ffted.view((batch, -1, 2) + ffted.size()[2:]).permute(0, 1, 3, 4, 2).contiguous()
        return torch.complex(ffted[..., 0], ffted[..., 1])


def make_cases(size, mode, device, args):
    h = w = common.bottleneck(size)
    c = common.FU_CHANNELS
    n = common.spectral_points(h, w)
    torch.manual_seed(args.seed)
    unit = common.randomize_batchnorm(reference.FourierUnit(c, c), args.seed).eval().to(device)
    chain = LamaSpectralChain(unit).eval()
    weight, bias = fold(unit.conv_layer.weight, batchnorm_affine(unit.bn), unit.conv_layer.bias)
    packed, packed_bias = pack_weight(weight.float()), pack_bias(bias.float())
    spec = torch.fft.rfft2(torch.randn(1, c, h, w, device=device), norm="ortho")

    def fused(backend):
        return lambda: spectral_mix(spec, packed, packed_bias, relu=True, precision=mode.dot_precision,
                                    backend=backend)

    note = None
    if mode.dtype != torch.float32:
        note = "reference in fp32 with TF32: LaMa's chain cannot run in bf16 (torch.complex rejects bf16)"
    default = common.fused_backend(device, has_cuda_impl=True)
    fused_traffic = lambda b: common.spectral_mix_traffic("fused", c, c, n) if b != "torch" else None  # noqa: E731
    providers = [
        common.Provider("eager", lambda: chain(spec), "torch", common.spectral_mix_traffic("eager", c, c, n),
                        check=False),  # it is the reference
        common.compile_provider(chain, spec, enabled=args.compile_here),
        common.Provider("fused", fused(default), default, fused_traffic(default)),
    ]
    for b in common.extra_fused_backends(device, has_cuda_impl=True):
        providers.append(common.Provider(f"fused-{b}", fused(b), b, fused_traffic(b)))
    yield common.Case(
        op="spectral_mix", case="fu192", size=size,
        shape={"B": 1, "C": c, "H": h, "Wf": w // 2 + 1, "N": n},
        flops=common.spectral_mix_flops(c, c, n), providers=providers,
        reference=lambda: chain(spec), tolerance=common.TOLERANCE[mode.name], mode=mode, note=note,
        spectral_dot=mode.dot_precision)


# ------------------------------------------------------------------------------------- pytest

@pytest.mark.parametrize("provider", ["eager", "compile", "fused"])
def test_spectral_mix(benchmark, provider, bench_device, bench_compile):
    case = common.pytest_single_case(make_cases, common.script_parser(__doc__), bench_device, bench_compile)
    common.pytest_case(case, provider, benchmark, bench_device)


if __name__ == "__main__":
    sys.exit(common.run_script(common.script_parser(__doc__), make_cases))
