"""LaMa's refinement (``lama_fast.refine``) on the optimized generator against the reference one.

One refinement per point, each in a fresh process (peak memory cannot be reset within one):
the seeded demo big-lama (random weights, BatchNorm statistics calibrated on the demo scene,
``lama_fast.demo``), a size x size demo image with a big mask (the demo strokes and a central
box, about 30% of the image), ``lama_fast.refine`` at LaMa's default settings unless told
otherwise. Time is the wall time of the refine call (and of each scale: ``scales`` in the JSON);
peak memory the growth of the process's peak resident memory over it on the CPU (``VmHWM``, as
``ru_maxrss`` but not inherited from the parent; the optimized plan's folded weights, made at its
first forward, included), and ``torch.cuda.max_memory_allocated`` on CUDA. bf16's result is compared with fp32's (PSNR in the
mask, max abs difference on 0-255).

    python benchmarks/bench_refine.py                                  # 768², default settings, CPU
    python benchmarks/bench_refine.py --size 128 --iters 2 --blocks 1 --min-side 64  # a quick check

A point is PATH:PRECISION, PATH reference or optimized. Results go to
benchmarks/results/refine_<device>_<date>_<commit>.json; ``--readme-from FILE`` rewrites README.md's
REFINE-TABLE block from one. Targets (768² on a 2-core CPU): the
optimized fp32 refinement at least 1.5x faster than the reference and at most 0.6x its peak memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
import torch
from lama_fast import optimize
from lama_fast.refinement import _refine
from lama_fast.demo import demo_generator, demo_image, demo_mask
from lama_fast.sweep import peak_rss

size, path, precision, device, iters, blocks, min_side, out = sys.argv[1:9]
size, iters, blocks, device, min_side = int(size), int(iters), int(blocks) or None, torch.device(device), int(min_side)
generator = demo_generator(seed=0, n_blocks=blocks).eval().to(device)
for p in generator.parameters():
    p.requires_grad_(False)
if path == "optimized":
    generator = optimize(generator, precision=precision)
image = demo_image(size)
mask = demo_mask(size) > 127
mask[size * 3 // 10:size * 7 // 10, size // 4:size * 3 // 4] = True  # a big hole: the case refinement is for
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = peak_rss()
start = time.perf_counter()
result, info = _refine(image, mask, generator, n_iters=iters, min_side=min_side, devices=[device], progress=False)
if device.type == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    peak = peak_rss() - base
seconds = time.perf_counter() - start
np.save(out, result)
np.save(out + ".mask.npy", mask)
print(json.dumps({"seconds": seconds, "peak_bytes": peak, "scales": [
    {"size": list(size), "seconds": t} for size, t in zip(info["sizes"], info["seconds"])]}))
"""


def parse_point(text: str):
    parts = text.split(":")
    if len(parts) != 2 or parts[0] not in ("reference", "optimized") or parts[1] not in ("fp32", "tf32", "bf16"):
        raise argparse.ArgumentTypeError(f"expected reference:fp32 or optimized:PRECISION, got {text!r}")
    if parts[0] == "reference" and parts[1] != "fp32":
        raise argparse.ArgumentTypeError("the reference runs LaMa's modules in fp32 only")
    return parts[0], parts[1]


