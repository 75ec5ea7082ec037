"""Results files -> markdown tables (and a PNG plot where matplotlib is installed); the README's block.

    python benchmarks/report.py                                   # every file in benchmarks/results/
    python benchmarks/report.py results/a.json --out report.md --plot report.png
    python benchmarks/report.py --latest --update-readme          # README.md's BENCH-TABLE block
    python benchmarks/report.py --sweep-readme results/sweep_X.json  # README.md's SWEEP-TABLE block

``--latest`` keeps the newest file of each device. ``--update-readme [PATH]`` replaces what lies
between ``<!-- BENCH-TABLE -->`` and ``<!-- /BENCH-TABLE -->`` (the closing marker is added after
the opening one when it is missing); nothing else in the file changes. Tables are generated from
the JSON rows only, never typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- BENCH-TABLE -->", "<!-- /BENCH-TABLE -->"

OP_ORDER = ["spectral_mix", "pointwise_conv", "fourier_unit", "ffc_bn_act", "generator"]
OP_TITLE = {
    "spectral_mix": "spectral_mix (FourierUnit's 1x1 conv on the spectrum, 192 complex channels)",
    "pointwise_conv": "pointwise_conv (SpectralTransform conv1 / conv2 with their epilogues)",
    "fourier_unit": "fourier_unit (whole FourierUnit, 192 channels)",
    "ffc_bn_act": "FFC_BN_ACT 512 -> 512, ratio 0.75, 3x3",
    "generator": "big-lama generator, end to end",
}
MODE_ORDER = ["fp32", "tf32", "bf16"]
MODE_TEXT = {"fp32": "fp32 (TF32 off)", "tf32": "fp32 + TF32", "bf16": "bf16"}


def load(paths) -> list[dict]:
    """Every results file under ``paths`` (files or directories), oldest first."""
    files = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    loaded = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: skipping {f}: {exc}", file=sys.stderr)
            continue
        # The per-op benchmarks' files (schema 1); the folder, memory, refine and sweep runs have their own.
        if isinstance(data, dict) and "rows" in data and data.get("schema") == 1:
            loaded.append({"path": f, "data": data})
    loaded.sort(key=lambda r: (r["data"].get("commands") or [{}])[-1].get("started", ""))
    return loaded


def latest_per_device(files: list[dict]) -> list[dict]:
    newest = {}
    for f in files:  # already oldest first
        newest[f["data"]["environment"].get("device_slug", f["path"].stem)] = f
    return list(newest.values())


def _ms(row) -> str:
    if row is None:
        return ""
    if row.get("median_ms") is None:
        skipped = row.get("skipped") or "-"
        return "error" if skipped.startswith("error") else "-"
    m = row["median_ms"]
    spread = (row["p80_ms"] - row["p20_ms"]) / 2 / m * 100 if m else 0
    text = f"{m:.0f}" if m >= 100 else (f"{m:.3g}" if m >= 0.1 else f"{m:.3f}")
    text += f" ±{spread:.0f}%"
    if row.get("check") == "FAIL":
        text += " **FAIL**"
    return text


def _ratio(a, b) -> str:
    if not a or not b or a.get("median_ms") is None or b.get("median_ms") is None:
        return ""
    return f"{a['median_ms'] / b['median_ms']:.2f}x"


def _num(v, fmt) -> str:
    return "" if v is None else format(v, fmt)


def _providers(rows) -> list[str]:
    names = {r["provider"] for r in rows}
    fixed = [p for p in ("eager", "compile", "fused") if p in names]
    return fixed + sorted(n for n in names if n not in fixed)


def file_markdown(entry: dict) -> str:
    data = entry["data"]
    env = data.get("environment", {})
    rows = data.get("rows", [])
    started = (data.get("commands") or [{}])[0].get("started", "")
    lines = [f"### {env.get('device', '?')}",
             "",
             f"torch {env.get('torch')}, triton {env.get('triton')}"
             + (f", CUDA {env['cuda']}" if env.get("cuda") and env.get("device_type") == "cuda" else "")
             + f"; commit `{env.get('git_commit')}`{' (uncommitted changes)' if env.get('git_dirty') else ''}"
             + f"; {started[:10]}; file `{entry['path'].name}`."]
    ceil = data.get("ceilings")
    if ceil:
        parts = [f"copy {ceil['copy_gbps']:.0f} GB/s" if ceil.get("copy_gbps") else None]
        parts += [f"{k} matmul {ceil[k + '_tflops']:.0f} TFLOP/s" for k in ("bf16", "tf32", "fp32")
                  if ceil.get(k + "_tflops")]
        lines.append("Measured ceilings: " + ", ".join(p for p in parts if p) + ".")
    for t in data.get("tests", []):
        lines.append(f"`{t['command']}`: {t['summary']} (exit {t['rc']}, {t['seconds']:.0f} s).")
    loads = [c.get("loadavg") for c in data.get("commands", []) if c.get("loadavg")]
    if env.get("device_type") == "cpu" and loads:
        lines.append(f"Load average when the scripts started: {', '.join(str(x[0]) for x in loads)} "
                     f"on {env.get('cpu_count')} cores.")
    notes = sorted({r["note"] for r in rows if r.get("note")})
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    for op in sorted(by_op, key=lambda o: (OP_ORDER.index(o) if o in OP_ORDER else 99, o)):
        op_rows = by_op[op]
        providers = _providers(op_rows)
        cells = defaultdict(dict)
        for r in op_rows:
            cells[(r["case"], r["mode"], r["size"])][r["provider"]] = r
        head = ["case", "input", "mode"] + [f"{p} ms" for p in providers]
        head += ["fused vs eager", "fused vs compile", "fused GB/s", "fused TFLOP/s", "peak MB eager / fused"]
        accuracy = any(r.get("psnr_db") is not None for r in op_rows)
        if accuracy:
            head += ["fused vs eager fp32", "max abs err", "PSNR dB", "SNR dB"]
        eager_fp32 = {r["size"]: r for r in op_rows if r["provider"] == "eager" and r["mode"] == "fp32"}
        lines += ["", f"**{OP_TITLE.get(op, op)}**", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join("---" for _ in head) + "|"]
        order = sorted(cells, key=lambda k: (k[0], MODE_ORDER.index(k[1]) if k[1] in MODE_ORDER else 9, k[2]))
        for key in order:
            c = cells[key]
            eager, comp, fused = c.get("eager"), c.get("compile"), c.get("fused")
            peak = ""
            if eager and fused and (eager.get("peak_mem_mb") is not None or fused.get("peak_mem_mb") is not None):
                peak = f"{_num(eager.get('peak_mem_mb'), '.0f')} / {_num(fused.get('peak_mem_mb'), '.0f')}"
            elif env.get("device_type") == "cpu":
                peak = "n/a"
            shape = (fused or eager or next(iter(c.values())))["shape"]
            size = f"{key[2]}² ({shape['H']}²)" if op != "generator" else f"{key[2]}²"
            row = [key[0], size, MODE_TEXT.get(key[1], key[1])] + [_ms(c.get(p)) for p in providers]
            row += [_ratio(eager, fused), _ratio(comp, fused), _num(fused and fused.get("gbps"), ".0f"),
                    _num(fused and fused.get("tflops"), ".2f" if env.get("device_type") == "cpu" else ".1f"), peak]
            if accuracy:
                f = fused or {}
                row += [_ratio(eager_fp32.get(key[2]), fused), _num(f.get("max_abs"), ".1e"),
                        _num(f.get("psnr_db"), ".1f"), _num(f.get("snr_db"), ".1f")]
            lines.append("| " + " | ".join(row) + " |")
        conv = data.get("lone_conv")
        if op == "generator" and conv:
            lines += ["", f"A lone 3x3 convolution of the bottleneck's shape ({conv['shape']}) on this machine: "
                          f"fp32 {conv['fp32_ms']:.3g} ms ({conv['fp32_tflops']:.2f} TFLOP/s), bf16 "
                          f"{conv['bf16_ms']:.3g} ms ({conv['bf16_tflops']:.2f} TFLOP/s): r = {conv['r']:.2f}, "
                          f"so the bf16 target min(5, 1.1 r) is {min(5, 1.1 * conv['r']):.2f}x LaMa's eager fp32."]
    lines += ["", "Times are medians over the timed runs, ± half the p20-p80 spread; `-`: not run (see the "
              "JSON's `skipped`). The input column gives the LaMa input size and, in brackets, the FFC "
              "bottleneck it implies. GB/s counts the bytes the fused kernels must move "
              "(benchmarks/common.py); it is left blank where the fused op ran on its torch fallback. "
              "Generator rows: fused = `lama_fast.optimize(generator, precision=mode)`; its accuracy "
              "columns compare it with the reference in IEEE fp32 (PSNR on [0, 1]; SNR = 10 log10 of the "
              "reference's variance over the mean squared error)."]
    lines += [f"Note: {n}." for n in notes]
    return "\n".join(lines)


def markdown(files: list[dict]) -> str:
    if not files:
        return "*No benchmark results yet.*"
    return "\n\n".join(file_markdown(f) for f in files)


def update_readme(table: str, path: Path | str = README) -> None:
    """Replace the README's block between the BENCH-TABLE markers with ``table``."""
    path = Path(path)
    text = path.read_text()
    if BEGIN not in text:
        raise ValueError(f"{path} has no {BEGIN} marker")
    start = text.index(BEGIN) + len(BEGIN)
    end = text.find(END, start)
    tail = text[end:] if end >= 0 else END + "\n\n" + text[start:].lstrip("\n")
    path.write_text(text[:start] + "\n" + table.strip() + "\n" + tail)


