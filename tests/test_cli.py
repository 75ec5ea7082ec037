"""The lama-fast command line: inpaint (file and directory), refusals and errors, verify, bench."""
import functools
import importlib.metadata
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import lama_fast
from lama_fast.cli import main
from lama_fast.demo import demo_generator, demo_image, demo_mask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A plain state dict of a seeded one-block big-lama with realistic BatchNorm statistics."""
    path = tmp_path_factory.mktemp("weights") / "generator.pth"
    torch.save(demo_generator(seed=1, n_blocks=1).state_dict(), path)
    return path


def write_pair(folder: Path, stem: str, height=40, width=52, mask_name=None, shift=0):
    folder.mkdir(parents=True, exist_ok=True)
    image = np.roll(demo_image(64), shift, axis=1)[:height, :width]
    PIL.Image.fromarray(image).save(folder / f"{stem}.png")
    if mask_name is not None:
        PIL.Image.fromarray(demo_mask(64)[:height, :width]).save(mask_name if isinstance(mask_name, Path) else folder / mask_name)
    return folder / f"{stem}.png"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err):
    assert "Traceback" not in err
    assert err.startswith("lama-fast: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_inpaint_single_file_matches_the_api(checkpoint, tmp_path, capsys, reference):
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    out = tmp_path / "out" / "result.png"
    code, _, err = run(capsys, "inpaint", image_path, tmp_path / "photo_mask.png", "-o", out,
                       "--checkpoint", checkpoint, "--device", "cpu", *(["--reference"] if reference else []))
    assert code == 0, err
    generator = lama_fast.load_generator(checkpoint)
    if not reference:
        generator = lama_fast.optimize(generator)
    expected = lama_fast.inpaint(PIL.Image.open(image_path), PIL.Image.open(tmp_path / "photo_mask.png"), generator)
    written = np.asarray(PIL.Image.open(out))
    assert written.shape == (40, 52, 3)
    np.testing.assert_array_equal(written, expected)


def test_inpaint_directory_reports_missing_masks(checkpoint, tmp_path, capsys):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    masks.mkdir()
    write_pair(images, "a", mask_name=masks / "a_mask.png")
    write_pair(images, "b", mask_name=masks / "b.png", shift=7)
    write_pair(images, "c")  # no mask
    (images / "notes.txt").write_text("not an image")
    code, _, err = run(capsys, "inpaint", images, masks, "-o", out, "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 1
    assert "no mask for 1 of 3 images" in err and "c.png" in err
    assert "2/2" in err and "wrote 2 of 3 images" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert not np.array_equal(np.asarray(PIL.Image.open(out / "a.png")), np.asarray(PIL.Image.open(out / "b.png")))


def test_inpaint_directory_with_masks_beside_images(checkpoint, tmp_path, capsys):
    folder = tmp_path / "both"
    write_pair(folder, "x", mask_name="x_mask.png")
    write_pair(folder, "y", mask_name="y_mask.png")
    code, _, err = run(capsys, "inpaint", folder, folder, "-o", tmp_path / "out", "--checkpoint", checkpoint)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png", "y.png"]


def test_inpaint_refuses_without_checkpoint(tmp_path, capsys):
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    code, _, err = run(capsys, "inpaint", image_path, tmp_path / "photo_mask.png", "-o", tmp_path / "o.png")
    assert code == 2
    assert "big-lama.zip" in err and "best.ckpt" in err and "big-lama.pt" in err and "--checkpoint" in err


@pytest.mark.parametrize(
    "case", ["missing image", "missing checkpoint", "not an image", "mask size", "too small", "output suffix"]
)
def test_inpaint_errors_are_one_line(case, checkpoint, tmp_path, capsys):
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    mask_path, out = tmp_path / "photo_mask.png", tmp_path / "out.png"
    weights = checkpoint
    expected = {"missing image": "image not found", "missing checkpoint": "checkpoint not found",
                "not an image": "cannot read", "mask size": "40x52 (HxW), mask is 40x51",
                "too small": "at least 9 pixels", "output suffix": ".png"}[case]
    if case == "missing image":
        image_path = tmp_path / "nope.png"
    elif case == "missing checkpoint":
        weights = tmp_path / "nope.ckpt"
    elif case == "not an image":
        image_path.write_text("hello")
    elif case == "mask size":
        PIL.Image.open(mask_path).crop((0, 0, 51, 40)).save(mask_path)
    elif case == "too small":
        for path in (image_path, mask_path):
            PIL.Image.open(path).crop((0, 0, 8, 8)).save(path)
    else:
        out = tmp_path / "out.jpg"
    code, _, err = run(capsys, "inpaint", image_path, mask_path, "-o", out, "--checkpoint", weights, "--device", "cpu")
    assert code == 1
    assert_one_line_error(err)
    assert expected in err


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    (tmp_path / "weights.ckpt").write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "inpaint", image_path, tmp_path / "photo_mask.png", "-o", tmp_path / "o.png",
                       "--checkpoint", tmp_path / "weights.ckpt")
    assert code == 1
    assert_one_line_error(err)


def test_verify_passes():
    # A subprocess, as users run it: also covers ``python -m lama_fast``.
    done = subprocess.run(
        [sys.executable, "-m", "lama_fast", "verify", "--size", "64", "--blocks", "1", "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("PASS")
    assert "max |fast - reference|" in done.stdout and "ffc_kernels backend" in done.stdout


def test_verify_save(tmp_path, capsys):
    code, out, _ = run(capsys, "verify", "--size", "32", "--blocks", "0", "--device", "cpu", "--save", tmp_path)
    assert code == 0 and "PASS" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "mask.png", "result.png", "result_reference.png"]
    assert np.asarray(PIL.Image.open(tmp_path / "result.png")).shape == (32, 32, 3)


def test_bench_sweep_writes_json_table_and_plot(tmp_path, capsys):
    """`lama-fast bench` (a one-block generator at two small sizes): the JSON's schema, the eager
    baseline, the optimized rows' accuracy, the plot and the table."""
    import json

    from lama_fast import sweep

    code, out, err = run(capsys, "bench", "--sizes", 32, 48, "--blocks", 1, "--runs", 1, "--device", "cpu",
                         "--out", tmp_path, "--no-compile")
    assert code == 0, err
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("sweep_") and files[0].endswith(".json") and files[1].endswith(".png")
    data = json.loads((tmp_path / files[0]).read_text())
    assert data["schema"] == sweep.SCHEMA and {"device", "torch", "commit", "threads"} <= set(data["environment"])
    rows = data["rows"]
    assert [(r["size"], r["variant"], r["precision"]) for r in rows] == [
        (s, v, p) for s in (32, 48) for v, p in (("eager", "fp32"), ("optimized", "fp32"), ("optimized", "bf16"))]
    assert all(set(sweep.ROW_KEYS) <= set(r) for r in rows)
    for r in rows:
        assert r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["runs"] == 1
        if r["variant"] == "eager":
            assert r["speedup"] == 1.0
        elif r["precision"] == "fp32":
            assert r["max_abs"] <= 1e-4
        else:
            assert r["snr_db"] > 20
    assert (tmp_path / files[1]).stat().st_size > 10_000
    assert "| 48² | optimized | bf16 |" in out and "speedup" in out
    assert f"wrote {tmp_path / files[0]}" in err


