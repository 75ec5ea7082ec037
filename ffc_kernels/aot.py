"""Ahead-of-time compilation of every kernel variant for sm_80, sm_86, sm_89 and sm_90, no GPU needed.

``python -m ffc_kernels.aot`` (without TRITON_INTERPRET=1, which turns kernels into Python) compiles each
kernel variant and launch config the way Triton's JIT does at LaMa's shapes, and prints per variant and
architecture: registers, spill bytes, shared memory, the matmul instruction the dots lowered to (wgmma
and its shape on sm_90, mma.sync on sm_80/86/89, plain FMAs for IEEE fp32), the number of distinct MMA
layouts in the TTGIR and of layout conversions between them (each one a round trip of the accumulator
through shared memory), the barriers in the PTX, and on sm_90 the time the variant would take on an H100
SXM at big-lama's 2048² bottleneck if it ran at the roofline (ffc_kernels/roofline.py), with its bound.

    python -m ffc_kernels.aot [--json] [--readme] [--dump DIR] [--arch 90 ...] [--jobs N]

``--dump DIR`` writes each build's TTGIR and PTX as DIR/<kernel>__<variant>__sm<arch>.ttgir and .ptx.
The tests (tests/test_aot_compile.py) assert on the same records.

The JIT specialises on argument values: pointers 16-byte aligned and integers divisible by 16 get
``tt.divisibility = 16``, integers equal to 1 become constants, and integers take i32 or i64 by their
range. A variant's signature gives each integer its value at LaMa's shapes (or a type, for arguments
whose value lives in ``_LAMA_VALUES``), so the report compiles the code that runs.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ffc_kernels import roofline
from ffc_kernels.ops import pointwise_conv, spectral_mix

ARCHS = (80, 86, 89, 90)
# Bytes per block, opt-in maximum (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
BOTTLENECK = roofline.bottleneck("big-lama", 2048)
# A photo's size, padded to a multiple of 8, rarely makes W a multiple of 16 at the bottleneck: then the
# JIT cannot specialise sizes and strides, and a kernel must not spill there either (1008 x 752 here).
UNALIGNED = dataclasses.replace(BOTTLENECK, height=126, width=94)

_INT_TYPES = ("i1", "i8", "i16", "i32", "i64", "u1", "u8", "u16", "u32", "u64")
_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _spectral_mix_lama_values():
    b = BOTTLENECK
    ci = co = b.fu_channels
    n = b.spectral_points
    # Strides in floats of the complex64 spectrum's real view, (B, C, H, Wf, 2) contiguous.
    return dict(CI=ci, CO=co, N=n, stride_xb=2 * ci * n, stride_xc=2 * n, stride_ob=2 * co * n, stride_oc=2 * n)


# Integer arguments a variant's signature gives as a type only: their values at LaMa's shapes.
_LAMA_VALUES = {"_spectral_mix_kernel": _spectral_mix_lama_values()}


@dataclasses.dataclass
class KernelBuild:
    kernel: str
    variant: str
    arch: int
    config: tuple
    precision: str  # the dot flavour: tf32x3 (split TF32, fp32-class), tf32, bf16
    registers: int
    spill_bytes: int
    shared: int
    mma: str  # "wgmma m64n128k8 tf32", "mma m16n8k8 bf16", ...; "fma" when no tensor-core instruction is present
    mma_layouts: int  # distinct #ttg.nvidia_mma encodings in the TTGIR
    mma_conversions: int  # ttg.convert_layout from one MMA encoding to another
    barriers: int  # bar.sync / barrier.sync instructions in the PTX
    gbytes: float  # at big-lama's 2048² bottleneck, one pass over each operand
    gflops: float  # issued: tile padding and split-precision passes included
    modeled_us: float | None  # on an H100 SXM at the roofline; sm_90 builds only
    bound: str | None  # "memory" or "compute", with modeled_us
    target_us: float | None  # the same bytes at 70% of HBM bandwidth, the goal for TF32 and BF16


def _spectral_mix_variants():
    sig = {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32",
           "CI": "i32", "CO": "i32", "N": "i32",
           "stride_xb": "i64", "stride_xc": "i64", "stride_ob": "i64", "stride_oc": "i64",
           "weight_scale": "fp32", "bias_scale": "fp32"}
    for precision in ("tf32x3", "tf32", "bf16"):
        for config in spectral_mix.kernel_configs(precision):
            flags = dict(HAS_BIAS=True, RELU=True, PRECISION=precision)
            yield spectral_mix._spectral_mix_kernel, f"{precision}", sig, flags, config


def _pointwise_conv_lama_values(case: str, b: roofline.Bottleneck):
    plane = b.pixels
    ci, co = (b.global_channels, b.fu_channels) if case == "conv1" else (b.fu_channels, b.global_channels)
    # x (B, CI, H, W), addend like x, residual and out (B, CO, H, W), all NCHW; LaMa's LFU input is the
    # (H/2, W/2) tile; the launcher passes x's strides for a missing addend or tiled input and out's for
    # a missing residual, which the JIT specialises like any other argument.
    th, tw = (b.height // 2, b.width // 2) if case == "conv2+lfu" else (b.height, b.width)
    values = dict(CI=ci, CO=co, W=b.width, P=plane, TH=th, TW=tw)
    for t, channels, (h, w) in (("x", ci, (b.height, b.width)), ("a", ci, (b.height, b.width)),
                                ("t", ci, (th, tw)), ("r", co, (b.height, b.width)), ("o", co, (b.height, b.width))):
        values.update({f"s{t}b": channels * h * w, f"s{t}c": h * w, f"s{t}h": w, f"s{t}w": 1})
    return values


def _pointwise_conv_variants(arch: int):
    """conv1: 1x1 + folded BatchNorm + ReLU; conv2: over x + fu(x) with the FFC's residual (big-lama);
    conv2+lfu: the same with LaMa's LFU addend tiled 2x2. The dtype names the model's activations:
    in a bf16 model conv1 reads bf16 and writes fp32 (the FFTs' input), conv2 reads the FFTs' fp32
    and the bf16 residual and writes bf16. Each at big-lama's 2048² bottleneck, then at UNALIGNED
    (variant names ending in "@HxW")."""
    def sig(case, bottleneck, x, r, o):
        s = {name: "*fp32" for name in ("x_ptr", "a_ptr", "t_ptr", "w_ptr", "b_ptr")}
        s.update(x_ptr=f"*{x}", r_ptr=f"*{r}", out_ptr=f"*{o}")
        return dict(s, **_pointwise_conv_lama_values(case, bottleneck))

    conv1 = dict(HAS_ADDEND=False, HAS_TILED=False, HAS_BIAS=True, HAS_RESIDUAL=False, RELU=True)
    conv2 = dict(HAS_ADDEND=True, HAS_TILED=False, HAS_BIAS=True, HAS_RESIDUAL=True, RELU=True)
    lfu = dict(conv2, HAS_TILED=True)
    cases = [("conv1", conv1, "fp32", ("fp32", "fp32", "fp32")), ("conv1", conv1, "bf16", ("bf16", "fp32", "fp32")),
             ("conv2", conv2, "fp32", ("fp32", "fp32", "fp32")), ("conv2", conv2, "bf16", ("fp32", "bf16", "bf16")),
             ("conv2+lfu", lfu, "fp32", ("fp32", "fp32", "fp32"))]
    for bottleneck, suffix in ((BOTTLENECK, ""), (UNALIGNED, f" @{UNALIGNED.height}x{UNALIGNED.width}")):
        for case, flags, model_dtype, dtypes in cases:
            for precision in (("tf32x3", "tf32", "bf16") if model_dtype == "fp32" else ("bf16",)):
                for config in pointwise_conv.kernel_configs(arch, precision):
                    yield (pointwise_conv._pointwise_conv_kernel, f"{case} {model_dtype} {precision}{suffix}",
                           sig(case, bottleneck, *dtypes), dict(flags, PRECISION=precision, FLAT_PLANES=True), config)


def variants(arch: int):
    yield from _spectral_mix_variants()
    yield from _pointwise_conv_variants(arch)


def jit_specialization(kernel, signature: dict):
    """(signature, constexprs, attrs) for ``triton.compile`` as Triton's JIT derives them from the values.

    Pointers are taken 16-byte aligned (torch's allocations are, and LaMa's channel slices start at
    multiples of 16 elements). ``signature`` maps each non-constexpr argument to a type, or an integer
    argument to its value; an integer given as a type with no value in ``_LAMA_VALUES`` is compiled
    unspecialised, as the JIT compiles a value that is not a multiple of 16.
    """
    values = dict(_LAMA_VALUES.get(kernel.__name__, {}))
    sig, constexprs, attrs = {}, {}, {}
    for name, kind in signature.items():
        index = (kernel.arg_names.index(name),)
        if isinstance(kind, int):
            kind, values[name] = "i32", kind
        if kind.startswith("*"):
            attrs[index] = [["tt.divisibility", 16]]
        elif kind in _INT_TYPES and name in values:
            value = values[name]
            if value == 1:
                sig[name], constexprs[name] = "constexpr", 1
                continue
            kind = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[index] = [["tt.divisibility", 16]]
        sig[name] = kind
    return sig, constexprs, attrs


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_arch(arch: int) -> str:
    return "sm_90a" if arch == 90 else f"sm_{arch}"


def _resource_usage(ptx: str, arch: int):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas(), f"-arch={_ptxas_arch(arch)}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def mma_instructions(ptx: str) -> str:
    """The tensor-core instructions in ``ptx``, as "wgmma m64n128k8 tf32" (several joined by " + ")."""
    found = sorted(set(re.findall(r"\bwgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.(\w+)", ptx)))
    if found:
        return " + ".join(f"wgmma {shape} {dtype}" for shape, dtype in found)
    found = sorted(set(re.findall(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.f32\.(\w+)", ptx)))
    return " + ".join(f"mma {shape} {dtype}" for shape, dtype in found) or "fma"


def mma_layouts(ttgir: str) -> set:
    """Names of the distinct MMA encodings (#mma, #mma1, ...) the TTGIR defines."""
    return set(re.findall(r"^#(\w+) = #ttg\.nvidia_mma<", ttgir, flags=re.M))


def mma_conversions(ttgir: str) -> int:
    """convert_layout ops whose source and result are two different MMA encodings."""
    mma = mma_layouts(ttgir)
    pairs = re.findall(r"ttg\.convert_layout [^:]*: tensor<[^,<>]*, #(\w+)> -> tensor<[^,<>]*, #(\w+)>", ttgir)
    return sum(1 for src, dst in pairs if src in mma and dst in mma and src != dst)


def barriers(ptx: str) -> int:
    return len(re.findall(r"^\s*(?:bar|barrier)\.sync\b", ptx, flags=re.M))


def _element_bytes(pointer_type: str) -> int:
    return _ELEMENT_BYTES[pointer_type.lstrip("*")]


def _spectral_mix_roofline(signature, flags, config) -> roofline.Roofline:
    values = dict(_LAMA_VALUES["_spectral_mix_kernel"], **{k: v for k, v in signature.items() if isinstance(v, int)})
    ci, co, n = values["CI"], values["CO"], values["N"]
    block_m, block_n, block_k = config[:3]
    batch = BOTTLENECK.batch
    # complex64 in and out; the real (2Co, 2Ci) weight and its bias stay in L2 after the first read.
    nbytes = batch * n * 8 * (ci + co) + 16 * ci * co + (8 * co if flags.get("HAS_BIAS") else 0)
    precision = flags["PRECISION"]
    flops = batch * roofline.issued_gemm_flops(2 * co, n, 2 * ci, 2 * block_m, block_n, 2 * block_k, precision)
    return roofline.Roofline(nbytes, flops, roofline.DOT_PASSES[precision][1])


def _pointwise_conv_roofline(signature, flags, config) -> roofline.Roofline:
    ci, co, p = signature["CI"], signature["CO"], signature["P"]
    block_m, block_n, block_k = config[:3]
    batch = BOTTLENECK.batch
    nbytes = batch * p * (ci * _element_bytes(signature["x_ptr"]) + co * _element_bytes(signature["out_ptr"]))
    if flags["HAS_ADDEND"]:
        nbytes += batch * p * ci * _element_bytes(signature["a_ptr"])
    if flags["HAS_TILED"]:
        nbytes += batch * signature["TH"] * signature["TW"] * ci * _element_bytes(signature["t_ptr"])
    if flags["HAS_RESIDUAL"]:
        nbytes += batch * p * co * _element_bytes(signature["r_ptr"])
    nbytes += 4 * co * ci + (4 * co if flags["HAS_BIAS"] else 0)
    precision = flags["PRECISION"]
    flops = batch * roofline.issued_gemm_flops(co, p, ci, block_m, block_n, block_k, precision)
    return roofline.Roofline(nbytes, flops, roofline.DOT_PASSES[precision][1])


_ROOFLINES = {"_spectral_mix_kernel": _spectral_mix_roofline, "_pointwise_conv_kernel": _pointwise_conv_roofline}


def file_stem(build: KernelBuild) -> str:
    """<kernel>__<variant>__sm<arch>, the variant with its config, safe as a file name."""
    variant = f"{build.variant} {'x'.join(map(str, build.config[:3]))} w{build.config[3]} s{build.config[4]}"
    return f"{build.kernel}__{re.sub(r'[^A-Za-z0-9.-]+', '_', variant)}__sm{build.arch}"


def compile_variant(kernel, variant, signature, flags, config, arch, dump=None) -> KernelBuild:
    block_m, block_n, block_k, num_warps, num_stages = config
    sig, constexprs, attrs = jit_specialization(kernel, signature)
    constexprs.update(flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    sig.update({name: "constexpr" for name in constexprs})
    sig = {name: sig[name] for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    registers, spills = _resource_usage(ptx, arch)
    model = _ROOFLINES[kernel.__name__](signature, flags, config)
    on_h100 = arch == 90
    build = KernelBuild(
        kernel.__name__, variant, arch, tuple(config), flags["PRECISION"], registers, spills, compiled.metadata.shared,
        mma_instructions(ptx), len(mma_layouts(ttgir)), mma_conversions(ttgir), barriers(ptx),
        model.bytes / 1e9, model.flops / 1e9,
        model.seconds * 1e6 if on_h100 else None, model.bound if on_h100 else None,
        model.target_seconds * 1e6 if on_h100 else None)
    if dump:
        for ext, text in (("ttgir", ttgir), ("ptx", ptx)):
            with open(os.path.join(dump, f"{file_stem(build)}.{ext}"), "w") as f:
                f.write(text)
    return build


def _compile_at(arch: int, index: int, dump):
    return compile_variant(*list(variants(arch))[index], arch, dump=dump)


def build_all(archs=ARCHS, jobs: int = 1, dump=None):
    """Every variant on every arch, compiled by ``jobs`` processes (the compiler holds the GIL)."""
    work = [(arch, i) for arch in archs for i in range(sum(1 for _ in variants(arch)))]
    if dump:
        os.makedirs(dump, exist_ok=True)
    if jobs <= 1:
        return [_compile_at(arch, i, dump) for arch, i in work]
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_at, *zip(*work), [dump] * len(work)))


def _us(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(builds) -> str:
    rows = [f"{'kernel':22s} {'variant':30s} {'arch':5s} {'BM,BN,BK,warps,stages':21s} {'regs':>4s} {'spill':>5s} "
            f"{'smem KB':>7s} {'mma':28s} {'lay':>3s} {'cvt':>3s} {'bar':>3s} {'GB':>6s} {'GFLOP':>6s} "
            f"{'H100 us':>7s} {'bound':7s} {'70%BW us':>8s}"]
    for b in builds:
        rows.append(f"{b.kernel:22s} {b.variant:30s} sm_{b.arch:<2d} {','.join(map(str, b.config)):21s} "
                    f"{b.registers:4d} {b.spill_bytes:5d} {b.shared / 1024:7.1f} {b.mma:28s} {b.mma_layouts:3d} "
                    f"{b.mma_conversions:3d} {b.barriers:3d} {b.gbytes:6.3f} {b.gflops:6.2f} {_us(b.modeled_us):>7s} "
                    f"{b.bound or '-':7s} {_us(b.target_us):>8s}")
    return "\n".join(rows)


def format_readme(builds) -> str:
    """Markdown for the README: the sm_90 builds at big-lama's 2048² bottleneck, one row per launch config."""
    b = BOTTLENECK
    rows = [f"Triton {triton.__version__}, sm_90 builds; big-lama at 2048²: batch {b.batch}, conv1 "
            f"{b.global_channels}->{b.fu_channels} and conv2 {b.fu_channels}->{b.global_channels} channels at "
            f"{b.height}x{b.width}, the spectral mix on {b.fu_channels} complex channels at {b.height}x"
            f"{b.width // 2 + 1}; H100 SXM peaks {roofline.HBM_BYTES_PER_S / 1e12:.2f} TB/s, "
            f"{roofline.PEAK_FLOPS['tf32'] / 1e12:.0f} TF32 and {roofline.PEAK_FLOPS['bf16'] / 1e12:.0f} "
            "BF16 TFLOP/s. Variant: op, model dtype, dot precision (tf32x3 = split TF32, fp32-class); conv2+lfu "
            "adds the LFU input, which big-lama does not use. The target, 70% of HBM bandwidth, is the goal for "
            "TF32 and BF16 (fp32-class has none).", "",
            "| kernel | variant | BM,BN,BK,warps,stages | MMA | layouts | barriers | spills | GB | GFLOP issued "
            "| modeled H100 SXM µs | bound | target µs (70% of HBM) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in builds:
        if b.arch == 90 and "@" not in b.variant:
            target = f"{b.target_us:.1f}" if b.precision in ("tf32", "bf16") else "-"
            op = b.kernel.strip("_").removesuffix("_kernel")
            rows.append(f"| {op} | {b.variant} | {','.join(map(str, b.config))} "
                        f"| {b.mma} | {b.mma_layouts} | {b.barriers} | {b.spill_bytes} | {b.gbytes:.3f} | "
                        f"{b.gflops:.2f} | {b.modeled_us:.1f} | {b.bound} | {target} |")
    rows += ["", "The whole FourierUnit there (fp32 data, a TF32 mix; cuFFT's two-pass R2C and C2R around the mix, "
             "`roofline.fourier_unit`), against the 150 µs target:", "",
             "| path | GB | modeled H100 SXM µs | bound |", "|---|---|---|---|"]
    for name, clone in (("rfft2 + Triton mix + irfft2 (torch clones the spectrum)", True),
                        ("csrc FourierUnit (C2R in place, no clone)", False)):
        fu = roofline.fourier_unit(BOTTLENECK, clone=clone)
        rows.append(f"| {name} | {fu.bytes / 1e9:.3f} | {fu.seconds * 1e6:.1f} | {fu.bound} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    parser.add_argument("--readme", action="store_true", help="print the sm_90 rows as the README's markdown table")
    parser.add_argument("--dump", metavar="DIR", help="write each build's TTGIR and PTX into DIR")
    parser.add_argument("--arch", type=int, choices=ARCHS, action="append", help="only these archs (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: CPUs)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("ffc_kernels.aot compiles real kernels: run it without TRITON_INTERPRET=1")
    builds = build_all(tuple(args.arch or ARCHS), jobs=args.jobs, dump=args.dump)
    if args.json:
        print(json.dumps([dataclasses.asdict(b) for b in builds]))
    elif args.readme:
        print(format_readme(builds))
    else:
        print(format_table(builds))


if __name__ == "__main__":
    main()
