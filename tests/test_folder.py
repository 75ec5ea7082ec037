"""Folders at throughput: inpaint_many and the CLI's directory mode (batches, workers, resume,
atomic writes, reports, torchrun shards) give exactly what one-by-one inpainting gives."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import lama_fast
from lama_fast import folder
from lama_fast.cli import main
from lama_fast.demo import demo_generator, demo_image, demo_mask
from lama_fast.many import inpaint_many

REPO = Path(__file__).resolve().parents[1]
# (height, width) of the folder's images: three padded sizes, so batches of 3 mix full and partial.
SIZES = [(40, 52), (48, 64), (40, 52), (33, 47), (40, 52), (48, 64), (40, 49)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "generator.pth"
    torch.save(demo_generator(seed=1, n_blocks=1).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def generator(checkpoint):
    return lama_fast.optimize(lama_fast.load_generator(checkpoint))


def make_folder(root: Path, sizes=SIZES) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i, (h, w) in enumerate(sizes):
        PIL.Image.fromarray(np.roll(demo_image(64), 5 * i, axis=(0, 1))[:h, :w]).save(images / f"img{i:02d}.png")
        PIL.Image.fromarray(np.roll(demo_mask(64), 3 * i, axis=1)[:h, :w]).save(masks / f"img{i:02d}_mask.png")
    return images, masks


def one_by_one(images: Path, masks: Path, generator) -> dict[str, np.ndarray]:
    """The reference: ``inpaint`` per pair, as a user's loop would call it."""
    return {p.stem: lama_fast.inpaint(PIL.Image.open(p), PIL.Image.open(masks / f"{p.stem}_mask.png"), generator)
            for p in sorted(images.glob("*.png"))}


def read_outputs(out: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(PIL.Image.open(p)) for p in sorted(out.iterdir())}


@pytest.mark.parametrize("batch_size, num_workers", [(1, 0), (3, 1), (4, 2)])
def test_inpaint_many_equals_one_by_one(generator, tmp_path, batch_size, num_workers):
    images, masks = make_folder(tmp_path)
    expected = one_by_one(images, masks, generator)
    pairs = [(p, masks / f"{p.stem}_mask.png") for p in sorted(images.glob("*.png"))]
    results = list(inpaint_many(pairs, generator, batch_size=batch_size, num_workers=num_workers))
    assert sorted(r.index for r in results) == list(range(len(pairs)))
    for r in results:
        assert r.ok and r.warnings == () and r.seconds > 0
        np.testing.assert_array_equal(r.output, expected[pairs[r.index][0].stem])


def test_inpaint_many_batches_by_padded_size(generator):
    """Two sizes that pad alike share a batch; the order of results follows the batches."""
    shapes = [(40, 52), (48, 64), (37, 50), (40, 52)]  # (37, 50) pads to (40, 56), (40, 52) to (40, 56) too
    pairs = [(demo_image(64)[:h, :w], demo_mask(64)[:h, :w]) for h, w in shapes]
    order = [r.index for r in inpaint_many(pairs, generator, batch_size=3, num_workers=0)]
    assert order == [0, 2, 3, 1]


def test_inpaint_many_reports_bad_pairs_and_goes_on(generator, tmp_path):
    good = (demo_image(64)[:40, :52], demo_mask(64)[:40, :52])
    (tmp_path / "text.png").write_text("not an image")
    pairs = [good, (tmp_path / "text.png", tmp_path / "text.png"), (demo_image(64)[:40, :52], demo_mask(64)[:40, :50]),
             (demo_image(64)[:8, :8], demo_mask(64)[:8, :8]), (demo_image(64)[:40, :52], np.zeros((40, 52), np.uint8)),
             (tmp_path / "missing.png", tmp_path / "missing_mask.png"), good]
    results = {r.index: r for r in inpaint_many(pairs, generator, batch_size=2, num_workers=1)}
    assert sorted(results) == list(range(len(pairs)))
    for i in (0, 6):
        np.testing.assert_array_equal(results[i].output, lama_fast.inpaint(*good, generator))
    assert "cannot read" in results[1].error and "text.png" in results[1].error
    assert "image and mask sizes differ" in results[2].error
    assert "at least 9 pixels" in results[3].error
    assert results[4].ok and "the mask sets no pixel" in results[4].warnings[0]
    np.testing.assert_array_equal(results[4].output, pairs[4][0])
    assert "no such file" in results[5].error
    assert all(results[i].output is None for i in (1, 2, 3, 5))