def test_sweep_compiles_the_reference():
    from lama_fast import sweep

    results, path = sweep.run_sweep([32], compile_reference=True, runs=1, n_blocks=1, progress=False)
    assert path is None
    compiled = [r for r in results["rows"] if r["variant"] == "compile"]
    assert len(compiled) == 1 and compiled[0]["max_abs"] <= 1e-4 and compiled[0]["seconds_first_call"] > 0


def test_sweep_plot_from_a_small_results_file(tmp_path):
    from lama_fast import sweep

    rows = [dict(size=s, variant=v, precision="fp32", median_s=t, p20_s=t, p80_s=t, runs=1, speedup=1.0,
                 peak_bytes=m, max_abs=0.0, psnr_db=99.0, snr_db=99.0, seconds_first_call=t)
            for s, v, t, m in ((512, "eager", 3.0, 9e8), (1024, "eager", 13.0, 3e9), (512, "optimized", 2.0, 7e8),
                               (1024, "optimized", 8.0, 2e9))]
    results = {"schema": sweep.SCHEMA, "environment": {"device": "A CPU", "torch": "2.x", "threads": 2,
                                                       "commit": "abc", "date": "2026-01-01T00:00:00"}, "rows": rows}
    assert sweep.plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1024² | optimized | fp32 | 8.00 (8.00-8.00) | 1.00x | 1907 |" in sweep.table(results)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["verify", "--size", "8"])
    assert raised.value.code == 2
    assert "at least 9" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.parametrize("flag", ["--precision", "--dtype"])
