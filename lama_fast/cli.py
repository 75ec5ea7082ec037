"""``lama-fast``: inpaint images with a LaMa checkpoint, verify the fused path, time it end to end.

    lama-fast inpaint IMAGE MASK -o OUT --checkpoint PATH [--device cpu|cuda] [--reference]
                      [--precision fp32|tf32|bf16] [--tile-size N|auto|off] [--threads N]
                      [--refine [--refine-iters 15] [--refine-lr 0.002] [--refine-min-side 512]
                                [--refine-max-scales 3] [--refine-px-budget 1800000]]
                      [--batch-size N] [--workers N] [--overwrite] [--report FILE]   (directories)
    torchrun --nproc-per-node N -m lama_fast inpaint IMAGES MASKS -o OUT ...   (one process per GPU)
    lama-fast verify [--size 256] [--device cpu|cuda] [--blocks N] [--seed 0] [--save DIR]
    lama-fast bench [--sizes 512 1024] [--device cpu|cuda] [--no-compile] [--runs N] [--out DIR]
    lama-fast download [big-lama] [--to DIR]
    lama-fast --version

Errors are reported as one line on stderr with a non-zero exit status, never a traceback; warnings
raised while inpainting (by lama_fast or torch) as one ``lama-fast: warning:`` line each.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import tqdm

from lama_fast._version import __version__ as SOURCE_VERSION
from lama_fast.checkpoints import CheckpointError, load_generator
from lama_fast import folder
from lama_fast.download import MODELS, DownloadError, cache_directory, download, resolve_checkpoint
from lama_fast.folder import pair_images_and_masks
from lama_fast.many import MIN_SIDE, InputError, read_image
from lama_fast.optimized import PRECISIONS, optimize
from lama_fast.pipeline import inpaint
from lama_fast.refinement import refine

__all__ = ["main", "pair_images_and_masks"]

PROG = "lama-fast"

NO_CHECKPOINT = f"""\
{PROG}: error: inpaint needs --checkpoint PATH; no LaMa weights ship with lama-fast.
  To fetch IOPaint's big-lama.pt into the cache, run: {PROG} download big-lama
  and then pass --checkpoint big-lama.
  The published big-lama weights are the LaMa authors' release: big-lama.zip, linked from the
  README of the advimman/lama GitHub repository; unzip it and pass big-lama/models/best.ckpt.
  IOPaint's TorchScript export big-lama.pt works too. Both load with --checkpoint PATH.
  To check the fused kernels without any weights, run: {PROG} verify"""

class CLIError(Exception):
    """A user error: reported as one line, exit status 1."""


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except (CLIError, CheckpointError, DownloadError, ValueError, TypeError, OSError, RuntimeError) as error:
        # RuntimeError: torch's (out of memory, a generator failing on an input); still one line.
        _error(error)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


def _error(message) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


def _one_line(message) -> str:
    if isinstance(message, FileNotFoundError) and message.filename:
        return f"no such file or directory: {message.filename}"
    text = " ".join(str(message).split())
    return text or type(message).__name__


def _version() -> str:
    """The installed distribution's version; from a source tree that is not installed, the source's."""
    try:
        return importlib.metadata.version("ffc-kernels")
    except importlib.metadata.PackageNotFoundError:
        return SOURCE_VERSION


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="LaMa inpainting on fused Fast Fourier Convolution kernels.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "inpaint",
        help="inpaint an image (or a directory of images) with a LaMa checkpoint",
        description="Inpaint IMAGE where MASK is white (> 127; in a colour mask, where any of R, G, B is), "
        "writing a PNG. With directories, "
        "each image <stem>.<ext> in IMAGE is paired with <stem>_mask.<ext> or <stem>.<ext> in MASK "
        "(_mask and .png preferred), "
        "and OUT/<stem>.png is written.",
    )
    run.add_argument("image", metavar="IMAGE", help="image file, or a directory of images")
    run.add_argument("mask", metavar="MASK", help="mask file (white or any colour = inpaint), or a directory of masks")
    run.add_argument("-o", "--output", metavar="OUT", required=True, help="output .png file, or a directory")
    run.add_argument("--checkpoint", metavar="PATH",
                     help="LaMa best.ckpt, TorchScript big-lama.pt or a state dict; or big-lama, the file "
                          f"'{PROG} download big-lama' put in the cache")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    run.add_argument("--reference", action="store_true", help="run the plain PyTorch reference, not the fused kernels")
    run.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="compute precision of the optimized generator (default fp32): tf32 uses TF32 tensor "
                          "cores on a GPU (fp32 on the CPU); bf16 runs weights, activations and products in bf16 "
                          "with fp32 accumulation and fp32 FFTs (LaMa's own FourierUnit cannot run in bf16)")
    run.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="the same as --precision (older name)")
    run.add_argument("--tile-size", type=_tile_size, default="auto", metavar="N|auto|off",
                     help="run the full-resolution layers in N x N tiles (less memory, same result up to rounding); "
                          "auto (default): tile only when the estimated memory exceeds what the device has free; "
                          "off: never tile")
    run.add_argument("--threads", type=_int_at_least(1), metavar="N",
                     help="CPU threads torch uses (torch.set_num_threads; default: torch's own choice)")
    refine_group = run.add_argument_group(
        "refinement", "LaMa's multi-scale feature refinement for large images (slower: a forward and a backward "
        "per iteration): coherent structure in large holes at 1-2 megapixels; one IMAGE file")
    refine_group.add_argument("--refine", action="store_true", help="refine the prediction (see lama_fast.refine)")
    refine_group.add_argument("--refine-iters", type=_int_at_least(1), default=15, metavar="N",
                              help="Adam iterations per scale (default 15)")
    refine_group.add_argument("--refine-lr", type=_positive_float, default=0.002, metavar="LR",
                              help="Adam's learning rate (default 0.002)")
    refine_group.add_argument("--refine-min-side", type=_int_at_least(1), default=512, metavar="N",
                              help="one more scale per doubling of the shorter side above N pixels (default 512)")
    refine_group.add_argument("--refine-max-scales", type=_int_at_least(1), default=3, metavar="N",
                              help="at most N scales (default 3)")
    refine_group.add_argument("--refine-px-budget", type=_int_at_least(1), default=1_800_000, metavar="PIXELS",
                              help="larger images are refined at this many pixels and pasted back (default 1800000)")
    folders = run.add_argument_group("directories", "with directories as IMAGE and MASK (also under torchrun, "
                                      "which shards the images over its processes)")
    folders.add_argument("--batch-size", type=_int_at_least(1), default=1, metavar="N",
                         help="images of the same padded size per forward on a GPU (default 1); on the CPU "
                              "they run one at a time, which gives bit-identical results")
    folders.add_argument("--workers", type=_int_at_least(0), default=None, metavar="N",
                         help="processes that read and prepare images while the generator runs "
                              "(default: 4 on a GPU, 1 on the CPU; 0 reads in the main process)")
    folders.add_argument("--overwrite", action="store_true",
                         help="inpaint images whose output exists too (default: skip them, so an interrupted "
                              "run resumes where it stopped)")
    folders.add_argument("--report", metavar="FILE",
                         help="write a JSON list with, per image: status (written, skipped, failed, no mask), "
                              "seconds, error and warnings")
    run.set_defaults(run=_run_inpaint)

    check = commands.add_parser(
        "verify",
        help="check the fused path against the reference on a built-in random big-lama",
        description="Runs a seeded random big-lama (realistic BatchNorm statistics) and its optimized "
        "copy on a generated image and mask in fp32, and compares them.",
    )
    check.add_argument("--size", type=_int_at_least(MIN_SIDE), default=256, help="image side in pixels (default 256)")
    check.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    check.add_argument("--blocks", type=_int_at_least(0), default=None, help="residual blocks (default 18, as big-lama)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    check.add_argument("--save", metavar="DIR", help="write image.png, mask.png, result.png, result_reference.png")
    check.set_defaults(run=_run_verify)

    bench = commands.add_parser(
        "bench", help="time big-lama end to end: LaMa's eager generator, torch.compile of it, and the optimized one",
        description="The end-to-end sweep on big-lama with seeded demo weights: LaMa's eager generator (fp32), "
                    "torch.compile of it, and lama_fast.optimize in each precision, per input size: median time "
                    "and spread, speedup, peak memory, accuracy against eager fp32. Writes a JSON and a PNG plot "
                    "(with matplotlib: pip install 'ffc-kernels[bench]'). The per-op benchmarks are "
                    "benchmarks/bench_<op>.py in the source repository; benchmarks/run_gpu.py runs all on a GPU.")
    bench.add_argument("--sizes", type=_int_at_least(16), nargs="+", default=[512, 1024], metavar="N",
                       help="input sizes, N x N pixels (default 512 1024)")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    bench.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    bench.add_argument("--runs", type=_int_at_least(1), metavar="N",
                       help="timed runs per point after one warm-up (default 3 up to 512², 2 above)")
    bench.add_argument("--blocks", type=_int_at_least(1), metavar="N", help="residual blocks (default big-lama's 18)")
    bench.add_argument("--out", metavar="DIR",
                       help="where the JSON and plot go (default benchmarks/results in a source tree, "
                            "else ./lama-fast-bench)")
    bench.set_defaults(run=_run_bench)

    fetch = commands.add_parser(
        "download",
        help="download LaMa weights (IOPaint's TorchScript big-lama.pt) and check their MD5",
        description="Downloads the weights into the cache (or DIR), resuming an interrupted download, and "
        "keeps the file only when its MD5 matches. Afterwards --checkpoint big-lama finds it in the cache.",
    )
    fetch.add_argument("name", nargs="?", choices=tuple(MODELS), default="big-lama",
                       help="which weights (default big-lama)")
    fetch.add_argument("--to", metavar="DIR",
                       help=f"directory to put the file in (default: the cache, now {cache_directory()}; "
                            "set by $LAMA_FAST_CACHE, else $XDG_CACHE_HOME/lama-fast, else ~/.cache/lama-fast)")
    fetch.set_defaults(run=_run_download)
    return parser


def _tile_size(text: str):
    """--tile-size: 'auto', 'off' (None) or a whole number of pixels, at least 16."""
    if text in ("auto", "off"):
        return None if text == "off" else "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, auto or off, got {text!r}") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"tiles need at least 16 pixels a side, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available to torch")
    return torch.device(name)


# ----------------------------------------------------------------------------------------- inpaint


def _run_inpaint(args) -> int:
    if args.checkpoint is None:
        print(NO_CHECKPOINT, file=sys.stderr)
        return 2
    image, mask, output = Path(args.image), Path(args.mask), Path(args.output)
    checkpoint = resolve_checkpoint(args.checkpoint)
    for what, path in (("image", image), ("mask", mask), ("checkpoint", checkpoint)):
        if not path.exists():
            raise CLIError(f"{what} not found: {path}")
    if checkpoint.is_dir():
        raise CLIError(f"checkpoint is a directory, expected a file: {checkpoint}")
    if image.is_dir() != mask.is_dir():
        raise CLIError(f"IMAGE and MASK must both be files or both be directories: {image}, {mask}")

    if image.is_dir():
        plan = folder.plan_folder(image, mask, output)
    else:
        for option, given in (("--report", args.report is not None), ("--overwrite", args.overwrite)):
            if given:
                raise CLIError(f"{option} is for directories of images; IMAGE is a file")
        if folder.launched_by_torchrun():
            raise CLIError("torchrun shards a directory of images over its processes; IMAGE is a file")
        if output.is_dir():
            output = output / f"{image.stem}.png"
        elif output.suffix.lower() != ".png":
            raise CLIError(f"output must be a .png file or an existing directory, got {output}")

    if args.dtype is not None and args.precision not in (None, args.dtype):
        raise CLIError(f"--dtype {args.dtype} and --precision {args.precision} disagree; give one of them")
    precision = args.precision or args.dtype or "fp32"
    if args.reference and precision != "fp32":
        raise CLIError(f"--precision {precision} needs the optimized generator: the reference runs LaMa's own "
                       "modules in fp32; drop --reference")
    if args.reference and isinstance(args.tile_size, int):
        raise CLIError(f"--tile-size {args.tile_size} needs the optimized generator: the reference runs LaMa's own "
                       "modules whole; drop --reference")
    refine_options = _refine_options(args, image)
    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    if image.is_dir():
        return _run_directory(args, plan, precision, device, start)
    with _warnings_as_lines():
        generator = _generator(args, checkpoint, precision, device)
    if refine_options is not None:
        _refine_file(image, mask, output, generator, device, refine_options)
    else:
        _inpaint_file(image, mask, output, generator, device, args.tile_size)
    print(f"{PROG}: wrote {output} {_resources(start, device)}", file=sys.stderr)
    return 0


def _generator(args, checkpoint, precision, device):
    generator = load_generator(str(checkpoint), device=device).eval()
    return generator if args.reference else optimize(generator, precision=precision)


def _run_directory(args, plan, precision, device, start) -> int:
    """A folder, in this process or as one rank of a torchrun job; rank 0 prints the summary and
    writes the report, and every rank exits with the same status."""
    rank, world_size = 0, 1
    if folder.launched_by_torchrun():
        rank, world_size, rank_device = folder.init_distributed(device.type)
        device = rank_device or device
    try:
        if plan.unmatched and rank == 0:
            names = ", ".join(p.name for p in plan.unmatched)
            total = len(plan.jobs) + len(plan.unmatched)
            print(f"{PROG}: no mask for {len(plan.unmatched)} of {total} images (looked for <stem>_mask.<ext> or "
                  f"<stem>.<ext> in {Path(args.mask)}), skipping: {names}", file=sys.stderr)
        if not plan.jobs:
            raise CLIError(f"no image in {Path(args.image)} has a mask in {Path(args.mask)}")
        with _warnings_as_lines():
            generator = _generator(args, resolve_checkpoint(args.checkpoint), precision, device)
            records = folder.run_folder(plan, generator, batch_size=args.batch_size, overwrite=args.overwrite,
                                        device=device, num_workers=args.workers, tile_size=args.tile_size,
                                        rank=rank, world_size=world_size, progress=rank == 0,
                                        log=lambda kind, message: _print_line(f"{PROG}: {kind}: {message}"))
        records = folder.gather(records)
    finally:
        folder.finish_distributed()
    if rank == 0:
        if args.report:
            folder.write_report(records, args.report)
        _print_summary(records, plan.output, start, device, world_size)
    return 1 if any(r.status in ("failed", "no mask") for r in records) else 0


def _print_summary(records, output: Path, start: float, device, world_size: int) -> None:
    count = {status: sum(r.status == status for r in records) for status in ("written", "skipped", "failed", "no mask")}
    skipped = (f", skipped {count['skipped']} already there (--overwrite redoes them)" if count["skipped"] else "")
    processes = f" by {world_size} processes" if world_size > 1 else ""
    if count["failed"] or count["no mask"]:
        _error(f"wrote {count['written']} of {len(records)} images to {output}{skipped}; "
               f"{count['no mask']} had no mask, {count['failed']} failed")
    else:
        print(f"{PROG}: wrote {count['written']} images to {output}{skipped}{processes} {_resources(start, device)}",
              file=sys.stderr)


_STEPS = ("reading", "inpainting", "writing")


def _inpaint_file(image_path, mask_path, out_path, generator, device, tile_size="auto") -> None:
    """Inpaint one image, its steps shown as a bar on a terminal; failures raise one-line CLIErrors.

    Not on a terminal (a log, a pipe) the bar is left out: three redraws of one image say nothing
    there, and stderr stays as the one-line errors and warnings a script reads.
    """
    bar = tqdm.tqdm(total=len(_STEPS), desc=image_path.name, file=sys.stderr, disable=None, dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]")
    try:
        with _warnings_as_lines():
            for step in _steps(image_path, mask_path, out_path, generator, device, tile_size):
                if step != _STEPS[0]:
                    bar.update(1)  # the previous step is done
                bar.set_postfix_str(step)
            bar.set_postfix_str("done")
            bar.update(1)
    except (CLIError, ValueError, TypeError, OSError, RuntimeError, MemoryError) as error:
        bar.leave = False  # the error line replaces the bar
        raise CLIError(_job_error(error, image_path)) from error
    finally:
        bar.close()


def _refine_options(args, image: Path) -> dict | None:
    """lama_fast.refine's options from --refine and its settings (None without --refine)."""
    if not args.refine:
        return None
    if image.is_dir():
        raise CLIError("--refine takes one IMAGE and MASK file, not directories")
    if isinstance(args.tile_size, int):
        raise CLIError(f"--tile-size {args.tile_size} does not apply to --refine, which runs each scale whole")
    return dict(n_iters=args.refine_iters, lr=args.refine_lr, min_side=args.refine_min_side,
                max_scales=args.refine_max_scales, px_budget=args.refine_px_budget)


