"""Nsight Compute's view of the Triton kernels at big-lama's 2048² bottleneck.

    python benchmarks/ncu_ops.py --out DIR [--precisions bf16 tf32]

Runs ``ncu`` (Nsight Compute, which must be on PATH) on this same script in its ``--child`` mode,
which calls each fused op a few times on the Triton backend at the bottleneck's shapes (batch 1,
256x256, the spectral mix on 192 complex channels at 256x129, conv1 384 -> 192, conv2 192 -> 384
with the FourierUnit's output as addend and a residual, the reflection pad of [x_l | x_g], 128 +
384 channels), and keeps ncu's speed-of-light, memory, launch and occupancy sections for the
last calls of each kernel as ``ncu_<device>.csv`` in ``--out``. The question it answers: why a
kernel whose compiled code is modeled at tens of µs takes hundreds (seen on an H200: the
spectral mix 0.375 ms in bf16 against 30 µs modeled, conv2 0.2-0.5 ms against 60-90 µs).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KERNELS = "_spectral_mix_kernel|_pointwise_conv_kernel|_reflect_pad_kernel"
SECTIONS = ["SpeedOfLight", "MemoryWorkloadAnalysis", "LaunchStats", "Occupancy"]
CALLS = 3  # per op and precision; ncu profiles the last ones


def child(precisions, device="cuda", size=256) -> None:
    """Each op a few times on Triton at the bottleneck's shapes (what ncu records), with the
    operands the optimized generator gives them: fp32 weights, conv1's output and the
    FourierUnit's fp32 NCHW, activations channels_last in the model's dtype."""
    os.environ["FFC_KERNELS_BACKEND"] = "triton"
    from ffc_kernels.ops import dense
    from ffc_kernels.ops.pointwise_conv import pointwise_conv
    from ffc_kernels.ops.spectral_mix import pack_bias, pack_weight, spectral_mix

    torch.manual_seed(0)
    dev = torch.device(device)
    n, h, w, ci, cg, cl = 1, size, size, 192, 384, 128
    spec = torch.fft.rfft2(torch.randn(n, ci, h, w, device=dev))
    packed, packed_bias = pack_weight(torch.randn(2 * ci, 2 * ci, device=dev) / 20), \
        pack_bias(torch.randn(2 * ci, device=dev))
    w1, b1 = torch.randn(ci, cg, device=dev) / 20, torch.randn(ci, device=dev)
    w2 = torch.randn(cg, ci, device=dev) / 14
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        x_g = torch.randn(n, cg, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x_l = torch.randn(n, cl, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        t = torch.empty(n, ci, h, w, device=dev)
        f = torch.randn(n, ci, h, w, device=dev)
        for _ in range(CALLS):
            spectral_mix(spec, packed, packed_bias, relu=True, precision=precision)
            pointwise_conv(x_g, w1, b1, relu=True, out=t, precision=precision)
            y = x_g.clone()
            pointwise_conv(t, w2, None, addend=f, residual=y, relu=True, out=y, precision=precision)
            dense.reflect_pad_cat((x_l, x_g), 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for ncu_<device>.csv")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "tf32"], choices=["bf16", "tf32", "fp32"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.precisions)
        return 0
    if not torch.cuda.is_available():
        print("ncu_ops: needs a CUDA GPU", file=sys.stderr)
        return 2
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu_ops: Nsight Compute (ncu) is not on PATH", file=sys.stderr)
        return 2
    import common

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"ncu_{common.device_slug(torch.device('cuda'))}.csv"
    cmd = [ncu, "--csv", "--clock-control", "none", "--kernel-name", f"regex:{KERNELS}",
           *[a for s in SECTIONS for a in ("--section", s)],
           sys.executable, str(Path(__file__).resolve()), "--child", "--precisions", *args.precisions]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    # ncu prints its own lines (==PROF==) before the CSV; keep the CSV rows.
    rows = [line for line in proc.stdout.splitlines() if line.startswith('"')]
    csv.write_text("\n".join(rows) + "\n")
    print(f"ncu_ops: {len(rows) - 1 if rows else 0} metric rows in {csv} (ncu exit {proc.returncode})")
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