def test_inpaint_bf16_runs_the_optimized_generator_and_stays_close(checkpoint, tmp_path, capsys, flag):
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    out = tmp_path / "bf16.png"
    code, _, err = run(capsys, "inpaint", image_path, tmp_path / "photo_mask.png", "-o", out,
                       "--checkpoint", checkpoint, "--device", "cpu", flag, "bf16")
    assert code == 0, err
    image, mask = PIL.Image.open(image_path), PIL.Image.open(tmp_path / "photo_mask.png")
    fp32 = lama_fast.inpaint(image, mask, lama_fast.load_generator(checkpoint))
    bf16 = lama_fast.inpaint(image, mask, lama_fast.optimize(lama_fast.load_generator(checkpoint), precision="bf16"))
    written = np.asarray(PIL.Image.open(out)).astype(int)
    np.testing.assert_array_equal(written, bf16)  # the CLI runs what the API runs
    # bf16 keeps 8 bits of mantissa: a few 8-bit levels of difference inside the hole, none outside.
    hole = np.asarray(mask) > 127
    assert np.abs(written - fp32)[hole].max() <= 12
    np.testing.assert_array_equal(written[~hole], fp32[~hole])


def test_inpaint_precision_errors(checkpoint, tmp_path, capsys):
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    args = ("inpaint", image_path, tmp_path / "photo_mask.png", "-o", tmp_path / "out.png",
            "--checkpoint", checkpoint, "--device", "cpu")
    code, _, err = run(capsys, *args, "--precision", "bf16", "--reference")
    assert code != 0 and "needs the optimized generator" in err
    assert_one_line_error(err)
    code, _, err = run(capsys, *args, "--precision", "tf32", "--dtype", "bf16")
    assert code != 0 and "disagree" in err
    assert_one_line_error(err)


def test_rgb_mask_file_is_inpainted_where_any_channel_is_set(checkpoint, tmp_path, capsys):
    # A red stroke on black: as grey (76) it would be under 127 and nothing would be inpainted.
    image_path = write_pair(tmp_path, "photo", mask_name="grey_mask.png")
    grey = np.asarray(PIL.Image.open(tmp_path / "grey_mask.png"))
    red = np.zeros(grey.shape + (3,), np.uint8)
    red[..., 0] = grey
    PIL.Image.fromarray(red).save(tmp_path / "red_mask.png")
    out = tmp_path / "out.png"
    code, _, err = run(capsys, "inpaint", image_path, tmp_path / "red_mask.png", "-o", out,
                       "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 0, err
    generator = lama_fast.optimize(lama_fast.load_generator(checkpoint))
    written = np.asarray(PIL.Image.open(out))
    np.testing.assert_array_equal(written, lama_fast.inpaint(PIL.Image.open(image_path), grey, generator))
    assert not np.array_equal(written, np.asarray(PIL.Image.open(image_path)))


def test_single_image_prints_time_and_peak_memory(checkpoint, tmp_path, capsys):
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    code, _, err = run(capsys, "inpaint", image_path, tmp_path / "photo_mask.png", "-o", tmp_path / "out.png",
                       "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 0
    # Not a terminal: no bar, just the summary.
    assert re.fullmatch(r"lama-fast: wrote \S+out\.png in \d+\.\d s, peak memory \d+(\.\d\d)? [MG]iB \(process RSS\)\n",
                        err), err


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_single_image_shows_its_steps_on_a_terminal(checkpoint, tmp_path, monkeypatch):
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    monkeypatch.setattr(sys, "stderr", Terminal())
    code = main([str(a) for a in ("inpaint", image_path, tmp_path / "photo_mask.png", "-o", tmp_path / "out.png",
                                  "--checkpoint", checkpoint, "--device", "cpu")])
    err = sys.stderr.getvalue()
    assert code == 0, err
    for step in ("reading", "inpainting", "writing"):
        assert step in err
    assert "3/3 steps" in err and err.rstrip().splitlines()[-1].startswith("lama-fast: wrote ")


def test_empty_mask_warns_and_writes_the_image(checkpoint, tmp_path, capsys):
    image_path = write_pair(tmp_path, "photo")
    PIL.Image.new("L", (52, 40)).save(tmp_path / "empty.png")
    out = tmp_path / "out.png"
    code, _, err = run(capsys, "inpaint", image_path, tmp_path / "empty.png", "-o", out,
                       "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 0, err
    warning, summary = err.splitlines()
    assert warning.startswith("lama-fast: warning: the mask sets no pixel") and summary.startswith("lama-fast: wrote")
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)), np.asarray(PIL.Image.open(image_path)))