def test_inpaint_many_argument_errors(generator):
    for kwargs, message in (({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers"),
                            ({"pad_modulo": 0}, "pad_modulo")):
        with pytest.raises(ValueError, match=message):
            list(inpaint_many([(demo_image(64), demo_mask(64))], generator, **kwargs))
    with pytest.raises(TypeError, match="generator"):
        list(inpaint_many([(demo_image(64), demo_mask(64))], "big-lama"))
    assert list(inpaint_many([], generator)) == []


def test_forward_failure_fails_its_batch_only(generator, tmp_path):
    calls = []

    def flaky(x):
        calls.append(x.shape[0])
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generator(x)

    pairs = [(demo_image(64)[:40, :52], demo_mask(64)[:40, :52]), (demo_image(64)[:48, :48], demo_mask(64)[:48, :48])]
    results = sorted(inpaint_many(pairs, flaky, batch_size=2, num_workers=0), key=lambda r: r.index)
    assert "out of memory" in results[0].error and results[0].output is None
    np.testing.assert_array_equal(results[1].output, lama_fast.inpaint(*pairs[1], generator))


def cli(checkpoint, images, masks, out, *extra):
    return main(["inpaint", str(images), str(masks), "-o", str(out), "--checkpoint", str(checkpoint),
                 "--device", "cpu", *map(str, extra)])


def test_cli_directory_batches_resumes_and_reports(checkpoint, generator, tmp_path, capsys):
    images, masks = make_folder(tmp_path)
    out, report = tmp_path / "out", tmp_path / "report.json"
    expected = one_by_one(images, masks, generator)
    assert cli(checkpoint, images, masks, out, "--batch-size", 3, "--workers", 1, "--report", report) == 0
    err = capsys.readouterr().err
    assert f"wrote {len(SIZES)} images to {out}" in err
    written = read_outputs(out)
    assert written.keys() == expected.keys()
    for stem in expected:
        np.testing.assert_array_equal(written[stem], expected[stem])
    entries = json.loads(report.read_text())
    assert [Path(e["image"]).stem for e in entries] == sorted(expected)
    assert all(e["status"] == "written" and e["error"] is None and e["seconds"] > 0 for e in entries)

    # Resume: existing outputs are skipped, untouched; a missing one is redone.
    (out / "img03.png").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli(checkpoint, images, masks, out, "--batch-size", 3, "--report", report) == 0
    err = capsys.readouterr().err
    assert "wrote 1 images" in err and f"skipped {len(SIZES) - 1} already there" in err
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / "img03.png")), expected["img03"])
    statuses = {Path(e["image"]).stem: e["status"] for e in json.loads(report.read_text())}
    assert statuses.pop("img03") == "written" and set(statuses.values()) == {"skipped"}

    # --overwrite redoes everything.
    assert cli(checkpoint, images, masks, out, "--overwrite") == 0
    assert f"wrote {len(SIZES)} images" in capsys.readouterr().err
    assert all((out / name).stat().st_mtime_ns != stamp for name, stamp in stamps.items())


def test_cli_directory_reports_bad_files_and_goes_on(checkpoint, tmp_path, capsys):
    images, masks = make_folder(tmp_path, SIZES[:3])
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    PIL.Image.new("L", (52, 40)).save(masks / "broken_mask.png")
    PIL.Image.fromarray(demo_image(64)[:40, :52]).save(images / "lonely.png")
    report = tmp_path / "report.json"
    assert cli(checkpoint, images, masks, tmp_path / "out", "--batch-size", 2, "--report", report) == 1
    err = capsys.readouterr().err
    assert "no mask for 1 of 5 images" in err and "lonely.png" in err
    assert "lama-fast: error: cannot read" in err and "broken.png" in err
    assert err.splitlines()[-1].startswith("lama-fast: error: wrote 3 of 5 images")
    assert "1 had no mask, 1 failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img00.png", "img01.png", "img02.png"]
    statuses = {Path(e["image"]).name: (e["status"], e["error"]) for e in json.loads(report.read_text())}
    assert statuses["lonely.png"] == ("no mask", None)
    assert statuses["broken.png"][0] == "failed" and "cannot read" in statuses["broken.png"][1]


