"""Everything a lent GPU should run, in one call of about 8 minutes.

    python benchmarks/run_gpu.py --out "$OUT"

1. the device: nvidia-smi, torch's view of the GPU, ffc_kernels' backends;
2. its two ceilings: a 1 GiB device-to-device copy (GB/s, bytes read + written) and 8192^3
   matmuls in bf16, TF32 and fp32 (TFLOP/s), each a do_bench median;
3. the tests under CUDA: ``pytest -q tests -m gpu``, then the rest of the suite
   (``-m "not gpu"``; the two together are the full ``pytest -q tests``; ``--full-tests`` runs
   that literal command as the second step instead);
4. every benchmark on cuda, eager and fused, at 512^2..4096^2 (generator: 512^2..2048^2) in
   fp32+TF32, bf16 and fp32 (TF32 off), in that order; then the end-to-end stages (the sweep of
   ``lama-fast bench`` at 1024^2..4096^2, peak memory one pass and tiled up to 8192^2, LaMa's
   refinement of a 1.8 MP image (time and peak memory, optimized bf16 and TF32 against the
   reference), the per-kernel profile at 2048^2, folder throughput one by one against pipelined
   at 512^2..2048^2 with batches 1, 4, 8); then torch.compile of the reference in fp32+TF32 with what time
   is left (inductor compiles take most of it);
5. a markdown report (+ PNG if matplotlib is there) of the results.

Writes into ``--out`` (default benchmarks/results/): the results JSON
(``<device>_<date>_<commit>.json``), the report (same stem, ``.md`` / ``.png``) and
``run_gpu_<device>_<date>.log`` with every command's full output. Each stage has a time cap and
a subprocess that overruns is killed with its process group; the JSON is rewritten after each
measurement, so a run cut short keeps what it measured. ``--allow-cpu`` runs the same
orchestration on a CPU (small sizes) to check the script itself.

A lent machine gets a copy of the working tree without ``.git``: name the commit yourself,
``FFC_BENCH_COMMIT=$(git rev-parse --short=10 HEAD)`` expanded here, before the call, e.g.
``run(command="FFC_BENCH_COMMIT=2767b0093e python benchmarks/run_gpu.py --out $OUT")``
(``FFC_BENCH_DIRTY=1`` if the tree has uncommitted changes); otherwise files say ``nocommit``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import torch  # noqa: E402

ROOT = common.ROOT
BENCHES = [  # script, pass-1 weight of the time
    ("bench_spectral_mix.py", 0.12),
    ("bench_pointwise_conv.py", 0.20),
    ("bench_fourier_unit.py", 0.15),
    ("bench_ffc_bn_act.py", 0.23),
    ("bench_generator.py", 0.30),
]


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", buffering=1)

    def __call__(self, *parts, echo: bool = True) -> None:
        line = " ".join(str(p) for p in parts)
        self.file.write(line + "\n")
        if echo:
            print(line, flush=True)

    def raw(self, text: str) -> None:
        self.file.write(text if text.endswith("\n") else text + "\n")


class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def run(cmd: list[str], log: Log, timeout: float, env=None) -> tuple[str, float, str]:
    """Run ``cmd`` in the repository root; on timeout kill its whole process group (inductor's
    compile workers included). Returns (exit status or 'timeout', seconds, output)."""
    log(f"$ {' '.join(cmd)}    [cap {timeout:.0f} s]")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        status = str(proc.returncode)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    seconds = time.monotonic() - start
    log.raw(out or "")
    log(f"  -> exit {status} after {seconds:.0f} s")
    return status, seconds, out or ""


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ------------------------------------------------------------------------------------ stages

def device_info(log: Log, device) -> None:
    import ffc_kernels

    if device.type == "cuda":
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                 "clocks.mem,power.limit,temperature.gpu,utilization.gpu", "--format=csv"],
                capture_output=True, text=True, timeout=30)
            log(smi.stdout.strip() or smi.stderr.strip())
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"nvidia-smi: {exc}")
    env = common.environment(device)
    for key, value in env.items():
        if key != "backend_info":
            log(f"{key}: {value}")
    log(str(ffc_kernels.backend_info(device)))


def measure_ceilings(log: Log) -> dict:
    """Device-to-device copy bandwidth (read + write) and large-matmul rates, do_bench medians."""
    import triton.testing

    torch.manual_seed(0)
    result = {}
    x = torch.randn(2**28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    result["copy_gbps"] = 2 * x.nbytes / (ms * 1e-3) / 1e9
    result["copy_bytes"] = 2 * x.nbytes
    del x, y
    m = 8192
    saved = torch.get_float32_matmul_precision()
    try:
        for name, dtype, prec in (("bf16", torch.bfloat16, "highest"), ("tf32", torch.float32, "high"),
                                  ("fp32", torch.float32, "highest")):
            torch.set_float32_matmul_precision(prec)
            a = torch.randn(m, m, device="cuda", dtype=dtype)
            b = torch.randn(m, m, device="cuda", dtype=dtype)
            ms = triton.testing.do_bench(lambda: torch.mm(a, b), warmup=25, rep=200, return_mode="median")
            result[f"{name}_tflops"] = 2 * m**3 / (ms * 1e-3) / 1e12
            del a, b
    finally:
        torch.set_float32_matmul_precision(saved)
    torch.cuda.empty_cache()
    log("ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items() if not k.endswith("bytes")))
    return result


def pytest_summary(output: str) -> str:
    for line in reversed(output.strip().splitlines()):
        if any(w in line for w in ("passed", "failed", "error", "no tests ran", "skipped", "deselected")):
            return line.strip("= ").strip()
    return "no pytest summary line (see the log)"


def run_tests(log: Log, clock: Clock, args, reserve: float) -> list[dict]:
    steps = [(["-m", "gpu"], args.gpu_tests_cap),
             ([] if args.full_tests else ["-m", "not gpu"], args.tests_cap)]
    records = []
    for marker, cap in steps:
        cmd = [sys.executable, "-m", "pytest", "-q", "tests", *marker, "-p", "no:cacheprovider"]
        timeout = min(cap, clock.left() - reserve)
        if timeout < 20:
            log(f"skipping {' '.join(cmd)}: no time left")
            continue
        status, seconds, out = run(cmd, log, timeout, env=subprocess_env())
        shown = " ".join(f"'{c}'" if " " in c else c for c in cmd[1:])
        records.append({"command": f"python {shown}", "rc": status, "seconds": round(seconds, 1),
                        "summary": pytest_summary(out) if status != "timeout" else f"killed after {seconds:.0f} s"})
        log(f"  tests: {records[-1]['summary']}")
    return records


def build_extension(log: Log, clock: Clock, cap: float) -> None:
    env = subprocess_env() | {"FFC_KERNELS_BUILD_EXT": "1"}
    run([sys.executable, "setup.py", "build_ext", "--inplace"], log, min(cap, clock.left() - 240), env=env)
    run([sys.executable, "-c", "from ffc_kernels import _ext; print('extension available:', _ext.available(), "
         "_ext.why_unavailable() or '')"], log, 60, env=env)


def run_benches(log: Log, clock: Clock, args, results_path: Path, device: str) -> None:
    base = ["--device", device, "--results-file", str(results_path), "--rep-ms", str(args.rep_ms)]
    # Pass 1: eager and fused in every mode, all sizes, no compile.
    end_to_end_s = 0 if set(args.skip_end_to_end) >= {"sweep", "memory", "profile"} else args.end_to_end_s
    budget = clock.left() - args.reserve_s - args.compile_s - end_to_end_s
    weights_left = sum(w for _, w in BENCHES)
    for script, weight in BENCHES:
        share = max(budget * weight / weights_left, 20) if budget > 0 else 0
        weights_left -= weight
        start = time.monotonic()
        if share <= 0 or clock.left() < args.reserve_s + 20:
            log(f"skipping {script}: no time left")
            continue
        sizes = args.generator_sizes if script == "bench_generator.py" else args.sizes
        cmd = [sys.executable, str(HERE / script), *base, "--sizes", *map(str, sizes),
               "--modes", *args.modes, "--no-compile", "--budget-s", f"{share:.0f}"]
        run(cmd, log, min(share + 60, clock.left() - args.reserve_s), env=subprocess_env())
        budget -= time.monotonic() - start
    end_to_end(log, clock, args)
    # Pass 2: torch.compile of the reference, fp32 + TF32, with what is left.
    if args.no_compile:
        return
    for i, (script, _) in enumerate(BENCHES):
        left = clock.left() - args.reserve_s
        share = left / (len(BENCHES) - i)
        if share < 30:
            log(f"skipping torch.compile for {script}: {left:.0f} s left")
            continue
        sizes = args.generator_sizes if script == "bench_generator.py" else args.sizes
        cmd = [sys.executable, str(HERE / script), *base, "--sizes", *map(str, sizes), "--modes", "tf32",
               "--compile", "--providers", "compile", "--budget-s", f"{share:.0f}"]
        run(cmd, log, min(share + 90, left), env=subprocess_env())


def end_to_end(log: Log, clock: Clock, args) -> None:
    """What users run: the sweep (`lama-fast bench`: 1024² to 4096², no compile), peak memory one
    pass and tiled (bench_memory.py), LaMa's refinement at 1.8 MP (bench_refine.py), the
    per-step/per-kernel profile at 2048², Nsight Compute's
    sections for the Triton kernels (ncu_ops.py), and folder throughput (bench_folder.py); each within
    its cap and skipped when the budget is short."""
    stages = [
        ("sweep", [sys.executable, "-m", "lama_fast", "bench", "--device", "cuda", "--no-compile",
                   "--sizes", *map(str, args.sweep_sizes), "--out", args.out], 150),
        ("memory", [sys.executable, str(HERE / "bench_memory.py"), "--device", "cuda", "--out", args.out,
                    "--points", "2048:bf16", "4096:bf16", "4096:tf32", "8192:bf16:1024"], 120),
        # LaMa's refinement at its 1.8 MP budget (1340² = 1.796 MP): time and peak memory on one GPU
        ("refine", [sys.executable, str(HERE / "bench_refine.py"), "--device", "cuda", "--size", "1340",
                    "--points", "optimized:bf16", "optimized:tf32", "reference:fp32", "--timeout", "100",
                    "--out", args.out], 240),
        ("profile", [sys.executable, str(HERE / "profile_gpu.py"), "--size", "2048", "--out", args.out], 150),
        ("ncu", [sys.executable, str(HERE / "ncu_ops.py"), "--out", args.out], 120),
        ("folder", [sys.executable, str(HERE / "bench_folder.py"), "--device", "cuda", "--precision", "bf16",
                    "--sizes", "512", "1024", "2048", "--count", "32", "--batches", "1", "4", "8", "--out", args.out],
         120),
    ]
    for name, cmd, cap in stages:
        if name in args.skip_end_to_end:
            continue
        if clock.left() < args.reserve_s + cap / 2:
            log(f"skipping {name}: {clock.left():.0f} s left")
            continue
        run(cmd, log, min(cap, clock.left() - args.reserve_s), env=subprocess_env())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(common.RESULTS_DIR), help="directory for results, report and log")
    parser.add_argument("--budget-s", type=float, default=480, help="total wall time to plan for (default 480)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(common.INPUT_SIZES))
    parser.add_argument("--generator-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--modes", nargs="+", default=["tf32", "bf16", "fp32"], choices=sorted(common.MODES),
                        help="precision modes, most wanted first (a short budget drops the last ones)")
    parser.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition time per provider")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-benches", action="store_true")
    parser.add_argument("--full-tests", action="store_true",
                        help="second test step runs the literal `pytest -q tests` (repeats the gpu tests)")
    parser.add_argument("--gpu-tests-cap", type=float, default=150,
                        help="seconds for `pytest tests -m gpu` (about 90 s on an H100, plus 30 s building the extension)")
    parser.add_argument("--tests-cap", type=float, default=120, help="seconds for the rest of the tests")
    parser.add_argument("--build-ext", action="store_true",
                        help="build csrc's extension in place first (FFC_KERNELS_BUILD_EXT=1), so the "
                             "spectral mix is also timed on it")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile pass")
    parser.add_argument("--sweep-sizes", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="sizes of the end-to-end sweep (lama-fast bench)")
    parser.add_argument("--skip-end-to-end", nargs="*", default=[],
                        choices=["sweep", "memory", "refine", "profile", "ncu", "folder"],
                        help="leave out these end-to-end stages")
    parser.add_argument("--end-to-end-s", type=float, default=240,
                        help="seconds the per-op benchmarks leave for the end-to-end stages")
    parser.add_argument("--bench-s", type=float, default=200,
                        help="seconds the tests must leave for the eager/fused benchmark pass")
    parser.add_argument("--compile-s", type=float, default=60,
                        help="seconds kept for the torch.compile pass (it also gets whatever pass 1 leaves)")
    parser.add_argument("--reserve-s", type=float, default=25, help="seconds kept for the report")
    parser.add_argument("--allow-cpu", action="store_true", help="run on a CPU (to check this script)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("run_gpu: torch sees no CUDA device (use --allow-cpu to exercise the script on a CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    log = Log(out / f"run_gpu_{common.device_slug(device)}_{date}.log")
    results_path = common.default_results_path(device, out)
    log(f"# run_gpu.py {' '.join(sys.argv[1:])} | {datetime.datetime.now(datetime.timezone.utc).isoformat()}")
    log(f"# results: {results_path}")

    device_info(log, device)
    results = common.Results(device, path=results_path)
    results.save()
    if device.type == "cuda":
        try:
            results.set("ceilings", measure_ceilings(log))
        except Exception as exc:  # keep going: the benchmarks matter more
            log(f"ceilings failed: {type(exc).__name__}: {exc}")
    if args.build_ext:
        build_extension(log, clock, cap=150)
    if not args.skip_tests:
        results.set("tests", run_tests(log, clock, args, reserve=args.reserve_s + args.bench_s))
    if not args.skip_benches:
        run_benches(log, clock, args, results_path, str(device))

    md, png = results_path.with_suffix(".md"), results_path.with_suffix(".png")
    run([sys.executable, str(HERE / "report.py"), str(results_path), "--out", str(md), "--plot", str(png)],
        log, max(clock.left(), 60))
    log(f"# done in {clock.elapsed():.0f} s; files in {out}:")
    for f in sorted(out.iterdir()):
        if f.name.startswith((results_path.stem, "run_gpu_")):
            log(f"#   {f.name}")
    if md.exists():
        print("\n" + md.read_text(), flush=True)
    failed = '"check": "FAIL"' in results_path.read_text() if results_path.exists() else False
    tests_failed = any(t["rc"] != "0" for t in results.data.get("tests", []))
    return 1 if failed or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