def test_directory_warnings_name_their_image(checkpoint, tmp_path, capsys):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    masks.mkdir()
    write_pair(images, "a", mask_name=masks / "a.png")
    write_pair(images, "b")
    PIL.Image.new("L", (52, 40)).save(masks / "b.png")
    code, _, err = run(capsys, "inpaint", images, masks, "-o", out, "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 0, err
    lines = [line.split("\r")[-1] for line in err.splitlines()]
    assert [line for line in lines if line.startswith("lama-fast: warning")] == [
        "lama-fast: warning: b.png: the mask sets no pixel, so there is nothing to inpaint and the image is "
        "returned unchanged (8-bit masks are set where a channel is > 127, other masks where it is > 0)"]
    assert "2/2" in err and re.search(r"wrote 2 images to \S+ in \d+\.\d s, peak memory", lines[-1])
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def noisy_inpaint(*args, fail, **kwargs):
    warnings.warn("torch noise\nover two lines", UserWarning)
    if fail:
        raise RuntimeError("CUDA out of memory")
    return lama_fast.inpaint(*args, **kwargs)


@pytest.mark.parametrize("fail", [False, True], ids=["succeeds", "fails"])
def test_warnings_are_one_line_and_never_join_an_error(fail, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lama_fast.cli.inpaint", functools.partial(noisy_inpaint, fail=fail))
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    code, _, err = run(capsys, "inpaint", image_path, tmp_path / "photo_mask.png", "-o", tmp_path / "out.png",
                       "--checkpoint", checkpoint, "--device", "cpu")
    if fail:
        assert code == 1
        assert_one_line_error(err)
        assert "out of memory" in err and "noise" not in err
    else:
        assert code == 0
        assert err.splitlines()[0] == "lama-fast: warning: torch noise over two lines"
        assert "UserWarning" not in err and ".py:" not in err


def test_threads(checkpoint, tmp_path, capsys):
    image_path = write_pair(tmp_path, "photo", mask_name="photo_mask.png")
    args = ("inpaint", image_path, tmp_path / "photo_mask.png", "-o", tmp_path / "out.png",
            "--checkpoint", checkpoint, "--device", "cpu", "--threads")
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, _, err = run(capsys, *args, 1)
        assert code == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
    for bad in ("0", "two"):
        with pytest.raises(SystemExit) as raised:
            main([str(a) for a in args] + [bad])
        assert raised.value.code == 2
        assert "--threads" in capsys.readouterr().err


def test_version(capsys, monkeypatch):
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out == f"lama-fast {importlib.metadata.version('ffc-kernels')}\n"


def test_version_from_a_source_tree_that_is_not_installed(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    done = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    from lama_fast import cli

    assert cli._version() == done.stdout.split()[-1]


def test_tile_size(checkpoint, tmp_path, capsys):
    """--tile-size N tiles (same pixels as untiled, up to rounding), off never tiles, bad values
    are usage errors, and the reference refuses it."""
    image_path = write_pair(tmp_path, "photo", height=64, width=64, mask_name="photo_mask.png")
    mask_path = tmp_path / "photo_mask.png"
    outs = {}
    for value in ("off", "24", "auto"):
        outs[value] = tmp_path / f"out_{value}.png"
        code, _, err = run(capsys, "inpaint", image_path, mask_path, "-o", outs[value], "--checkpoint", checkpoint,
                           "--device", "cpu", "--tile-size", value)
        assert code == 0, err
    untiled = np.asarray(PIL.Image.open(outs["off"])).astype(int)
    assert np.abs(np.asarray(PIL.Image.open(outs["24"])).astype(int) - untiled).max() <= 1
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(outs["auto"])), untiled)  # plenty of memory: whole
    for bad in ("0", "8", "big"):
        with pytest.raises(SystemExit) as exit_info:
            main(["inpaint", str(image_path), str(mask_path), "-o", str(tmp_path / "x.png"), "--checkpoint",
                  str(checkpoint), "--tile-size", bad])
        assert exit_info.value.code == 2
        assert "--tile-size" in capsys.readouterr().err
    code, _, err = run(capsys, "inpaint", image_path, mask_path, "-o", tmp_path / "r.png", "--checkpoint", checkpoint,
                       "--reference", "--tile-size", "32")
    assert code != 0 and "--tile-size 32 needs the optimized generator" in err
    assert_one_line_error(err)


def test_job_that_cannot_fit_fails_before_it_starts(checkpoint, tmp_path, capsys, monkeypatch):
    image_path = write_pair(tmp_path, "photo", height=64, width=64, mask_name="photo_mask.png")
    monkeypatch.setattr(lama_fast.pipeline, "available_memory", lambda device: 1 << 20)
    code, _, err = run(capsys, "inpaint", image_path, tmp_path / "photo_mask.png", "-o", tmp_path / "o.png",
                       "--checkpoint", checkpoint, "--device", "cpu")
    assert code != 0 and "needs about" in err and "GiB" in err and "bf16" in err
    assert_one_line_error(err)
    assert not (tmp_path / "o.png").exists()
