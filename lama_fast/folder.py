"""A folder of photos, resumable and across processes: the directory mode of ``lama-fast inpaint``.

``inpaint_folder(images, masks, out, generator)`` pairs each image with its mask, skips the outputs
that exist (unless ``overwrite``), runs the rest through ``inpaint_many`` (readers in worker
processes, batches by size) and writes each PNG from a thread while the next batch runs. Every file
is written atomically: to a hidden temporary name in the output folder, flushed to disk, then
renamed, so a run that is killed leaves no truncated PNG, and the next run skips what is done and
removes the temporaries the killed one left.

Under ``torchrun`` each process (rank) takes every WORLD_SIZE-th pair of the sorted list, on
``cuda:LOCAL_RANK`` or the CPU; ``gather`` brings every rank's records to all of them through
torch.distributed's gloo backend, so rank 0 prints one summary and writes one report.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import PIL.Image
import torch
import tqdm

from lama_fast.many import inpaint_many

__all__ = ["FolderPlan", "Record", "IMAGE_SUFFIXES", "gather", "inpaint_folder", "pair_images_and_masks",
           "plan_folder", "run_folder", "write_report"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_TEMPORARY = ".lama-fast.tmp"  # suffix of the files being written; a killed run leaves some behind


@dataclasses.dataclass
class Record:
    """What happened to one image: ``status`` is written, skipped (its output existed), failed
    (``error`` says why) or no mask. ``seconds``: reading, preparing, its share of the batch's
    forward, and writing."""

    image: str
    mask: str | None
    output: str | None
    status: str
    seconds: float | None = None
    error: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class FolderPlan:
    jobs: list[tuple[Path, Path, Path]]  # (image, mask, output), sorted by image name
    unmatched: list[Path]  # images without a mask
    output: Path


def pair_images_and_masks(image_dir: Path, mask_dir: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Pair each image ``<stem>.<ext>`` in ``image_dir`` with ``<stem>_mask.<ext>`` or ``<stem>.<ext>``
    in ``mask_dir`` (``_mask`` and ``.png`` preferred). Returns (pairs, images without a mask).

    When both are the same directory, files named ``*_mask.*`` are masks, not images.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    same = image_dir.resolve() == mask_dir.resolve()
    masks = {(p.stem, p.suffix.lower()): p for p in mask_dir.iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    pairs, unmatched = [], []
    for image in sorted(image_dir.iterdir()):
        if not image.is_file() or image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if same and image.stem.endswith("_mask"):
            continue
        candidates = [(image.stem + tail, ext) for tail in ("_mask", "") for ext in IMAGE_SUFFIXES]
        found = next((masks[key] for key in candidates if key in masks and masks[key].resolve() != image.resolve()), None)
        if found is None:
            unmatched.append(image)
        else:
            pairs.append((image, found))
    return pairs, unmatched


def plan_folder(image_dir, mask_dir, output) -> FolderPlan:
    """The jobs of a folder run: ``output/<stem>.png`` per paired image. Raises ValueError when
    the folders cannot work (the output is a file or one of the inputs, no image, two images
    that would write the same output)."""
    image_dir, mask_dir, output = Path(image_dir), Path(mask_dir), Path(output)
    for what, path in (("image", image_dir), ("mask", mask_dir)):
        if not path.is_dir():
            raise ValueError(f"{what} directory not found: {path}")
    if output.exists() and not output.is_dir():
        raise ValueError(f"with directories as IMAGE and MASK, OUT must be a directory; {output} is a file")
    if output.resolve() in (image_dir.resolve(), mask_dir.resolve()):
        raise ValueError(f"the output directory must differ from the image and mask directories: {output}")
    pairs, unmatched = pair_images_and_masks(image_dir, mask_dir)
    if not pairs and not unmatched:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    stems = {}
    for image, _ in pairs:
        if image.stem in stems:
            raise ValueError(f"{stems[image.stem].name} and {image.name} would both be written to "
                             f"{output / (image.stem + '.png')}")
        stems[image.stem] = image
    return FolderPlan([(image, mask, output / f"{image.stem}.png") for image, mask in pairs], unmatched, output)


def run_folder(plan: FolderPlan, generator, *, batch_size: int = 1, overwrite: bool = False, device=None,
               num_workers: int | None = None, tile_size="auto", rank: int = 0, world_size: int = 1,
               progress: bool = True, log: Callable[[str, str], None] | None = None) -> list[Record]:
    """Run this rank's share of ``plan``; returns its records (the unmatched images are rank 0's).

    ``log(kind, message)`` is called with kind "error" or "warning" for each image that fails or
    warns, as it happens (the CLI prints them as lines above the progress bar).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    jobs = plan.jobs[rank::world_size]
    records = {} if rank else {str(image): Record(str(image), None, None, "no mask") for image in plan.unmatched}
    todo = []
    for image, mask, output in jobs:
        _remove_temporaries(output)
        if output.exists() and not overwrite:
            records[str(image)] = Record(str(image), str(mask), str(output), "skipped")
        else:
            todo.append((image, mask, output))
    if todo:
        plan.output.mkdir(parents=True, exist_ok=True)
    bar = tqdm.tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="image", file=sys.stderr,
                    dynamic_ncols=True, disable=not progress,
                    desc=f"rank {rank}/{world_size}" if world_size > 1 else None)

    def finish(record: Record) -> None:
        records[record.image] = record
        for message in record.warnings:
            if log:
                log("warning", f"{Path(record.image).name}: {message}")
        if record.status == "failed" and log:
            log("error", record.error)
        bar.update(1)

    pending: dict[concurrent.futures.Future, Record] = {}
    most_pending = max(2, 2 * batch_size)  # results held in memory while the writer catches up

    def collect(wait_for_all: bool) -> None:
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=(concurrent.futures.ALL_COMPLETED if wait_for_all
                                                                    else concurrent.futures.FIRST_COMPLETED))
            for future in done:
                record = pending.pop(future)
                try:
                    record.seconds += future.result()
                except OSError as error:
                    record.status, record.error = "failed", f"cannot write {record.output}: {error}"
                finish(record)
            if not wait_for_all and len(pending) < most_pending:
                return

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lama-fast-writer") as writer:
        try:
            for result in inpaint_many([(image, mask) for image, mask, _ in todo], generator, batch_size=batch_size,
                                       device=device, num_workers=num_workers, tile_size=tile_size):
                image, mask, output = todo[result.index]
                record = Record(str(image), str(mask), str(output), "written" if result.ok else "failed",
                                result.seconds, result.error, list(result.warnings))
                if result.ok:
                    pending[writer.submit(_write_png, result.output, output)] = record
                    if len(pending) >= most_pending:
                        collect(wait_for_all=False)
                else:
                    finish(record)
            collect(wait_for_all=True)
        finally:
            bar.close()
    return [records[key] for key in sorted(records)]


