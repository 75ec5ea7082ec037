"""benchmarks/report.py: README tables from a small results file, generator accuracy columns and r."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(provider, mode, median, **extra):
    row = {"op": "generator", "case": "big-lama", "provider": provider, "backend": "torch", "size": 512,
           "shape": {"B": 1, "C": 4, "H": 512, "W": 512}, "mode": mode, "median_ms": median,
           "p20_ms": median * 0.99, "p80_ms": median * 1.01, "gbps": None, "tflops": 0.2, "peak_mem_mb": None,
           "check": None if provider == "eager" else "ok", "skipped": None, "note": None}
    row.update(extra)
    return row


def test_generator_table_has_ratios_accuracy_and_r(report, tmp_path):
    data = {
        "schema": 1,
        "environment": {"device": "Some CPU (2 cores)", "device_type": "cpu", "device_slug": "cpu-2core",
                        "torch": "2.x", "triton": "3.x", "git_commit": "abc", "git_dirty": False, "cpu_count": 2},
        "commands": [{"started": "2026-01-01T00:00:00+00:00", "loadavg": [0.5]}],
        "rows": [
            _row("eager", "fp32", 3000.0), _row("fused", "fp32", 2000.0, max_abs=1.5e-5, psnr_db=121.0, snr_db=109.0),
            _row("eager", "bf16", 3100.0), _row("fused", "bf16", 1250.0, max_abs=5e-2, psnr_db=45.1, snr_db=32.9),
        ],
        "lone_conv": {"shape": "512->512, 3x3, 64x64, channels_last", "fp32_ms": 90.0, "bf16_ms": 45.0,
                      "fp32_tflops": 0.21, "bf16_tflops": 0.42, "r": 2.0},
    }
    path = tmp_path / "cpu-2core_20260101_abc.json"
    path.write_text(json.dumps(data))
    (entry,) = report.load([tmp_path])
    text = report.file_markdown(entry)
    lines = [line for line in text.splitlines() if line.startswith("| big-lama")]
    assert len(lines) == 2
    fp32, bf16 = (next(line for line in lines if mode in line) for mode in ("fp32 (TF32 off)", "| bf16 |"))
    cells = [c.strip() for c in bf16.strip("|").split("|")]
    head = next(line for line in text.splitlines() if line.startswith("| case"))
    columns = [c.strip() for c in head.strip("|").split("|")]
    value = dict(zip(columns, cells))
    assert value["fused vs eager"] == "2.48x"  # against the bf16 row's own eager run
    assert value["fused vs eager fp32"] == "2.40x"  # against LaMa's fp32 eager
    assert value["PSNR dB"] == "45.1" and value["SNR dB"] == "32.9" and value["max abs err"] == "5.0e-02"
    assert "1.50x" in fp32
    assert "r = 2.00" in text and "2.20x" in text  # the bf16 target 1.1 r next to the table


def test_generator_summary_ignores_other_benchmarks_rows():
    """run_gpu.py writes every benchmark into one results file: the generator's summary must read
    only its own rows (other ops' fused rows have no accuracy columns)."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_generator_mod", ROOT / "benchmarks" / "bench_generator.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    other = _row("fused", "fp32", 1.0)
    other["op"] = "spectral_mix"
    rows = [other, _row("eager", "fp32", 3000.0), _row("fused", "fp32", 2000.0, max_abs=1.5e-5, psnr_db=121.0,
                                                       snr_db=109.0)]
    text = module.summary(rows, {"r": 2.0})
    assert "512² fp32: optimized 2000 ms, 1.50x" in text
    assert text.count("optimized") == 1


def test_load_reads_only_the_per_op_results(report, tmp_path):
    """The folder, memory, refine and sweep runs write results files of their own schemas (with
    ``rows`` too) beside the per-op ones: the tables read only schema 1."""
    per_op = {"schema": 1, "environment": {"device_slug": "gpu"}, "rows": [], "commands": []}
    (tmp_path / "gpu_20261128_abc.json").write_text(json.dumps(per_op))
    (tmp_path / "folder_gpu_20261128_abc.json").write_text(json.dumps({"schema": "folder-1", "rows": [{"size": 512}]}))
    assert [f["path"].name for f in report.load([tmp_path])] == ["gpu_20261128_abc.json"]


def test_ncu_script_runs_each_op_with_the_generators_operands(monkeypatch):
    """benchmarks/ncu_ops.py's child (what Nsight Compute records on a GPU) calls every op with
    arguments the ops accept: run here on small CPU tensors through Triton's interpreter."""
    monkeypatch.setenv("FFC_KERNELS_BACKEND", "triton")
    spec = importlib.util.spec_from_file_location("bench_ncu_ops", ROOT / "benchmarks" / "ncu_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "CALLS", 1)
    from ffc_kernels.ops import reflect_pad_cat

    calls = []
    real = reflect_pad_cat.reflect_pad_cat_triton
    monkeypatch.setattr(reflect_pad_cat, "reflect_pad_cat_triton", lambda t, p: calls.append(p) or real(t, p))
    module.child(["bf16", "tf32"], device="cpu", size=4)
    assert calls == [1, 1]
