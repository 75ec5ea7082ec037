"""End to end: big-lama's generator (51M parameters, 18 FFC residual blocks) on one image.

The generator is lama_fast's seeded random big-lama (``lama_fast.demo.demo_generator``: trained-
like weight scales, calibrated BatchNorm statistics, a pre-sigmoid output with standard deviation
above 1), fed LaMa's input (masked RGB + mask) built from the demo image and mask. Providers:
eager = LaMa's reference generator, compile = torch.compile of it, fused = ``lama_fast.optimize``
of a copy at the mode's precision (fp32, tf32, bf16). Every fused output is compared with the
reference in IEEE fp32: relative error, max |difference|, PSNR (on [0, 1]) and SNR =
10 log10(var(reference) / MSE), which a near-constant output cannot pass.

On the CPU the run also times a lone 3x3 convolution of LaMa's bottleneck shape (512 -> 512
channels, 64 x 64, channels_last) in fp32 and bf16: r = its bf16 speedup, the ceiling the
machine gives bf16 (about 2 on AVX512-BF16, about 10 with AMX); the bf16 target is 1.1 r.
FLOPs: torch's FlopCounterMode (all convolutions) + the FFTs at 5 N log2 N; bytes: every aten op
of one forward counted on the meta device (``common.count_model``).

    python benchmarks/bench_generator.py [--sizes 512 1024 2048] [--device cuda] [--modes fp32 bf16]
    python -m pytest benchmarks/bench_generator.py --benchmark-only
"""
from __future__ import annotations

import copy
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import lama_fast  # noqa: E402
from lama_fast.demo import demo_generator  # noqa: E402
from lama_fast.optimized import plan_info  # noqa: E402
from lama_fast.sweep import accuracy, lama_input  # noqa: E402

SIZES = (512, 1024, 2048)


@functools.lru_cache(maxsize=1)
def _generator(seed: int):
    return demo_generator(seed=seed)


@functools.lru_cache(maxsize=None)
def model_flops(size: int) -> float:
    """FLOPs of one forward, counted on the meta device."""
    with torch.device("meta"):
        eager = lama_fast.build_generator("big-lama")
        x = torch.randn(1, 4, size, size)
    return common.count_model(eager, x)["flops"]


def make_cases(size, mode, device, args):
    reference = copy.deepcopy(_generator(args.seed)).to(device)
    fast = lama_fast.optimize(copy.deepcopy(reference), precision=mode.name)
    x = lama_input(size, device)
    checked = []

    def fused():
        out = fast(x)
        if not checked:  # once: the whole-generator plan must have run, at the asked precision
            info = plan_info(fast)
            if info["runs"] is None:
                raise RuntimeError(f"the optimized generator did not run its plan: {info['why_not']}")
            checked.append(info)
        return out

    def fp32_reference():  # IEEE fp32 whatever the mode: the accuracy baseline of every precision
        with common.precision(common.MODES["fp32"]):
            return reference(x)

    note = None
    if mode.name != "fp32":
        note = "eager and compile run the reference with TF32 (LaMa cannot run bf16); accuracy is against fp32"
    providers = [
        common.Provider("eager", lambda: reference(x), "torch", check=False),
        common.compile_provider(reference, x, enabled=args.compile_here),
        common.Provider("fused", fused, common.fused_backend(device)),
    ]
    yield common.Case(
        op="generator", case="big-lama", size=size, shape={"B": 1, "C": 4, "H": size, "W": size},
        flops=model_flops(size), providers=providers, reference=fp32_reference,
        tolerance=common.TOLERANCE[mode.name], mode=mode, note=note, metrics=accuracy)


def lone_convolution(device, rounds: int = 5) -> dict:
    """A 3x3 convolution of the bottleneck's shape in fp32 and bf16 (channels_last): r = bf16 speedup."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 512, 66, 66, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(512, 512, 3, 3, generator=g) * 0.02).to(device).contiguous(memory_format=torch.channels_last)
    fns = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xd, wd = x.to(dtype), w.to(dtype)
        fns[name] = (lambda xd=xd, wd=wd: F.conv2d(xd, wd))
    with torch.inference_mode(), common.precision(common.MODES["fp32"]):
        if torch.device(device).type == "cuda":
            timings = {n: common.time_gpu(f) for n, f in fns.items()}
        else:
            timings = common.time_cpu_paired(fns, rounds=rounds)
    flops = 2 * 512 * 512 * 9 * 64 * 64
    out = {"shape": "512->512, 3x3, 64x64, channels_last", "flops": flops}
    for name, t in timings.items():
        out[f"{name}_ms"] = t.median_ms
        out[f"{name}_tflops"] = flops / (t.median_ms * 1e-3) / 1e12
    out["r"] = out["fp32_ms"] / out["bf16_ms"]
    return out


def setup(results, args, device):
    conv = lone_convolution(device)
    results.set("lone_conv", conv)
    print(f"# {common.device_name(device)}: lone 3x3 convolution ({conv['shape']}): fp32 {conv['fp32_ms']:.2f} ms "
          f"({conv['fp32_tflops']:.3f} TFLOP/s), bf16 {conv['bf16_ms']:.2f} ms ({conv['bf16_tflops']:.3f} TFLOP/s): "
          f"r = {conv['r']:.2f}", flush=True)


def summary(rows, conv) -> str:
    """The model's ratios next to r: fused vs eager per mode and size, with the accuracy (the
    results file may also hold other benchmarks' rows)."""
    rows = [r for r in rows if r.get("op") == "generator"]
    eager = {(r["size"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "eager" and r["median_ms"]}
    fp32_eager = {size: ms for (size, mode), ms in eager.items() if mode == "fp32"}
    lines = [f"# r (lone bf16 convolution speedup) = {conv['r']:.2f}; bf16 target min(5, 1.1 r) = "
             f"{min(5, 1.1 * conv['r']):.2f}x"]
    for r in rows:
        if r["provider"] != "fused" or not r["median_ms"] or r.get("max_abs") is None:
            continue
        base = fp32_eager.get(r["size"]) or eager.get((r["size"], r["mode"]))
        lines.append(f"# {r['size']}² {r['mode']}: optimized {r['median_ms']:.0f} ms, {base / r['median_ms']:.2f}x "
                     f"LaMa's eager fp32; max |Δ| {r['max_abs']:.2e}, PSNR {r['psnr_db']:.1f} dB, "
                     f"SNR {r['snr_db']:.1f} dB")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- pytest

@pytest.mark.parametrize("provider", ["eager", "compile", "fused"])
def test_generator(benchmark, provider, bench_device, bench_compile):
    case = common.pytest_single_case(make_cases, common.script_parser(__doc__), bench_device, bench_compile)
    common.pytest_case(case, provider, benchmark, bench_device, rounds=1)


def main(argv=None) -> int:
    parser = common.script_parser(__doc__, sizes=SIZES)
    holder = {}

    def run_setup(results, args, device):
        setup(results, args, device)
        holder["results"] = results

    start = time.perf_counter()
    code = common.run_script(parser, make_cases, argv, setup=run_setup)
    results = holder.get("results")
    if results is not None:
        print(summary(results.data["rows"], results.data["lone_conv"]))
        print(f"# {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