def _refine_file(image_path, mask_path, out_path, generator, device, options) -> None:
    """Refine one image; lama_fast.refine draws its bar over scales and iterations on a terminal."""
    try:
        with _warnings_as_lines():
            image_in, mask_in = read_image(image_path), read_image(mask_path)
            if min(image_in.size) < MIN_SIDE:
                raise CLIError(f"{image_path.name} is {image_in.height}x{image_in.width} (HxW); "
                               f"LaMa needs at least {MIN_SIDE} pixels a side")
            result = refine(image_in, mask_in, generator, devices=[device], progress=sys.stderr.isatty(), **options)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(result).save(out_path, format="PNG")
    except (CLIError, ValueError, TypeError, OSError, RuntimeError, MemoryError) as error:
        raise CLIError(_job_error(error, image_path)) from error


def _steps(image_path, mask_path, out_path, generator, device, tile_size="auto"):
    """Inpaint one image, yielding the name of each of _STEPS as it begins."""
    yield _STEPS[0]
    image_in, mask_in = read_image(image_path), read_image(mask_path)
    if min(image_in.size) < MIN_SIDE:
        raise CLIError(f"{image_path.name} is {image_in.height}x{image_in.width} (HxW); "
                       f"LaMa needs at least {MIN_SIDE} pixels a side")
    yield _STEPS[1]
    result = inpaint(image_in, mask_in, generator, device=device, tile_size=tile_size)
    yield _STEPS[2]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(result).save(out_path, format="PNG")


