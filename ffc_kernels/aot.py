"""Ahead-of-time compilation of every kernel and launch config for sm_80 and sm_90, no GPU needed.

``python -m ffc_kernels.aot`` (without TRITON_INTERPRET=1, which turns kernels into Python) prints, per kernel variant and architecture: registers, spill
bytes, shared memory, and the matmul instructions the dots lowered to (wgmma on sm_90, mma on
sm_80, plain FMAs for IEEE fp32). The tests assert on the same records.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ffc_kernels.ops import pointwise_conv, spectral_mix

ARCHS = (80, 90)
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block, opt-in maximum


@dataclasses.dataclass
class KernelBuild:
    kernel: str
    variant: str
    arch: int
    config: tuple
    registers: int
    spill_bytes: int
    shared: int
    mma: str  # "wgmma", "mma", or "fma" when no tensor-core instruction is present


def _spectral_mix_variants():
    sig = {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32",
           "CI": "i32", "CO": "i32", "N": "i32",
           "stride_xb": "i64", "stride_xc": "i64", "stride_ob": "i64", "stride_oc": "i64",
           "weight_scale": "fp32", "bias_scale": "fp32"}
    for precision in ("tf32x3", "tf32", "bf16"):
        for config in spectral_mix.kernel_configs(precision):
            flags = dict(HAS_BIAS=True, RELU=True, PRECISION=precision)
            yield spectral_mix._spectral_mix_kernel, f"{precision}", sig, flags, config


def _pointwise_conv_variants():
    def sig(dtype):
        s = {name: "*fp32" for name in ("x_ptr", "a_ptr", "t_ptr", "w_ptr", "b_ptr", "r_ptr", "out_ptr")}
        s.update(x_ptr=f"*{dtype}", r_ptr=f"*{dtype}", out_ptr=f"*{dtype}")
        s.update({name: "i32" for name in ("CI", "CO", "W", "P", "TH", "TW")})
        for t in "xatro":
            s.update({f"s{t}{d}": "i64" for d in "bchw"})
        return s

    conv1 = dict(HAS_ADDEND=False, HAS_TILED=False, HAS_BIAS=True, HAS_RESIDUAL=False, RELU=True)
    conv2 = dict(HAS_ADDEND=True, HAS_TILED=True, HAS_BIAS=True, HAS_RESIDUAL=True, RELU=True)
    for name, flags, dtype, precisions in (("conv1", conv1, "fp32", ("tf32x3", "tf32", "bf16")),
                                           ("conv2+lfu", conv2, "fp32", ("tf32x3", "tf32", "bf16")),
                                           ("conv2+lfu", conv2, "bf16", ("bf16",))):
        for precision in precisions:
            for config in pointwise_conv.kernel_configs():
                yield (pointwise_conv._pointwise_conv_kernel, f"{name} {dtype} {precision}", sig(dtype),
                       dict(flags, PRECISION=precision), config)


def variants():
    yield from _spectral_mix_variants()
    yield from _pointwise_conv_variants()


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _resource_usage(ptx: str, arch: int):
    arch_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas(), f"-arch={arch_name}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def compile_variant(kernel, variant, signature, flags, config, arch) -> KernelBuild:
    block_m, block_n, block_k, num_warps, num_stages = config
    constexprs = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    registers, spills = _resource_usage(ptx, arch)
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma"
    return KernelBuild(kernel.__name__, variant, arch, config, registers, spills, compiled.metadata.shared, mma)


def build_all():
    return [compile_variant(*v, arch) for arch in ARCHS for v in variants()]


def format_table(builds) -> str:
    rows = [f"{'kernel':24s} {'variant':22s} {'arch':5s} {'BM,BN,BK,warps,stages':22s} {'regs':>4s} "
            f"{'spill':>5s} {'smem KB':>7s} {'dot':5s}"]
    for b in builds:
        rows.append(f"{b.kernel:24s} {b.variant:22s} sm_{b.arch:<2d} {','.join(map(str, b.config)):22s} "
                    f"{b.registers:4d} {b.spill_bytes:5d} {b.shared / 1024:7.1f} {b.mma:5s}")
    return "\n".join(rows)


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("ffc_kernels.aot compiles real kernels: run it without TRITON_INTERPRET=1")
    builds = build_all()
    print(json.dumps([dataclasses.asdict(b) for b in builds]) if args.json else format_table(builds))


if __name__ == "__main__":
    main()
