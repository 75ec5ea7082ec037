"""Downloading LaMa weights into a cache, and finding them again by name.

``download("big-lama")`` fetches the TorchScript ``big-lama.pt`` that IOPaint and most LaMa tools
use (``load_generator`` reads it without running its code). Bytes go to ``<file>.part`` first; an
interrupted download is resumed with an HTTP Range request, and the file takes its final name only
once its MD5 matches the pinned one, so a file under the final name is always a verified one.

The cache directory is ``$LAMA_FAST_CACHE``, else ``$XDG_CACHE_HOME/lama-fast``, else
``~/.cache/lama-fast``. ``resolve_checkpoint("big-lama")`` finds the downloaded file there.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import tqdm

from lama_fast.checkpoints import CheckpointError

__all__ = ["MODELS", "DownloadError", "Model", "cache_directory", "download", "resolve_checkpoint"]


class Model(NamedTuple):
    url: str
    md5: str
    filename: str


# The only place the weights' addresses and checksums are written down. The MD5 is the one IOPaint pins.
MODELS = {
    "big-lama": Model(
        url="https://github.com/Sanster/models/releases/download/add_big_lama/big-lama.pt",
        md5="e3aa4aaa15225a33ec84f9f4bc47e500",
        filename="big-lama.pt",
    ),
}

# Seconds a connect or a single read may stall before the download fails (and can be resumed);
# the transfer as a whole may take as long as it needs.
_TIMEOUT = 60
_CHUNK = 1 << 20


class DownloadError(Exception):
    """A download that failed (network, HTTP, checksum), and what to do about it."""


def cache_directory() -> Path:
    """Where downloaded weights live: ``$LAMA_FAST_CACHE``, ``$XDG_CACHE_HOME/lama-fast`` or ``~/.cache/lama-fast``."""
    # Empty variables count as unset, as the XDG base directory specification says.
    if os.environ.get("LAMA_FAST_CACHE"):
        return Path(os.environ["LAMA_FAST_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lama-fast"
    return Path.home() / ".cache" / "lama-fast"


def download(name: str = "big-lama", directory: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Download the weights ``name`` (a key of ``MODELS``) into ``directory`` (default: ``cache_directory()``)
    and return the file's path.

    Nothing is fetched when the file is there with the right MD5. An interrupted download leaves
    ``<file>.part``, which the next call resumes. With ``progress``, a byte progress bar and status
    lines go to stderr. Raises ``DownloadError`` for network and HTTP errors and for a checksum
    that does not match (the bad ``.part`` is deleted), ``ValueError`` for an unknown ``name``.
    """
    model = _model(name)
    directory = cache_directory() if directory is None else Path(directory)
    target = directory / model.filename
    if target.is_file():
        if _md5(target) == model.md5:
            _say(progress, f"{target} is already downloaded and its MD5 matches; nothing to do")
            return target
        _say(progress, f"{target} exists but its MD5 is not {name}'s; downloading it again")
    directory.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        _fetch(model.url, part, progress)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"cannot download {name} from {model.url}: the server answered HTTP {error.code} "
                            f"{error.reason}{_resume_hint(part)}") from error
    except urllib.error.URLError as error:
        raise DownloadError(f"cannot download {name} from {model.url}: {error.reason}{_resume_hint(part)}") from error
    except (OSError, http.client.HTTPException) as error:
        # Connection resets, timeouts, truncated chunked bodies: the bytes so far stay in the .part.
        raise DownloadError(f"the download of {name} from {model.url} failed "
                            f"({type(error).__name__}: {error}){_resume_hint(part)}") from error
    actual = _md5(part)
    if actual != model.md5:
        part.unlink()
        raise DownloadError(f"the MD5 checksum of the downloaded {name} did not match: expected {model.md5}, "
                            f"got {actual}; the download was deleted, run again to download it anew")
    os.replace(part, target)
    return target


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The checkpoint file ``name_or_path`` means: an existing path as it is; a name from ``MODELS``
    (``"big-lama"``) that is not an existing path, its file in ``cache_directory()``.

    Raises ``CheckpointError`` when the name's file has not been downloaded, saying how to get it.
    Any other path is returned unchanged for the caller to check, so the errors stay those of a path.
    """
    path = Path(name_or_path)
    name = os.fspath(name_or_path)
    if name not in MODELS or path.exists():
        return path
    # No MD5 check here: download() gives the file its final name only after checking it.
    cached = cache_directory() / MODELS[name].filename
    if not cached.is_file():
        raise CheckpointError(f"{name} is not downloaded yet (looked for {cached}); run: lama-fast download {name}")
    return cached


def _model(name: str) -> Model:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown weights {name!r}; known: {', '.join(MODELS)}") from None


def _fetch(url: str, part: Path, progress: bool) -> None:
    """Bring ``part`` up to the whole file at ``url``, resuming from the bytes it already holds."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # Range Not Satisfiable: the .part already holds every byte; the MD5 check says whether they are right.
            return
        raise
    with response:
        if offset and response.status != 206:
            _say(progress, f"the server does not resume downloads; starting {part.name} again")
            offset = 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, "ab" if offset else "wb") as out, tqdm.tqdm(
            total=None if expected is None else offset + expected, initial=offset, desc=part.name[:-len(".part")],
            unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=not progress, dynamic_ncols=True,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client's read(n) returns b"" when the connection closes early instead of raising.
    if expected is not None and received < expected:
        raise DownloadError(f"the download of {part.name[:-len('.part')]} from {url} stopped: the connection closed "
                            f"after {offset + received} of {offset + expected} bytes{_resume_hint(part)}")


def _resume_hint(part: Path) -> str:
    if part.exists() and part.stat().st_size:
        return f"; the partial download is kept in {part}, run again to resume"
    return ""


def _md5(path: Path) -> str:
    # An integrity check against the published checksum, not a security measure.
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"lama-fast: {message}", file=sys.stderr)