def _job_error(error: Exception, image_path: Path) -> str:
    # CLIErrors and InputErrors name their file already; the others (from inpaint, Pillow, torch) do not.
    return _one_line(error) if isinstance(error, (CLIError, InputError)) else f"{image_path.name}: {_one_line(error)}"


def _print_line(line: str) -> None:
    """``line`` on stderr, above any progress bar (tqdm clears the bar and redraws it below)."""
    tqdm.tqdm.write(line, file=sys.stderr)


@contextlib.contextmanager
def _warnings_as_lines(prefix: str = ""):
    """Collect the warnings raised inside (lama_fast's, torch's) and print each distinct one as a
    single ``lama-fast: warning: <prefix>...`` line once the work succeeds.

    Python would print them with a file, line number and source line, in the middle of a progress
    bar. When the work fails they are dropped: its error line says what went wrong, on its own.
    The active filters still apply, so warnings Python hides by default stay hidden.
    """
    with warnings.catch_warnings(record=True) as caught:
        yield
    for line in dict.fromkeys(f"{PROG}: warning: {prefix}{_one_line(w.message)}" for w in caught):
        _print_line(line)


def _resources(start: float, device: torch.device) -> str:
    """'in <elapsed>, peak memory <size> (<what was measured>)' since ``start``."""
    elapsed = f"in {time.monotonic() - start:.1f} s"
    if device.type == "cuda":
        return f"{elapsed}, peak GPU memory {_size(torch.cuda.max_memory_allocated(device))} (torch tensors)"
    try:
        import resource  # POSIX only
    except ImportError:
        return elapsed
    # ru_maxrss is the process's peak resident set: KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{elapsed}, peak memory {_size(peak)} (process RSS)"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------- verify and bench


