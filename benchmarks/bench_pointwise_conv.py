"""pointwise_conv: SpectralTransform's two 1x1 convolutions with their BatchNorm, sums, residual and ReLU fused.

Cases at LaMa's bottleneck (384 global channels, 192 in the Fourier unit):
- conv1: conv1 384 -> 192, BatchNorm, ReLU (fused: fp32 output, as it feeds the FFTs);
- conv2: bn_g(conv2(x + fu(x) + 0) + convl2g(x_l)), ReLU, 192 -> 384, written into a channel
  slice of the FFC's 512-channel output (big-lama: LFU off, hence LaMa's ``+ 0`` pass);
- conv2-lfu: the same with the local Fourier unit's tiled output (``tiled``, a quarter plane).
Providers: eager = LaMa's modules (reference.SpectralTransform's conv1/conv2, BatchNorm2d, ReLU),
torch.compile of that, fused = ``pointwise_conv`` with BatchNorm folded. Bytes per the op header.

    python benchmarks/bench_pointwise_conv.py [--sizes 512 1024 2048 4096] [--device cuda] [--dtype fp32 bf16]
    python -m pytest benchmarks/bench_pointwise_conv.py --benchmark-only
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import common  # noqa: E402
from ffc_kernels import reference  # noqa: E402
from ffc_kernels.fold import batchnorm_affine, fold  # noqa: E402
from ffc_kernels.ops.pointwise_conv import pointwise_conv  # noqa: E402

CASES = ("conv1", "conv2", "conv2-lfu")


class LamaConv2(nn.Module):
    """SpectralTransform.conv2 and the FFC's global epilogue, as LaMa computes them."""

    def __init__(self, st: reference.SpectralTransform, bn_g: nn.BatchNorm2d):
        super().__init__()
        self.st, self.bn_g, self.act_g = st, bn_g, nn.ReLU(inplace=True)

    def forward(self, x, output, xs, l2g):
        if xs is not None:
            xs = xs.repeat(1, 1, 2, 2).contiguous()
        else:
            xs = 0
        return self.act_g(self.bn_g(l2g + self.st.conv2(x + output + xs)))


def make_cases(size, mode, device, args):
    h = w = common.bottleneck(size)
    p = h * w
    cg, c_fu, cl = common.GLOBAL_CHANNELS, common.FU_CHANNELS, common.LOCAL_CHANNELS
    dt, act = mode.dtype, common.esize(mode.dtype)
    default = common.fused_backend(device)
    for name in CASES:
        if name not in args.cases:
            continue
        torch.manual_seed(args.seed)
        lfu = name == "conv2-lfu"
        st = reference.SpectralTransform(cg, cg, enable_lfu=lfu)
        bn_g = nn.BatchNorm2d(cg)
        common.randomize_batchnorm(st, args.seed), common.randomize_batchnorm(bn_g, args.seed + 1)
        st, bn_g = st.eval().to(device), bn_g.eval().to(device)
        if name == "conv1":
            ref_module = st.conv1
            x32 = torch.randn(1, cg, h, w, device=device)
            ref_inputs = (x32,)
            w1, b1 = fold(st.conv1[0].weight, batchnorm_affine(st.conv1[1]))
            w1, b1 = w1.flatten(1).float(), b1.float()
            x = x32.to(dt)
            t_out = torch.empty(1, c_fu, h, w, device=device)  # fp32, as FastFFC feeds the FFTs

            def fused(x=x, w1=w1, b1=b1, t_out=t_out):
                return pointwise_conv(x, w1, b1, relu=True, out=t_out)

            ci, co = cg, c_fu
            traffic = {k: common.conv1_traffic(k, cg, c_fu, p, act) for k in ("eager", "fused")}
        else:
            ref_module = LamaConv2(st, bn_g).eval()
            t = torch.randn(1, c_fu, h, w, device=device)
            f = torch.randn(1, c_fu, h, w, device=device)
            xs = torch.randn(1, c_fu, h // 2, w // 2, device=device) if lfu else None
            l2g = torch.randn(1, cg, h, w, device=device)
            ref_inputs = (t, f, xs, l2g)
            w2, b2 = fold(st.conv2.weight, batchnorm_affine(bn_g))
            w2, b2 = w2.flatten(1).float(), b2.float()
            # FastFFC folds bn_g's scale into convl2g's weights: its residual arrives scaled.
            residual = (l2g * batchnorm_affine(bn_g)[0].float()[:, None, None]).to(dt)
            out_buffer = torch.empty(1, cl + cg, h, w, device=device, dtype=dt)  # the FFC's [local | global]

            def fused(t=t, f=f, xs=xs, w2=w2, b2=b2, residual=residual, out_buffer=out_buffer):
                return pointwise_conv(t, w2, b2, addend=f, tiled=xs, residual=residual, relu=True,
                                      out=out_buffer[:, cl:])

            ci, co = c_fu, cg
            traffic = {k: common.conv2_traffic(k, c_fu, cg, p, act, lfu=lfu) for k in ("eager", "fused")}
        eager_module = ref_module if dt == torch.float32 else copy.deepcopy(ref_module).to(dt)
        eager_inputs = tuple(None if i is None else i.to(dt) for i in ref_inputs)
        providers = [
            common.Provider("eager", (lambda m=eager_module, i=eager_inputs: m(*i)), "torch", traffic["eager"],
                            check=dt != torch.float32),
            common.compile_provider(eager_module, *eager_inputs, enabled=args.compile_here),
            common.Provider("fused", fused, default, traffic["fused"] if default != "torch" else None),
        ]
        yield common.Case(
            op="pointwise_conv", case=name, size=size,
            shape={"B": 1, "Ci": ci, "Co": co, "H": h, "W": w} | ({"tile": [h // 2, w // 2]} if lfu else {}),
            flops=common.pointwise_conv_flops(ci, co, p), providers=providers,
            reference=(lambda m=ref_module, i=ref_inputs: m(*i)),
            tolerance=common.TOLERANCE[mode.name], mode=mode)


def parser():
    parser = common.script_parser(__doc__)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    return parser


# ------------------------------------------------------------------------------------- pytest

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("provider", ["eager", "compile", "fused"])
def test_pointwise_conv(benchmark, case, provider, bench_device, bench_compile):
    cases = common.pytest_cases(make_cases, parser(), bench_device, bench_compile)
    common.pytest_case(cases[case], provider, benchmark, bench_device)


if __name__ == "__main__":
    sys.exit(common.run_script(parser(), make_cases))
