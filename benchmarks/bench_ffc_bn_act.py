"""FFC_BN_ACT: one whole 3x3 FFC of big-lama's residual blocks, 512 -> 512 channels, ratio 0.75, LFU off.

The input is one 512-channel buffer passed as LaMa's (x_l, x_g) tuple of channel slices, as
the blocks of the generator pass it. Providers: eager = reference.FFC_BN_ACT, torch.compile of
it, fused = ffc_kernels.FastFFC_BN_ACT (same constructor, the reference's state_dict).
``--dtype bf16`` runs the fused module in bf16 (FFTs and spectral accumulation in fp32) against
the reference in fp32 with TF32, since LaMa's FourierUnit cannot run in bf16.

    python benchmarks/bench_ffc_bn_act.py [--sizes 512 1024 2048 4096] [--device cuda] [--dtype fp32 bf16]
    python -m pytest benchmarks/bench_ffc_bn_act.py --benchmark-only
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import common  # noqa: E402
from ffc_kernels import FastFFC_BN_ACT, reference  # noqa: E402

FFC_ARGS = dict(in_channels=common.CHANNELS, out_channels=common.CHANNELS, kernel_size=3,
                ratio_gin=common.RATIO, ratio_gout=common.RATIO, padding=1, norm_layer=nn.BatchNorm2d,
                activation_layer=nn.ReLU, padding_type="reflect", enable_lfu=False)


def fused_backend_label(device) -> str:
    spectral, pointwise = common.fused_backend(device, has_cuda_impl=True), common.fused_backend(device)
    return spectral if spectral == pointwise else f"{spectral}+{pointwise}"


def make_cases(size, mode, device, args):
    h = w = common.bottleneck(size)
    cl = common.LOCAL_CHANNELS
    torch.manual_seed(args.seed)
    ref = common.randomize_batchnorm(reference.FFC_BN_ACT(**FFC_ARGS), args.seed).eval()
    fast = FastFFC_BN_ACT(**FFC_ARGS).eval()
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to(device), fast.to(device=device, dtype=mode.dtype)
    x = torch.randn(1, common.CHANNELS, h, w, device=device)
    x_ref = (x[:, :cl], x[:, cl:])
    xf = x.to(mode.dtype)
    x_fast = (xf[:, :cl], xf[:, cl:])

    def fused():
        out = fast(x_fast)
        if fast.last_path != "fused":
            raise RuntimeError(f"FastFFC_BN_ACT ran its {fast.last_path} path, not the fused one")
        return out

    note = None
    if mode.dtype != torch.float32:
        note = "reference in fp32 with TF32: LaMa's FourierUnit cannot run in bf16"
    label = fused_backend_label(device)
    act = common.esize(mode.dtype)
    providers = [
        common.Provider("eager", lambda: ref(x_ref), "torch", common.ffc_bn_act_traffic("eager", h, w, common.F32),
                        check=False),
        common.compile_provider(ref, x_ref, enabled=args.compile_here),
        common.Provider("fused", fused, label,
                        common.ffc_bn_act_traffic("fused", h, w, act) if "torch" not in label else None),
    ]
    yield common.Case(
        op="ffc_bn_act", case="512-r0.75-3x3", size=size,
        shape={"B": 1, "C": common.CHANNELS, "local": cl, "global": common.GLOBAL_CHANNELS, "H": h, "W": w, "k": 3},
        flops=common.ffc_bn_act_flops(h, w), providers=providers,
        reference=lambda: ref(x_ref), tolerance=common.TOLERANCE[mode.name], mode=mode, note=note)


# ------------------------------------------------------------------------------------- pytest

@pytest.mark.parametrize("provider", ["eager", "compile", "fused"])
def test_ffc_bn_act(benchmark, provider, bench_device, bench_compile):
    case = common.pytest_single_case(make_cases, common.script_parser(__doc__), bench_device, bench_compile)
    common.pytest_case(case, provider, benchmark, bench_device)


def test_ffc_bn_act_models_match_aten_count():
    """The hand-written FLOP model equals torch's FlopCounterMode (+ FFTs) on the real modules, and
    the byte models agree with a mechanical per-op count within what that count cannot see (the
    FFTs' internal copies and scale passes inside cuFFT/pocketfft calls)."""
    h = w = 16
    with torch.device("meta"):
        ref = reference.FFC_BN_ACT(**FFC_ARGS).eval()
        fast = FastFFC_BN_ACT(**FFC_ARGS).eval()
        x = torch.randn(1, common.CHANNELS, h, w)
    x = (x[:, :common.LOCAL_CHANNELS], x[:, common.LOCAL_CHANNELS:])
    eager, fused = common.count_model(ref, x), common.count_model(fast, x)
    assert eager["flops"] == pytest.approx(common.ffc_bn_act_flops(h, w), rel=1e-9)
    c, n, p = common.FU_CHANNELS, common.spectral_points(h, w), h * w
    # The per-op count sees rfftn/irfftn as one op each (its ortho scales and the C2R input copy
    # run inside them), stack's two strided reads as 4CN each, and bn_l/bn_g's small parameters.
    invisible_eager = 8 * c * n * 2 + 8 * c * n * 2 + 4 * c * p * 2
    invisible_fused = 8 * c * n * 2
    model_eager = common.ffc_bn_act_traffic("eager", h, w, common.F32).total
    model_fused = common.ffc_bn_act_traffic("fused", h, w, common.F32).total
    assert eager["bytes"] == pytest.approx(model_eager - invisible_eager, rel=0.01)
    assert fused["bytes"] == pytest.approx(model_fused - invisible_fused, rel=0.01)


if __name__ == "__main__":
    sys.exit(common.run_script(common.script_parser(__doc__), make_cases))