def measure(size, path, precision, device, iters, blocks, min_side, workdir, timeout):
    out = str(Path(workdir) / f"{path}_{precision}.npy")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.ROOT), env.get("PYTHONPATH", "")) if p)
    run = subprocess.run([sys.executable, "-c", CHILD, str(size), path, precision, device, str(iters),
                          str(blocks or 0), str(min_side), out], capture_output=True, text=True, timeout=timeout,
                         env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{path}:{precision}: {run.stderr.strip().splitlines()[-3:]}")
    point = json.loads(run.stdout.strip().splitlines()[-1])
    return point, np.load(out), np.load(out + ".mask.npy")


def compare(result: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> dict:
    diff = result.astype(np.float64) - reference.astype(np.float64)
    mse = float((diff[mask] ** 2).mean()) if mask.any() else 0.0
    return {"max_abs_255": float(np.abs(diff).max()),
            "psnr_in_mask_db": math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)}


def markdown(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    lines = [f"{env.get('device')}, torch {env.get('torch')}, commit `{env.get('git_commit')}`: refining a "
             f"{settings['size']}² image with a big hole, big-lama ({settings['blocks']} blocks, seeded demo weights), "
             f"n_iters={settings['n_iters']}, min_side={settings['min_side']}.", "",
             "| generator | precision | time s | vs reference | peak memory MiB | vs reference | "
             "PSNR in the mask dB |", "|---|---|---|---|---|---|---|"]
    ref = next((p for p in result["points"] if p["path"] == "reference"), None)
    for p in result["points"]:
        against = ("against the reference" if p["path"] == "optimized" and p["precision"] == "fp32"
                   else "against optimized fp32")
        psnr = (f"{p['psnr_in_mask_db']:.1f} ({against})" if "psnr_in_mask_db" in p else "-")
        speed = f"{ref['seconds'] / p['seconds']:.2f}x" if ref else "-"
        memory = f"{p['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x" if ref else "-"
        lines.append(f"| {p['path']} | {p['precision']} | {p['seconds']:.1f} | {speed} | "
                     f"{p['peak_bytes'] / 2**20:.0f} | {memory} | {psnr} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768, help="image side (default 768)")
    parser.add_argument("--iters", type=int, default=15, help="iterations per scale (default LaMa's 15)")
    parser.add_argument("--blocks", type=int, default=None, help="residual blocks (default big-lama's 18)")
    parser.add_argument("--min-side", type=int, default=512,
                        help="refine's min_side (default 512: 768² refines at two scales, 384² and 768²)")
    parser.add_argument("--points", nargs="+", type=parse_point,
                        default=[parse_point(p) for p in ("reference:fp32", "optimized:fp32", "optimized:bf16")])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per point")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    parser.add_argument("--readme-from", metavar="JSON", help="only rewrite README.md's REFINE-TABLE block")
    args = parser.parse_args(argv)
    if args.readme_from:
        return common.readme_from(args.readme_from, "REFINE-TABLE", markdown)
    import torch

    device = torch.device(args.device)
    result, path = common.new_results(
        "refine", device, args.out,
        settings={"size": args.size, "n_iters": args.iters, "blocks": args.blocks or 18, "lr": 0.002,
                  "min_side": args.min_side, "max_scales": 3, "px_budget": 1_800_000}, points=[])
    outputs = {}
    print(f"{'path':>10} {'precision':>9} {'seconds':>9} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory() as workdir:
        for name, precision in args.points:
            point, image, mask = measure(args.size, name, precision, args.device, args.iters, args.blocks,
                                         args.min_side, workdir, args.timeout)
            point.update(path=name, precision=precision)
            outputs[(name, precision)] = (image, mask)
            result["points"].append(point)
            scales = ", ".join(f"{s['size'][0]}x{s['size'][1]} {s['seconds']:.1f} s" for s in point.get("scales", []))
            print(f"{name:>10} {precision:>9} {point['seconds']:>9.1f} {point['peak_bytes'] / 2**20:>9.0f}  {scales}",
                  flush=True)
    by_key = {(p["path"], p["precision"]): p for p in result["points"]}
    ref, fp32 = by_key.get(("reference", "fp32")), by_key.get(("optimized", "fp32"))
    if ref and fp32:
        result["speedup_fp32"] = ref["seconds"] / fp32["seconds"]
        result["memory_ratio_fp32"] = fp32["peak_bytes"] / max(ref["peak_bytes"], 1)
        fp32.update(compare(outputs[("optimized", "fp32")][0], *outputs[("reference", "fp32")]))
        print(f"# optimized fp32 vs reference: {result['speedup_fp32']:.2f}x faster (target >= 1.5), "
              f"{result['memory_ratio_fp32']:.2f}x the peak memory (target <= 0.6); "
              f"PSNR in the mask {fp32['psnr_in_mask_db']:.1f} dB")
    bf16 = by_key.get(("optimized", "bf16"))
    if bf16 and ("optimized", "fp32") in outputs:
        bf16.update(compare(outputs[("optimized", "bf16")][0], *outputs[("optimized", "fp32")]))
        if ref:
            bf16["speedup"] = ref["seconds"] / bf16["seconds"]
            bf16["memory_ratio"] = bf16["peak_bytes"] / max(ref["peak_bytes"], 1)
        print(f"# bf16 against fp32: PSNR in the mask {bf16['psnr_in_mask_db']:.1f} dB, "
              f"max |diff| {bf16['max_abs_255']:.0f}/255")
    common.save_results(result, path)
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