SWEEP_BEGIN, SWEEP_END = "<!-- SWEEP-TABLE -->", "<!-- /SWEEP-TABLE -->"


def update_sweep_readme(path: Path, readme: Path = README) -> int:
    """README's SWEEP-TABLE block <- the table of a `lama-fast bench` results file (and its plot)."""
    sys.path.insert(0, str(README.parent))
    from lama_fast import sweep

    results = json.loads(path.read_text())
    text = readme.read_text()
    if SWEEP_BEGIN not in text or SWEEP_END not in text:
        print(f"report: {readme} has no {SWEEP_BEGIN} ... {SWEEP_END} block", file=sys.stderr)
        return 1
    block = sweep.table(results)
    png = path.with_suffix(".png")
    if png.exists():
        block += f"\n\n![time and peak memory against resolution]({png.resolve().relative_to(readme.resolve().parent).as_posix()})"
    start, end = text.index(SWEEP_BEGIN) + len(SWEEP_BEGIN), text.index(SWEEP_END)
    readme.write_text(text[:start] + "\n" + block + "\n" + text[end:])
    print(f"report: updated {readme}")
    return 0


def plot(files: list[dict], out: Path) -> bool:
    """Median time against input size, one panel per op, one line per device, mode and provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; no plot", file=sys.stderr)
        return False
    ops = [o for o in OP_ORDER if any(r["op"] == o for f in files for r in f["data"]["rows"])]
    if not ops:
        return False
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.8), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for f in files:
            series = defaultdict(list)
            for r in f["data"]["rows"]:
                if r["op"] == op and r.get("median_ms") is not None:
                    series[(r["case"], r["mode"], r["provider"])].append((r["size"], r["median_ms"]))
            cases = sorted({k[0] for k in series})
            for (case, mode, provider), pts in sorted(series.items()):
                if case != cases[0]:
                    continue  # one case per panel keeps it readable; the tables have them all
                pts.sort()
                label = f"{provider} {mode}" + (f" ({f['data']['environment'].get('device_slug')})"
                                                if len(files) > 1 else "")
                style = "-" if provider.startswith("fused") else ("--" if provider == "eager" else ":")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op if op != "pointwise_conv" else f"{op} ({cases[0] if cases else ''})", fontsize=9)
        ax.set_xlabel("LaMa input size")
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=[str(RESULTS_DIR)], help="results files or directories")
    parser.add_argument("--latest", action="store_true", help="only the newest file of each device")
    parser.add_argument("--out", help="write the markdown here (default: print it)")
    parser.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--update-readme", nargs="?", const=str(README), default=None, metavar="README",
                        help="rewrite the block between the BENCH-TABLE markers (default README.md)")
    parser.add_argument("--sweep-readme", metavar="SWEEP_JSON",
                        help="only rewrite README.md's SWEEP-TABLE block from a `lama-fast bench` results file")
    args = parser.parse_args(argv)
    if args.sweep_readme:
        return update_sweep_readme(Path(args.sweep_readme))
    files = load(args.paths)
    if args.latest:
        files = latest_per_device(files)
    table = markdown(files)
    if args.out:
        Path(args.out).write_text(table + "\n")
        print(f"report: wrote {args.out}")
    elif not args.update_readme:
        print(table)
    if args.plot and plot(files, Path(args.plot)):
        print(f"report: wrote {args.plot}")
    if args.update_readme:
        try:
            update_readme(table, args.update_readme)
        except (OSError, ValueError) as exc:
            print(f"report: {exc}", file=sys.stderr)
            return 1
        print(f"report: updated {args.update_readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
