"""Where the optimized generator's GPU time goes: per step, per kernel, and the alternatives.

    python benchmarks/profile_gpu.py [--size 2048] [--precisions bf16 tf32 fp32] [--out DIR]

For each precision, on big-lama's seeded demo generator at one size (one call of a few minutes):

1. end to end, CUDA-graph replay (``triton.testing.do_bench`` medians): LaMa's eager generator (TF32
   as in bench_generator.py, IEEE for fp32), the optimized plan, and three plan variants: reflection
   padding of whole planes instead of border recomputation (``dense.FIXUP_MIN_PIXELS``), the
   output convolution without its 2x2-block form (``optimized._S2D_MAX_CHANNELS``), and the
   residual blocks' three exchange convolutions run separately with border recomputation
   (``optimized._MERGED_EXCHANGE = False``, the CPU's bf16 form);
2. the plan step by step (stem, downsampling, each residual block, upsampling, output), each
   timed alone on its real input;
3. every convolution outside the residual blocks timed three ways on its real input: as the plan
   runs it, reflection pad + convolution channels_last, and the same in NCHW (cuDNN's layout choice);
4. the torch profiler's CUDA kernels for one forward without graphs, summed by kernel name.

Prints a table per precision and writes ``profile_<device>_<size>.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import lama_fast  # noqa: E402
from lama_fast.sweep import lama_input  # noqa: E402
from ffc_kernels.ops import dense  # noqa: E402
from ffc_kernels import backends  # noqa: E402
from lama_fast import optimized  # noqa: E402
from lama_fast.demo import demo_generator  # noqa: E402


def bench(fn, rep_ms=300) -> float:
    if not torch.cuda.is_available():  # --allow-cpu: a dry run of this script
        import time

        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def end_to_end(generator, x, precision: str) -> dict:
    out = {}
    reference = copy.deepcopy(generator)
    with common.precision(common.MODES[precision]):
        reference(x)
        out["lama_eager_ms"] = bench(lambda: reference(x))
    reference = None  # free it before the plans are built
    variants = {
        "plan": {},
        "whole_plane_reflect_pad": {"fixup": 1 << 62},
        "no_s2d_output_conv": {"s2d": 0},
        "separate_exchange": {"merged": False},
    }
    for name, knobs in variants.items():
        saved = dense.FIXUP_MIN_PIXELS, optimized._S2D_MAX_CHANNELS, optimized._MERGED_EXCHANGE
        dense.FIXUP_MIN_PIXELS = knobs.get("fixup", saved[0])
        optimized._S2D_MAX_CHANNELS = knobs.get("s2d", saved[1])
        optimized._MERGED_EXCHANGE = knobs.get("merged", saved[2])
        try:
            fast = lama_fast.optimize(copy.deepcopy(generator), precision=precision)
            for _ in range(3):  # warm-up, capture, replay
                fast(x)
            out[f"{name}_ms"] = bench(lambda: fast(x))
            info = optimized.plan_info(fast)
            if info["runs"] is None:
                out[f"{name}_ms"] = None
                out[f"{name}_why"] = info["why_not"]
        finally:
            dense.FIXUP_MIN_PIXELS, optimized._S2D_MAX_CHANNELS, optimized._MERGED_EXCHANGE = saved
        fast = None
        torch.cuda.empty_cache()
    return out


def step_name(step, i) -> str:
    kind = type(step).__name__.lstrip("_")
    if isinstance(step, optimized._Single):
        c = step.conv
        kind += f" {'convT' if c.transposed else 'conv'} {tuple(c.weight.shape)} s{c.stride[0]}"
    return f"{i:2d} {kind}"


def per_step(plan, x) -> list[dict]:
    rows = []
    with backends.cuda_fp32_precision(plan.device, plan.precision.allow_tf32):
        state = (x.to(plan.precision.dtype), None)
        for i, step in enumerate(plan.steps):
            ms = bench(lambda: step(state, plan), rep_ms=100)
            shape = tuple(state[0].shape) + (() if state[1] is None else (tuple(state[1].shape),))
            rows.append({"step": step_name(step, i), "input": str(shape), "ms": ms})
            state = step(state, plan)
    return rows


def conv_alternatives(plan, x) -> list[dict]:
    rows = []
    with backends.cuda_fp32_precision(plan.device, plan.precision.allow_tf32):
        state = (x.to(plan.precision.dtype), None)
        for i, step in enumerate(plan.steps):
            convs = []
            if isinstance(step, optimized._Single):
                convs = [("", step.conv)]
            elif isinstance(step, optimized._LocalFFC):
                convs = [(n, c) for n, c in (("local", step.local), ("to_global", step.to_global)) if c is not None]
            inp = state[0] if state[1] is None else torch.cat(state, dim=1)
            for name, c in convs:
                row = {"step": step_name(step, i) + (f" {name}" if name else ""), "input": str(tuple(inp.shape)),
                       "weight": str(tuple(c.weight.shape))}
                row["plan_ms"] = bench(lambda: c(inp), rep_ms=100)
                for layout, fmt in (("cl", torch.channels_last), ("nchw", torch.contiguous_format)):
                    xi, wi = inp.contiguous(memory_format=fmt), c.weight.contiguous(memory_format=fmt)

                    def run(xi=xi, wi=wi):
                        xp = F.pad(xi, (c.reflect,) * 4, mode="reflect") if c.reflect else xi
                        if c.transposed:
                            return F.conv_transpose2d(xp, wi, c.bias, c.stride, c.padding, c.output_padding, 1,
                                                      c.dilation)
                        return F.conv2d(xp, wi, c.bias, c.stride, c.padding, c.dilation)

                    row[f"pad_conv_{layout}_ms"] = bench(run, rep_ms=100)
                rows.append(row)
            state = step(state, plan)
    return rows


def kernels(fast, x, top: int = 25) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    if x.device.type != "cuda":
        return []
    fast(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fast(x)
        torch.cuda.synchronize()
    totals = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:90]
            ms, count = totals.get(name, (0.0, 0))
            totals[name] = (ms + event.device_time_total / 1e3, count + 1)
    rows = [{"kernel": k, "ms": v[0], "calls": v[1]} for k, v in totals.items()]
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top] + [{"kernel": "(all kernels)", "ms": sum(r["ms"] for r in rows), "calls": sum(r["calls"] for r in rows)}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "tf32", "fp32"])
    parser.add_argument("--out", default=".")
    parser.add_argument("--allow-cpu", action="store_true", help="dry run on the CPU (small --size)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("profile_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = demo_generator(seed=0).to(device)
    x = lama_input(args.size, device)
    result = {"device": common.device_name(device), "size": args.size, "torch": torch.__version__}
    with torch.inference_mode():
        for precision in args.precisions:
            entry = result[precision] = {"end_to_end": end_to_end(generator, x, precision)}
            fast = lama_fast.optimize(copy.deepcopy(generator), precision=precision, cuda_graphs=False)
            fast(x)
            plan = fast._lama_fast.plan
            entry["steps"] = per_step(plan, x)
            entry["convs"] = conv_alternatives(plan, x)
            entry["kernels"] = kernels(fast, x)
            del fast, plan
            torch.cuda.empty_cache()
            Path(args.out).mkdir(parents=True, exist_ok=True)
            path = Path(args.out) / f"profile_{common.device_slug(device)}_{args.size}.json"
            path.write_text(json.dumps(result, indent=1))
            print(f"\n## {precision} at {args.size}² on {result['device']}")
            print("end to end: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in entry["end_to_end"].items()))
            print("steps:")
            for r in entry["steps"]:
                print(f"  {r['step']:<48} {r['ms']:8.3f} ms  {r['input']}")
            print("convolutions outside the blocks: plan / pad+conv channels_last / pad+conv NCHW (ms)")
            for r in entry["convs"]:
                print(f"  {r['step']:<48} {r['plan_ms']:7.3f} {r['pad_conv_cl_ms']:7.3f} {r['pad_conv_nchw_ms']:7.3f}"
                      f"  in {r['input']} w {r['weight']}")
            print("kernels (one forward, no graph):")
            for r in entry["kernels"]:
                print(f"  {r['ms']:8.3f} ms {r['calls']:5d}x  {r['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
