"""Measured backend choices: each op, device and shape class is timed once on every backend that can
run it, and the fastest is kept, in memory and on disk.

``backends.select`` asks here when an op gives it a way to run itself (``trial``). The file makes
every process on a machine, and every torchrun rank, take the same choice without timing again:
the first process to need a choice takes a lock on the file, times, writes it, and the others,
waiting on that lock, read it. A choice is keyed by the GPU's name, the versions of torch, Triton
and the CUDA extension, the rules it was made by (``RULES``), the op, and the op's shape class
(what changes the answer: dtype, precision, channel counts, the spectral or spatial size rounded
to a power of two).

The file is ``backend-choices.json`` in ``$FFC_KERNELS_CACHE`` (default
``$XDG_CACHE_HOME/ffc-kernels``, else ``~/.cache/ffc-kernels``); delete it to time again.
``FFC_KERNELS_BACKEND`` still forces one backend without any timing.

Agreement. Before anything is timed, every candidate's output is compared with the torch
backend's on the same inputs; a backend whose relative L2 difference exceeds the precision's
``TOLERANCE`` is left out of the timing, recorded under ``"rejected"`` in the entry, and named in
a warning. A kernel that is wrong on one GPU (a tile configuration no CPU test can run) is then
never chosen there, however fast.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import statistics
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

FILE_NAME = "backend-choices.json"
RUNS = 5  # timed runs per backend, after one warm-up; the median decides
# How choices are made; part of every key, so that choices made under older rules (2: agreement with
# torch checked first) are made again rather than trusted.
RULES = 2

# Largest relative L2 difference from the torch backend's output that a candidate may show, by
# the flavour of its dots (``ops._common.triton_dot_precision``'s names; "fp32" for ops that take
# the user's names): about 8x what rounding to each format gives on LaMa's reductions (TF32
# about 5e-4, bf16 about 4e-3), far below what a wrong tile or index gives (above 5e-2).
TOLERANCE = {"fp32": 1e-4, "tf32x3": 1e-4, "ieee": 1e-4, "tf32": 4e-3, "bf16": 3e-2, "bf16_emulated": 3e-2,
             "fp16": 1e-2, "fp16_emulated": 1e-2}

_memory: dict[str, dict] = {}
_lock = threading.Lock()


def cache_directory() -> Path:
    if os.environ.get("FFC_KERNELS_CACHE"):
        return Path(os.environ["FFC_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ffc-kernels"


def size_class(n: int) -> int:
    """``n`` rounded up to a power of two: shapes in one class share a choice."""
    return 1 << max(0, int(n) - 1).bit_length()


def prefix(device: torch.device) -> str:
    """What a choice depends on besides the op and shape: the GPU's name and the versions of torch,
    Triton and the CUDA extension; fixed for a process, so worked out once per device (every op
    call asks for a key)."""
    return _prefix(torch.device(device))


@functools.cache
def _prefix(device: torch.device) -> str:
    from ffc_kernels import _ext

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - a broken Triton is simply not a candidate
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    ext = _ext.build_id() if _ext.available() else "none"
    return "|".join([name, f"torch {torch.__version__}", f"triton {triton_version}", f"ext {ext}",
                     f"rules {RULES}"]) + "|"


def key(op: str, device: torch.device, shape: tuple) -> str:
    return prefix(device) + "|".join([op, *map(str, shape)])


def choices() -> dict[str, dict]:
    """Every choice this process knows: key -> {"backend", "ms": {backend: median ms}}."""
    _merge_file()
    return dict(_memory)


def known(op: str, device: torch.device, shape: tuple, candidates: list[str]) -> str | None:
    """The stored choice, without timing (None when there is none among ``candidates``): what a
    CUDA graph capture or a compiled graph can use, since neither can time anything."""
    k = key(op, device, shape)
    if k not in _memory:
        _merge_file()
    entry = _memory.get(k)
    return entry["backend"] if entry and entry["backend"] in candidates else None


def choose(op: str, device: torch.device, shape: tuple, candidates: list[str],
           trial: Callable[[str], object], timer: Callable | None = None, tolerance: float | None = None) -> str:
    """The fastest of ``candidates`` for ``op`` at ``shape`` on ``device``, timed at most once per
    machine. ``trial(backend)`` runs the op once on that backend and returns its output. With a
    ``tolerance`` and "torch" among the candidates, those whose output differs from torch's by
    more (``disagreement``) are not timed and never chosen. One candidate needs no timing."""
    if len(candidates) == 1:
        return candidates[0]
    k = key(op, device, shape)
    with _lock:
        if k in _memory and _memory[k]["backend"] in candidates:
            return _memory[k]["backend"]
        with _file_lock():
            _merge_file()
            if k not in _memory or _memory[k]["backend"] not in candidates:
                rejected = _disagreeing(op, shape, candidates, trial, tolerance)
                ms = {b: (timer or _time_cuda)(lambda b=b: trial(b), device) for b in candidates
                      if b not in rejected}
                _memory[k] = {"backend": min(ms, key=ms.get), "ms": ms}
                if rejected:
                    _memory[k]["rejected"] = rejected
                _write_file()
        return _memory[k]["backend"]


def disagreement(out, reference) -> float:
    """Relative L2 difference of ``out`` from ``reference`` (complex as real pairs), in fp32; inf
    when their shapes, or their non-finite values (NaN where NaN, the same infinities), differ."""
    if not isinstance(out, torch.Tensor) or not isinstance(reference, torch.Tensor) or out.shape != reference.shape:
        return math.inf
    if out.is_complex() or reference.is_complex():
        if not (out.is_complex() and reference.is_complex()):
            return math.inf
        out, reference = torch.view_as_real(out), torch.view_as_real(reference)
    out, reference = out.float(), reference.float()
    finite = torch.isfinite(reference)
    if not bool(finite.all()):
        o, r = out[~finite], reference[~finite]
        if not bool(((o == r) | (o.isnan() & r.isnan())).all()) or not bool(torch.isfinite(out[finite]).all()):
            return math.inf
        out, reference = out[finite], reference[finite]
    elif not bool(torch.isfinite(out).all()):
        return math.inf
    diff, scale = torch.linalg.vector_norm(out - reference).item(), torch.linalg.vector_norm(reference).item()
    return diff / scale if scale > 0 else diff


def _disagreeing(op, shape, candidates, trial, tolerance) -> dict[str, float]:
    """{backend: its disagreement with torch} for the candidates beyond ``tolerance``."""
    if tolerance is None or "torch" not in candidates:
        return {}
    reference = trial("torch")
    rejected = {}
    for backend in candidates:
        if backend != "torch":
            err = disagreement(trial(backend), reference)
            if not err <= tolerance:
                rejected[backend] = err if math.isfinite(err) else None  # None: shapes or NaN/inf differ
                warnings.warn(f"ffc_kernels: the {backend} backend's {op} differs from torch's by {err:.3g} "
                              f"(relative L2, tolerance {tolerance:g}) at shape class {shape} on this device; "
                              f"it is not used there", RuntimeWarning, stacklevel=4)
    return rejected


def _time_cuda(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn`` over RUNS runs after one warm-up (CUDA events)."""
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _path() -> Path:
    return cache_directory() / FILE_NAME


@contextlib.contextmanager
def _file_lock():
    """An exclusive lock beside the file (POSIX); without one, or where the cache is not writable,
    each process times for itself."""
    try:
        import fcntl

        _path().parent.mkdir(parents=True, exist_ok=True)
        handle = open(_path().with_suffix(".lock"), "w")
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _merge_file() -> None:
    try:
        stored = json.loads(_path().read_text())
    except (OSError, ValueError):
        return  # no file yet, or a damaged one: time again and rewrite it
    if isinstance(stored, dict):
        for k, v in stored.items():
            if isinstance(v, dict) and isinstance(v.get("backend"), str):
                _memory.setdefault(k, v)


def _write_file() -> None:
    path = _path()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(_memory, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)  # a read-only cache: the choice lives in this process only