def inpaint_folder(image_dir, mask_dir, output, generator, **options) -> list[Record]:
    """Inpaint every image in ``image_dir`` that has a mask in ``mask_dir`` into ``output``
    (``output/<stem>.png``); ``options`` as for ``run_folder``. Returns one record per image."""
    return run_folder(plan_folder(image_dir, mask_dir, output), generator, **options)


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}{_TEMPORARY}"


def _write_png(array, path: Path) -> float:
    """Write ``array`` as a PNG at ``path`` atomically; returns the seconds it took."""
    start = time.perf_counter()
    temporary = _temporary(path)
    try:
        with open(temporary, "wb") as f:
            PIL.Image.fromarray(array).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return time.perf_counter() - start


def _remove_temporaries(output: Path) -> None:
    """Remove what an interrupted run left while writing ``output`` (only this output's: another
    rank may be writing its own)."""
    if output.parent.is_dir():
        prefix = f".{output.name}."
        for leftover in output.parent.glob(f"{prefix}*{_TEMPORARY}"):
            if leftover.name[len(prefix):-len(_TEMPORARY)].isdigit():
                leftover.unlink(missing_ok=True)


def write_report(records: list[Record], path) -> None:
    """The records as a JSON list, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    with open(temporary, "w") as f:
        json.dump([dataclasses.asdict(r) for r in records], f, indent=1)
        f.write("\n")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------- torchrun


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device_type: str) -> tuple[int, int, torch.device | None]:
    """(rank, world size, this rank's device) under torchrun: joins the process group (gloo: the
    ranks only exchange their records) and, for CUDA, takes ``cuda:LOCAL_RANK``."""
    import torch.distributed as dist

    if not dist.is_initialized():
        # A rank that finishes early waits for the slowest one at the gather: allow a long run.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    device = None
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but torch sees {torch.cuda.device_count()} CUDA devices: "
                               "give torchrun at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def gather(records: list[Record]) -> list[Record]:
    """Every rank's records, on every rank, sorted by image; the records themselves without torchrun."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return records
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    return sorted((r for part in everyone for r in part), key=lambda r: r.image)


def finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
