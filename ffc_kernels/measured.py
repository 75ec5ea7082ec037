"""Measured backend choices: each op, device and shape class is timed once on every backend that can
run it, and the fastest is kept, in memory and on disk.

``backends.select`` asks here when an op gives it a way to run itself (``trial``). The file makes
every process on a machine, and every torchrun rank, take the same choice without timing again:
the first process to need a choice takes a lock on the file, times, writes it, and the others,
waiting on that lock, read it. A choice is keyed by the GPU's name, the versions of torch, Triton
and the CUDA extension, the op, and the op's shape class (what changes the answer: dtype,
precision, channel counts, the spectral or spatial size rounded to a power of two).

The file is ``backend-choices.json`` in ``$FFC_KERNELS_CACHE`` (default
``$XDG_CACHE_HOME/ffc-kernels``, else ``~/.cache/ffc-kernels``); delete it to time again.
``FFC_KERNELS_BACKEND`` still forces one backend without any timing.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import threading
from pathlib import Path
from typing import Callable

import torch

FILE_NAME = "backend-choices.json"
RUNS = 5  # timed runs per backend, after one warm-up; the median decides

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
    return "|".join([name, f"torch {torch.__version__}", f"triton {triton_version}", f"ext {ext}"]) + "|"


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
           trial: Callable[[str], object], timer: Callable | None = None) -> str:
    """The fastest of ``candidates`` for ``op`` at ``shape`` on ``device``, timed at most once per
    machine. ``trial(backend)`` runs the op once on that backend. One candidate needs no timing."""
    if len(candidates) == 1:
        return candidates[0]
    k = key(op, device, shape)
    with _lock:
        if k in _memory and _memory[k]["backend"] in candidates:
            return _memory[k]["backend"]
        with _file_lock():
            _merge_file()
            if k not in _memory or _memory[k]["backend"] not in candidates:
                ms = {b: (timer or _time_cuda)(lambda b=b: trial(b), device) for b in candidates}
                _memory[k] = {"backend": min(ms, key=ms.get), "ms": ms}
                _write_file()
        return _memory[k]["backend"]


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
