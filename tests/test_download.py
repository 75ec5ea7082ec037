"""lama-fast download and --checkpoint big-lama, against a local HTTP server on 127.0.0.1 only."""
import hashlib
import http.server
import random
import re
import socket
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import lama_fast
from lama_fast import download as dl
from lama_fast.checkpoints import CheckpointError
from lama_fast.cli import main
from lama_fast.demo import demo_generator, demo_image, demo_mask

DATA = random.Random(0).randbytes(300_000)
MD5 = hashlib.md5(DATA).hexdigest()


class Server:
    """What the handler serves and how it misbehaves, and the Range header of every request it saw."""

    def __init__(self):
        self.ranges = []
        self.truncate = 0  # how many of the next responses stop half-way and close the connection
        self.ignore_range = False  # answer 200 with the whole file even when asked for a range
        self.status = None  # answer every request with this HTTP error


def handler_for(server: Server):
    class Handler(http.server.BaseHTTPRequestHandler):
        # HTTP/1.0 (the default): the connection closes after each response, so a short body ends in EOF.
        def do_GET(self):
            requested = self.headers.get("Range")
            server.ranges.append(requested)
            if server.status is not None:
                self.send_error(server.status)
                return
            start = 0
            if requested is not None and not server.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
                if start >= len(DATA):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
            else:
                self.send_response(200)
            body = DATA[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if server.truncate:
                server.truncate -= 1
                body = body[: len(body) // 2]
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def server(monkeypatch):
    """A local server of DATA, with MODELS["big-lama"] pointing at it."""
    state = Server()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/big-lama.pt"
    monkeypatch.setitem(dl.MODELS, "big-lama", dl.Model(url, MD5, "big-lama.pt"))
    monkeypatch.setattr(dl, "_TIMEOUT", 10)
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("LAMA_FAST_CACHE", str(path))
    return path


def test_download_keeps_a_verified_file_and_does_nothing_the_second_time(server, tmp_path, capsys):
    path = dl.download(directory=tmp_path / "weights", progress=False)
    assert path == tmp_path / "weights" / "big-lama.pt"
    assert path.read_bytes() == DATA
    assert sorted(p.name for p in path.parent.iterdir()) == ["big-lama.pt"]
    assert server.ranges == [None]

    assert dl.download(directory=tmp_path / "weights", progress=True) == path
    assert server.ranges == [None]  # no second request
    assert "already downloaded and its MD5 matches" in capsys.readouterr().err


def test_default_directory_is_the_cache(server, cache):
    assert dl.download(progress=False) == cache / "big-lama.pt"
    assert (cache / "big-lama.pt").read_bytes() == DATA


def test_wrong_checksum_keeps_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.MODELS, "big-lama", dl.MODELS["big-lama"]._replace(md5="0" * 32))
    with pytest.raises(dl.DownloadError, match=f"did not match: expected {'0' * 32}, got {MD5}"):
        dl.download(directory=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    server.truncate = 1
    with pytest.raises(dl.DownloadError, match="closed after 150000 of 300000 bytes.*run again to resume"):
        dl.download(directory=tmp_path, progress=False)
    part = tmp_path / "big-lama.pt.part"
    assert part.read_bytes() == DATA[:150_000] and not (tmp_path / "big-lama.pt").exists()

    path = dl.download(directory=tmp_path, progress=False)
    assert server.ranges == [None, "bytes=150000-"]
    assert path.read_bytes() == DATA and not part.exists()


def test_server_that_ignores_range_restarts_the_download(server, tmp_path, capsys):
    server.truncate, server.ignore_range = 1, True
    with pytest.raises(dl.DownloadError):
        dl.download(directory=tmp_path, progress=False)
    path = dl.download(directory=tmp_path, progress=True)
    assert server.ranges == [None, "bytes=150000-"]
    assert path.read_bytes() == DATA
    assert "does not resume downloads" in capsys.readouterr().err


def test_complete_part_file_is_checked_and_kept(server, tmp_path):
    # Interrupted after the last byte arrived but before the rename: the server answers 416 to the range.
    (tmp_path / "big-lama.pt.part").write_bytes(DATA)
    assert dl.download(directory=tmp_path, progress=False).read_bytes() == DATA
    assert server.ranges == [f"bytes={len(DATA)}-"]


def test_http_and_network_errors_are_clear(server, tmp_path, monkeypatch):
    server.status = 404
    with pytest.raises(dl.DownloadError, match="cannot download big-lama from http://127.0.0.1:.*HTTP 404"):
        dl.download(directory=tmp_path, progress=False)
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setitem(dl.MODELS, "big-lama", dl.Model(f"http://127.0.0.1:{port}/x", MD5, "big-lama.pt"))
    with pytest.raises(dl.DownloadError, match="cannot download big-lama from .*refused"):
        dl.download(directory=tmp_path, progress=False)
    assert not (tmp_path / "big-lama.pt").exists()


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown weights 'small-lama'; known: big-lama"):
        dl.download("small-lama")


def test_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAMA_FAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert dl.cache_directory() == tmp_path / "home" / ".cache" / "lama-fast"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dl.cache_directory() == tmp_path / "xdg" / "lama-fast"
    monkeypatch.setenv("LAMA_FAST_CACHE", str(tmp_path / "mine"))
    assert dl.cache_directory() == tmp_path / "mine"


def test_cli_download_to_directory(server, tmp_path, capsys):
    assert main(["download", "big-lama", "--to", str(tmp_path / "weights")]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "weights" / "big-lama.pt"
    assert path.read_bytes() == DATA
    assert out == f"lama-fast: big-lama is at {path}; inpaint with --checkpoint {path}\n"


def test_cli_download_to_the_cache(server, cache, capsys):
    assert main(["download"]) == 0
    assert capsys.readouterr().out == (f"lama-fast: big-lama is at {cache / 'big-lama.pt'}; "
                                       "inpaint with --checkpoint big-lama\n")


def test_cli_download_error_is_one_line(server, tmp_path, capsys):
    server.status = 503
    assert main(["download", "--to", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lama-fast: error: cannot download big-lama") and "HTTP 503" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_resolve_checkpoint(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="big-lama is not downloaded yet .*run: lama-fast download big-lama"):
        dl.resolve_checkpoint("big-lama")
    cache.mkdir()
    (cache / "big-lama.pt").write_bytes(b"weights")
    assert dl.resolve_checkpoint("big-lama") == cache / "big-lama.pt"
    # Paths keep their meaning: a file named big-lama here, and anything that is not a known name.
    Path("big-lama").write_bytes(b"mine")
    assert dl.resolve_checkpoint("big-lama") == Path("big-lama")
    assert dl.resolve_checkpoint("missing.ckpt") == Path("missing.ckpt")


def write_pair(folder: Path):
    PIL.Image.fromarray(demo_image(32)).save(folder / "photo.png")
    PIL.Image.fromarray(demo_mask(32)).save(folder / "mask.png")


def test_inpaint_with_checkpoint_big_lama_uses_the_cache(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_pair(tmp_path)
    args = ["inpaint", "photo.png", "mask.png", "-o", "out.png", "--checkpoint", "big-lama", "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == (f"lama-fast: error: big-lama is not downloaded yet (looked for {cache / 'big-lama.pt'}); "
                   "run: lama-fast download big-lama\n")

    cache.mkdir()
    torch.save(demo_generator(seed=1, n_blocks=1).state_dict(), cache / "big-lama.pt")
    assert main(args) == 0, capsys.readouterr().err
    generator = lama_fast.optimize(lama_fast.load_generator(cache / "big-lama.pt"))
    expected = lama_fast.inpaint(PIL.Image.open("photo.png"), PIL.Image.open("mask.png"), generator)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open("out.png")), expected)