def _run_verify(args) -> int:
    from lama_fast import demo

    device = _device(args.device)
    blocks = 18 if args.blocks is None else args.blocks
    print(f"{PROG} verify: fused path vs reference on a random big-lama ({blocks} blocks, seed {args.seed}), "
          f"{args.size}x{args.size} demo image, device {device}, fp32 (TF32 off)")
    report = demo.verify(size=args.size, device=device, n_blocks=args.blocks, seed=args.seed)
    print("  " + report.backend.rstrip().replace("\n", "\n  "))
    print(f"  optimized generator: {report.plan}")
    ratio = report.reference_seconds / report.fast_seconds if report.fast_seconds > 0 else float("inf")
    print(f"generator output   max |fast - reference| = {report.output_max_abs_diff:.3e}"
          f"  (tolerance {report.tolerance:.0e})")
    print(f"inpainted uint8    max |fast - reference| = {report.image_max_abs_diff}"
          f"  ({report.image_values_differing} of {report.image_values} values differ)")
    print(f"time, one run after a warm-up:  reference {report.reference_seconds * 1e3:.1f} ms"
          f"  fast {report.fast_seconds * 1e3:.1f} ms  ({ratio:.2f}x)")
    if args.save:
        save = Path(args.save)
        save.mkdir(parents=True, exist_ok=True)
        for name, array in report.images.items():
            PIL.Image.fromarray(np.ascontiguousarray(array)).save(save / f"{name}.png")
        print(f"saved {', '.join(f'{name}.png' for name in report.images)} in {save}")
    print("PASS" if report.passed else "FAIL")
    return 0 if report.passed else 1


def _run_bench(args) -> int:
    import logging

    from lama_fast import sweep

    # torch.compile's C++ toolchain lookup logs "No CUDA runtime is found" on CPU-only machines.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    device = _device(args.device)
    out = Path(args.out) if args.out else (Path("benchmarks/results") if Path("benchmarks/results").is_dir()
                                           else Path("lama-fast-bench"))
    with _warnings_as_lines():
        results, path = sweep.run_sweep(args.sizes, device=device, compile_reference=not args.no_compile,
                                        runs=args.runs, out=out, n_blocks=args.blocks)
    print(sweep.table(results))
    plot = path.with_suffix(".png")
    print(f"{PROG}: wrote {path}" + (f" and {plot}" if plot.exists() else
                                     " (no plot: matplotlib is not installed; pip install 'ffc-kernels[bench]')"),
          file=sys.stderr)
    return 0


def _run_download(args) -> int:
    path = download(args.name, args.to)
    # The bare name finds the file only in the cache; from anywhere else (--to) it takes the path.
    use = args.name if args.to is None else path
    print(f"{PROG}: {args.name} is at {path}; inpaint with --checkpoint {use}")
    return 0
