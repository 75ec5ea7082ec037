"""Peak memory and time of one optimized big-lama forward per size, precision and tile size.

Each point runs in a fresh process (peak memory cannot be reset within one): the seeded demo
big-lama, ``lama_fast.optimize(generator, precision=..., tile_size=...)``, one forward of a
size x size input. Peak memory is the growth of the process's peak resident memory over the
forward on the CPU (``VmHWM``, which unlike ``ru_maxrss`` is not inherited from the process that
started it; the plan's folded weights included: they are made at the first forward), and
``torch.cuda.max_memory_allocated`` on CUDA; ``lama_fast.estimate_memory`` is printed beside it.

    python benchmarks/bench_memory.py --points 1024:bf16 2048:bf16:512 4096:bf16:512 [--device cpu]

A point is SIZE:PRECISION[:TILE]. Results go to benchmarks/results/memory_<device>_<date>_<commit>.json;
``--readme-from FILE`` rewrites README.md's "what to expect" table (MEMORY-TABLE block) from one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CHILD = r"""
import json, sys, time, torch
from lama_fast import estimate_memory, optimize
from lama_fast.demo import demo_generator
from lama_fast.sweep import peak_rss
size, precision, tile, device = int(sys.argv[1]), sys.argv[2], (int(sys.argv[3]) or None), sys.argv[4]
generator = demo_generator(seed=0).eval().to(device)
x = torch.rand(1, 4, size, size, device=device)
fast = optimize(generator, precision=precision, tile_size=tile)
with torch.inference_mode():
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else:
        base = peak_rss()
    start = time.perf_counter()
    fast(x)
    if device == "cuda":
        torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    seconds = time.perf_counter() - start
print(json.dumps({"size": size, "precision": precision, "tile_size": tile, "seconds": seconds, "peak_bytes": peak,
                  "estimate_bytes": estimate_memory(size, size, precision=precision, tile_size=tile, device=device)}))
"""


def measure(size: int, precision: str, tile: int | None, device: str, timeout: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(size), precision, str(tile or 0), device],
                         capture_output=True, text=True, timeout=timeout, env=common_env())
    if out.returncode != 0:
        raise RuntimeError(f"{size}:{precision}:{tile}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def common_env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def parse_point(text: str):
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ("fp32", "tf32", "bf16"):
        raise argparse.ArgumentTypeError(f"expected SIZE:PRECISION[:TILE], got {text!r}")
    return int(parts[0]), parts[1], int(parts[2]) if len(parts) == 3 else None


def markdown(result: dict) -> str:
    """The 'what to expect' table of one results file."""
    env = result["environment"]
    lines = [f"{env.get('device')}, torch {env.get('torch')}, commit `{env.get('git_commit')}`: one forward of "
             "big-lama (seeded demo weights), optimized.", "",
             "| input | precision | tiles | time s | peak memory MiB | estimate MiB |", "|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['size']}² | {p['precision']} | {p['tile_size'] or 'none'} | {p['seconds']:.1f} | "
                     f"{p['peak_bytes'] / 2**20:.0f} | {p['estimate_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", type=parse_point,
                        default=[parse_point(p) for p in ("1024:bf16", "1024:bf16:256", "2048:bf16", "2048:bf16:512")])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per point")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    parser.add_argument("--readme-from", metavar="JSON",
                        help="only rewrite README.md's MEMORY-TABLE block from this results file")
    args = parser.parse_args(argv)
    if args.readme_from:
        return common.readme_from(args.readme_from, "MEMORY-TABLE", markdown)
    import torch

    device = torch.device(args.device)
    result, path = common.new_results("memory", device, args.out, points=[])
    print(f"{'size':>6} {'precision':>9} {'tile':>5} {'seconds':>8} {'peak MiB':>9} {'estimate MiB':>12}")
    for size, precision, tile in args.points:
        point = measure(size, precision, tile, args.device, args.timeout)
        result["points"].append(point)
        print(f"{size:>6} {precision:>9} {str(tile or '-'):>5} {point['seconds']:>8.1f} "
              f"{point['peak_bytes'] / 2**20:>9.0f} {point['estimate_bytes'] / 2**20:>12.0f}", flush=True)
        common.save_results(result, path)
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
