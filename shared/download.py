"""Checksummed download of data files.

``MNIST_FILES`` and ``CIFAR10_FILES`` map file names to ``(url, sha256)``; a
``sha256`` of ``None`` means that no SHA-256 is known with certainty and the
entry must be filled before ``download`` can use it on its own.
``PUBLISHED_MD5`` holds the MD5 sums that torchvision lists for the same
files; ``download_files`` falls back to them. The two t10k SHA-256 sums were
computed from files whose MD5 matches that list.
"""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from shared.errors import ConfigError, DataError
from shared.records import atomic_open

PUBLISHED_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
}


def _hashes(sha256, md5):
    return {k: hashlib.new(k) for k, v in (("sha256", sha256), ("md5", md5)) if v is not None}


def _file_matches(path: Path, sha256, md5) -> bool:
    hs = _hashes(sha256, md5)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for h in hs.values():
                h.update(chunk)
    want = {"sha256": sha256, "md5": md5}
    return all(h.hexdigest() == want[k].lower() for k, h in hs.items())


def download(url, dest_path, sha256, md5=None, timeout=60.0, chunk_size=1 << 20) -> Path:
    """Fetch ``url`` to ``dest_path``, verifying its checksum; return the path.

    Streams into a temporary file in the destination folder, checks the
    SHA-256 (and/or MD5; at least one is required), then renames it over
    ``dest_path`` atomically. On a mismatch or any failure the temporary file
    is removed and an existing ``dest_path`` is left as it was. If
    ``dest_path`` already exists with the right checksum nothing is fetched.
    """
    if sha256 is None and md5 is None:
        raise ConfigError(f"download {url}: an explicit checksum is required (sha256 or md5); "
                          "fill the entry in MNIST_FILES / CIFAR10_FILES")
    dest = Path(dest_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and _file_matches(dest, sha256, md5):
        return dest
    hs = _hashes(sha256, md5)
    with atomic_open(dest) as out:          # renamed over dest only if the block completes
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(chunk_size), b""):
                    out.write(chunk)
                    for h in hs.values():
                        h.update(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DataError(f"{dest}: could not download {url}: {e}") from None
        want = {"sha256": sha256, "md5": md5}
        for k, h in hs.items():
            if h.hexdigest() != want[k].lower():
                raise DataError(f"{dest}: {k} checksum mismatch for {url}: expected {want[k].lower()}, "
                                f"got {h.hexdigest()}; file not written")
    return dest


def download_files(files: dict, data_dir, names=None) -> list:
    """Download entries of ``MNIST_FILES`` / ``CIFAR10_FILES`` into ``data_dir``.

    Uses the table's SHA-256 when known, else the ``PUBLISHED_MD5`` entry.
    """
    out = []
    for name in (files if names is None else names):
        url, sha = files[name]
        out.append(download(url, Path(data_dir) / name, sha, md5=None if sha else PUBLISHED_MD5.get(name)))
    return out