def test_a_failed_write_leaves_no_file(generator, tmp_path, monkeypatch):
    images, masks = make_folder(tmp_path, SIZES[:2])

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", disk_full)
    records = folder.inpaint_folder(images, masks, tmp_path / "out", generator, progress=False, num_workers=0)
    assert [r.status for r in records] == ["failed", "failed"]
    assert all("No space left on device" in r.error for r in records)
    assert list((tmp_path / "out").iterdir()) == []


def test_single_file_rejects_directory_options(checkpoint, tmp_path, capsys):
    images, masks = make_folder(tmp_path, SIZES[:1])
    for option in (["--report", tmp_path / "r.json"], ["--overwrite"]):
        assert cli(checkpoint, images / "img00.png", masks / "img00_mask.png", tmp_path / "o.png", *option) == 1
        err = capsys.readouterr().err
        assert f"{option[0]} is for directories" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        cli(checkpoint, images, masks, tmp_path / "out", "--batch-size", 0)
    assert "--batch-size" in capsys.readouterr().err


def cli_command(checkpoint, images, masks, out, *extra):
    return ["-m", "lama_fast", "inpaint", str(images), str(masks), "-o", str(out), "--checkpoint", str(checkpoint),
            "--device", "cpu", *map(str, extra)]


def test_killed_run_resumes_and_writes_every_output_once(checkpoint, generator, tmp_path):
    sizes = [(64, 64)] * 12
    images, masks = make_folder(tmp_path, sizes)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, *cli_command(checkpoint, images, masks, out, "--workers", 0)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if out.is_dir() and len(list(out.glob("*.png"))) >= 3:
            break
        time.sleep(0.005)
    assert first.poll() is None, "the first run finished before it could be killed: " + first.stderr.read().decode()
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 3 <= len(done) < len(sizes)
    expected = one_by_one(images, masks, generator)
    for name in done:  # whatever exists after the kill is a whole, correct PNG
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / name)), expected[Path(name).stem])

    second = subprocess.run([sys.executable, *cli_command(checkpoint, images, masks, out)], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"wrote {len(sizes) - len(done)} images" in second.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"img{i:02d}.png" for i in range(len(sizes))]  # no leftovers
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in done.items())  # written once
    for stem, array in read_outputs(out).items():
        np.testing.assert_array_equal(array, expected[stem])


def test_torchrun_two_ranks_on_cpu_equal_one_process(checkpoint, generator, tmp_path):
    images, masks = make_folder(tmp_path)
    (images / "broken.png").write_text("not an image")
    PIL.Image.new("L", (8, 8)).save(masks / "broken_mask.png")
    out, report = tmp_path / "out", tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *cli_command(checkpoint, images, masks, out, "--batch-size", 2, "--report", report)],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode != 0  # broken.png fails, on whichever rank had it
    assert run.stderr.count("lama-fast: error: wrote") == 1, run.stderr
    assert f"wrote {len(SIZES)} of {len(SIZES) + 1} images" in run.stderr and "1 failed" in run.stderr
    expected = {p.stem: lama_fast.inpaint(PIL.Image.open(p), PIL.Image.open(masks / f"{p.stem}_mask.png"), generator)
                for p in sorted(images.glob("img*.png"))}
    written = read_outputs(out)
    assert written.keys() == expected.keys()
    for stem in expected:
        np.testing.assert_array_equal(written[stem], expected[stem])
    entries = json.loads(report.read_text())
    assert len(entries) == len(SIZES) + 1
    assert {Path(e["image"]).name: e["status"] for e in entries}["broken.png"] == "failed"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_batches_equal_one_by_one_within_the_precision(checkpoint, precision):
    """On CUDA a batch is one forward, so it may round differently from one image at a time."""
    generator = lama_fast.optimize(lama_fast.load_generator(checkpoint, device="cuda"), precision=precision)
    pairs = [(np.roll(demo_image(64), 5 * i, axis=1)[:h, :w], np.roll(demo_mask(64), 3 * i, axis=1)[:h, :w])
             for i, (h, w) in enumerate(SIZES)]
    results = list(inpaint_many(pairs, generator, batch_size=3, num_workers=1))
    assert sorted(r.index for r in results) == list(range(len(pairs)))
    for r in results:
        expected = lama_fast.inpaint(*pairs[r.index], generator).astype(float)
        diff = r.output.astype(float) - expected
        if precision == "fp32":
            assert np.abs(diff).max() <= 1
        else:
            assert 10 * np.log10(255**2 / max(np.mean(diff**2), 1e-12)) >= 40
