"""Folder throughput: images per second, one by one against the pipelined directory mode.

A folder of COUNT generated photos (the demo image, shifted per photo so no two are alike) and
masks per size goes through big-lama (seeded demo weights, optimized in PRECISION) twice:
- one by one, as a simple loop does it: read image and mask, ``lama_fast.inpaint``, write the PNG;
- pipelined, as ``lama-fast inpaint IMAGES MASKS -o OUT --batch-size B`` does it
  (``lama_fast.folder.run_folder``: reading in DataLoader workers, batches by size, writes in a
  thread), for each batch size B.
Every pipelined output is compared with the one-by-one output of the same photo.

    python benchmarks/bench_folder.py [--sizes 512] [--count 64] [--batches 1 4] [--device cpu]

Results go to benchmarks/results/folder_<device>_<date>_<commit>.json; ``--readme-from FILE``
rewrites README.md's FOLDER-TABLE block from one.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

def make_folder(root: Path, size: int, count: int) -> tuple[Path, Path]:
    import PIL.Image

    from lama_fast.demo import demo_image, demo_mask

    images, masks = root / f"images{size}", root / f"masks{size}"
    images.mkdir()
    masks.mkdir()
    image, mask = demo_image(size), demo_mask(size)
    for i in range(count):
        shift = (37 * i) % size
        PIL.Image.fromarray(np.roll(image, shift, axis=1)).save(images / f"{i:04d}.png")
        PIL.Image.fromarray(np.roll(mask, shift // 2, axis=0)).save(masks / f"{i:04d}_mask.png")
    return images, masks


def one_by_one(plan, generator, device) -> float:
    import PIL.Image

    from lama_fast import inpaint
    from lama_fast.many import read_image

    start = time.perf_counter()
    for image, mask, output in plan.jobs:
        result = inpaint(read_image(image), read_image(mask), generator, device=device)
        PIL.Image.fromarray(result).save(output, format="PNG")
    common.sync(device)
    return time.perf_counter() - start


def pipelined(plan, generator, device, batch: int, workers: int | None) -> float:
    from lama_fast import folder

    start = time.perf_counter()
    records = folder.run_folder(plan, generator, batch_size=batch, overwrite=True, device=device,
                                num_workers=workers, progress=False)
    common.sync(device)
    seconds = time.perf_counter() - start
    failed = [r for r in records if r.status != "written"]
    if failed:
        raise RuntimeError(f"{len(failed)} images failed, e.g. {failed[0].image}: {failed[0].error}")
    return seconds


def compare(a: Path, b: Path) -> tuple[bool, int]:
    """(every PNG identical, the largest difference in any value)."""
    import PIL.Image

    worst = 0
    for path in sorted(a.glob("*.png")):
        x, y = (np.asarray(PIL.Image.open(p)).astype(int) for p in (path, b / path.name))
        worst = max(worst, int(np.abs(x - y).max()))
    return worst == 0, worst


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"{env.get('device')}, torch {env.get('torch')}, {result['precision']}, commit `{env.get('git_commit')}`: "
             f"{result['count']} photos per size, big-lama (seeded demo weights), optimized.", "",
             "| input | mode | batch | images/s | vs one by one | outputs |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        same = "-" if row["mode"] == "one by one" else ("identical" if row["identical"]
                                                        else f"differ by <= {row['max_diff']}")
        lines.append(f"| {row['size']}² | {row['mode']} | {row['batch']} | {row['images_per_second']:.3f} | "
                     f"{row['speedup']:.2f}x | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--count", type=int, default=64, help="photos per size (default 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes of the pipelined runs (default 1 4 on the CPU, 1 4 8 on a GPU)")
    parser.add_argument("--workers", type=int, default=None, help="reader processes (default: the CLI's)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    parser.add_argument("--readme-from", metavar="JSON", help="only rewrite README.md's FOLDER-TABLE block")
    args = parser.parse_args(argv)
    if args.readme_from:
        return common.readme_from(args.readme_from, "FOLDER-TABLE", markdown)
    import torch

    from lama_fast import folder, optimize
    from lama_fast.demo import demo_generator

    device = torch.device(args.device)
    batches = args.batches or ([1, 4] if device.type == "cpu" else [1, 4, 8])
    result, path = common.new_results("folder", device, args.out, precision=args.precision, count=args.count,
                                       rows=[])
    generator = optimize(demo_generator(seed=0).eval().to(device), precision=args.precision)
    print(f"{'size':>6} {'mode':>12} {'batch':>5} {'images/s':>9} {'speedup':>8} outputs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            images, masks = make_folder(Path(tmp), size, args.count)
            warm = folder.plan_folder(images, masks, Path(tmp) / f"warm{size}")
            warm.jobs = warm.jobs[:2]
            pipelined(warm, generator, device, max(batches), args.workers)  # folds weights, builds graphs
            serial = folder.plan_folder(images, masks, Path(tmp) / f"serial{size}")
            serial.output.mkdir()
            base = one_by_one(serial, generator, device)
            rows = [dict(size=size, mode="one by one", batch=1, seconds=base, images_per_second=args.count / base,
                         speedup=1.0, identical=True, max_diff=0)]
            for batch in batches:
                plan = folder.plan_folder(images, masks, Path(tmp) / f"pipelined{size}_{batch}")
                seconds = pipelined(plan, generator, device, batch, args.workers)
                identical, worst = compare(serial.output, plan.output)
                rows.append(dict(size=size, mode="pipelined", batch=batch, seconds=seconds,
                                 images_per_second=args.count / seconds, speedup=base / seconds,
                                 identical=identical, max_diff=worst))
            for row in rows:
                print(f"{size:>6} {row['mode']:>12} {row['batch']:>5} {row['images_per_second']:>9.3f} "
                      f"{row['speedup']:>7.2f}x {'identical' if row['identical'] else row['max_diff']}", flush=True)
            result["rows"] += rows
            common.save_results(result, path)
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
