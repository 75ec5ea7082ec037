"""The end-to-end sweep behind ``lama-fast bench``: big-lama per resolution and variant.

Variants: LaMa's eager generator (IEEE fp32, the baseline), ``torch.compile`` of it, and
``lama_fast.optimize`` of a copy in each precision the device runs (fp32 and bf16 on a CPU; fp32,
tf32 and bf16 on CUDA). Same seeded demo weights (``lama_fast.demo.demo_generator``) and the same
input for all. Per (size, variant): the median time and its p20-p80 spread over the timed runs
(after one warm-up call, which also compiles or folds), the speedup over eager, the peak memory of
the variant's calls, and the accuracy against the eager fp32 output (max |difference|, PSNR on
[0, 1], SNR = 10 log10(var(reference) / MSE)).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on a
Linux CPU the growth of the process's peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` before each variant), None elsewhere.

Writes ``sweep_<device>_<date>_<commit>.json`` and, with matplotlib (the ``bench`` extra), a PNG of
time and peak memory against resolution, into ``out``.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

SCHEMA = "sweep-1"
ROW_KEYS = ("size", "variant", "precision", "median_s", "p20_s", "p80_s", "runs", "speedup", "peak_bytes",
            "max_abs", "psnr_db", "snr_db", "seconds_first_call")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _commit() -> str:
    if os.environ.get("FFC_BENCH_COMMIT"):
        return os.environ["FFC_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "nocommit"
    except (OSError, subprocess.SubprocessError):
        return "nocommit"


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{_cpu_name()} ({os.cpu_count()} cores)"
    return {"device": name, "device_type": device.type, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class _Peak:
    """Peak memory over a block of calls (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self._reset_rss()
        self.bytes = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.bytes = max(0, _status("VmHWM") - self.base)
        return False

    @staticmethod
    def _reset_rss():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident set size starts again from the current one
            return _status("VmRSS")
        except (OSError, StopIteration):
            return None


def _status(key: str) -> int:
    """A byte count of /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM on Linux (``ru_maxrss`` keeps the peak
    of the process that forked this one), else ``ru_maxrss``."""
    try:
        return _status("VmHWM")
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def accuracy(out, ref) -> dict:
    """max |out - ref|, PSNR on [0, 1] and SNR = 10 log10(var(ref) / MSE), in dB."""
    out, ref = out.double().cpu(), ref.double().cpu()
    mse = float(((out - ref) ** 2).mean())
    return {"max_abs": float((out - ref).abs().max()),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse),
            "snr_db": math.inf if mse == 0 else 10 * math.log10(float(ref.var()) / mse)}


def lama_input(size: int, device) -> torch.Tensor:
    """LaMa's input (masked RGB + mask) for the demo scene at size x size."""
    from lama_fast.demo import demo_image, demo_mask

    image = torch.from_numpy(demo_image(size)).permute(2, 0, 1)[None].float() / 255
    mask = (torch.from_numpy(demo_mask(size)) > 127)[None, None].float()
    return torch.cat([image * (1 - mask), mask], dim=1).to(device)


def _time(fn, runs: int, device) -> tuple[list[float], object, float]:
    def call():
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    out, first = call()
    times = []
    for _ in range(runs):
        out, seconds = call()
        times.append(seconds)
    return times, out, first


def variants(device: torch.device, compile_reference: bool) -> list[tuple[str, str]]:
    """(variant, precision) pairs, eager first."""
    out = [("eager", "fp32")]
    if compile_reference:
        out.append(("compile", "fp32"))
    precisions = ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    return out + [("optimized", p) for p in precisions]


def run_sweep(sizes, *, device="cpu", compile_reference=True, runs=None, out=None, n_blocks=None,
              progress=True) -> tuple[dict, Path | None]:
    """Run the sweep; returns (results, path of the JSON written or None when ``out`` is None).
    ``runs``: timed runs per point (default 3 up to 512², 2 above). ``n_blocks``: fewer residual
    blocks than big-lama's 18 (for quick checks)."""
    import tqdm

    import lama_fast
    from lama_fast.demo import demo_generator

    device = torch.device(device)
    base = demo_generator(seed=0, n_blocks=n_blocks).eval().to(device)
    todo = [(size, v, p) for size in sizes for v, p in variants(device, compile_reference)]
    results = {"schema": SCHEMA, "environment": environment(device), "rows": []}
    path = None
    if out is not None:
        stem = f"sweep_{_slug(results['environment']['device'])}_{datetime.date.today():%Y%m%d}"
        path = Path(out) / f"{stem}_{results['environment']['commit']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm.tqdm(todo, unit="point", disable=not progress, dynamic_ncols=True)
    reference_out, eager_median = {}, {}
    compiled = None
    with torch.inference_mode():
        for size, variant, precision in bar:
            bar.set_postfix_str(f"{size}² {variant} {precision}")
            x = lama_input(size, device)
            n = runs or (3 if size <= 512 else 2)
            if variant == "optimized":
                model = lama_fast.optimize(copy.deepcopy(base), precision=precision)
            elif variant == "compile":
                if compiled is None:
                    compiled = torch.compile(base)
                model = compiled
            else:
                model = base
            saved = _exact_fp32(device)
            try:
                with _Peak(device) as peak:
                    times, y, first = _time(lambda: model(x), n, device)
            finally:
                _restore(device, saved)
            row = {"size": size, "variant": variant, "precision": precision, "runs": n,
                   "median_s": statistics.median(times), "p20_s": _quantile(times, 0.2),
                   "p80_s": _quantile(times, 0.8), "peak_bytes": peak.bytes, "seconds_first_call": first}
            if variant == "eager":
                reference_out[size], eager_median[size] = y, row["median_s"]
                row.update(speedup=1.0, max_abs=0.0, psnr_db=math.inf, snr_db=math.inf)
            else:
                row["speedup"] = eager_median[size] / row["median_s"]
                row.update(accuracy(y, reference_out[size]))
            results["rows"].append(row)
            if variant == "optimized":
                del model
            if path is not None:
                path.write_text(json.dumps(results, indent=1))
    if path is not None:
        plot(results, path.with_suffix(".png"))
    return results, path


def _exact_fp32(device):
    """IEEE fp32 in cuDNN and cuBLAS for the eager and compiled references (the optimized
    generator sets its own precision)."""
    if device.type != "cuda":
        return None
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return saved


def _restore(device, saved):
    if saved is not None:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def _quantile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def table(results: dict) -> str:
    """Markdown table of a sweep's rows."""
    env = results["environment"]
    lines = [f"{env['device']}, torch {env['torch']}, {env['threads']} threads, commit `{env['commit']}`, "
             f"{env['date'][:10]}.", "",
             "| input | variant | precision | median s (p20-p80) | speedup | peak MiB | max abs err | PSNR dB | SNR dB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        acc = ("-", "-", "-") if r["variant"] == "eager" else (
            f"{r['max_abs']:.1e}", f"{r['psnr_db']:.1f}", f"{r['snr_db']:.1f}")
        lines.append(f"| {r['size']}² | {r['variant']} | {r['precision']} | {r['median_s']:.2f} "
                     f"({r['p20_s']:.2f}-{r['p80_s']:.2f}) | {r['speedup']:.2f}x | {peak} | {' | '.join(acc)} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """Time and peak memory against resolution, one line per variant; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series = {}
    for r in results["rows"]:
        series.setdefault(f"{r['variant']} {r['precision']}", []).append(r)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["size"])
        sizes = [r["size"] for r in rows]
        ax_t.plot(sizes, [r["median_s"] for r in rows], marker="o", label=label)
        if all(r["peak_bytes"] is not None for r in rows):
            ax_m.plot(sizes, [r["peak_bytes"] / 2**20 for r in rows], marker="o", label=label)
    for ax, ylabel in ((ax_t, "median seconds per image"), (ax_m, "peak memory, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input size (pixels a side)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"big-lama end to end: {results['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
