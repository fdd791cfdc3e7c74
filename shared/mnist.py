"""MNIST: the IDX file format and the two MNIST loaders (full, and t10k only).

An IDX file is a big-endian header (two zero bytes, a dtype code, the number
of dimensions, then each dimension as uint32) followed by the array; the
files may be gzip-compressed. ``read_idx`` checks every part of it and names
the problem (``DataError``).
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from shared.errors import DataError
from shared.splits import STREAM_SPLIT, STREAM_TEST, Dataset, check_seed, partition, resolve_size, take

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (_MNIST_URL + "train-images-idx3-ubyte.gz", None),
    "train-labels-idx1-ubyte.gz": (_MNIST_URL + "train-labels-idx1-ubyte.gz", None),
    "t10k-images-idx3-ubyte.gz": (_MNIST_URL + "t10k-images-idx3-ubyte.gz",
                                  "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": (_MNIST_URL + "t10k-labels-idx1-ubyte.gz",
                                  "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None


def read_idx(path, magic=None, shape=None) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw) into an array of native byte order.

    Checks the two zero bytes, the dtype code, the dimension count, and that
    the payload holds exactly the number of bytes that the header promises.
    ``magic`` (e.g. 2051 for images, 2049 for labels) and ``shape`` (with
    ``None`` for any size) are optional expectations. Raises DataError naming
    the file and what was expected.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: expected an IDX header of at least 4 bytes, file has {len(data)}")
    found = int.from_bytes(data[:4], "big")
    if magic is not None and found != magic:
        raise DataError(f"{path}: expected IDX magic {magic} (0x{magic:08x}), found {found} (0x{found:08x})")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file: expected two zero bytes at the start, found {data[:2]!r}")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x}; expected one of "
                        + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES))
    if ndim == 0:
        raise DataError(f"{path}: IDX header has 0 dimensions; expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated: {ndim}-dimensional IDX header needs {header} bytes, file has {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(data) - header
    dims_s = "x".join(map(str, dims))
    if have < need:
        raise DataError(f"{path}: truncated: header says {dims_s} = {need} bytes, file has {have}")
    if have > need:
        raise DataError(f"{path}: {have - need} unexpected trailing bytes: header says {dims_s} = {need} bytes, "
                        f"file has {have}")
    if shape is not None and (len(shape) != ndim or any(s is not None and s != d for s, d in zip(shape, dims))):
        want = "x".join("?" if s is None else str(s) for s in shape)
        raise DataError(f"{path}: expected an array of shape {want}, header says {dims_s}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _read_mnist_pair(data_dir: Path, prefix: str):
    """(images (n, 784) float64 in [0, 1], labels (n,) int64) from ``prefix``-images/labels IDX files."""
    img_path = data_dir / f"{prefix}-images-idx3-ubyte.gz"
    lab_path = data_dir / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(img_path, magic=2051, shape=(None, 28, 28))
    labels = read_idx(lab_path, magic=2049, shape=(None,))
    if len(images) != len(labels):
        raise DataError(f"{lab_path}: expected {len(images)} labels to match {img_path.name}, found {len(labels)}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lab_path}: expected labels 0..9, found {int(labels.max())}")
    return images.reshape(len(images), -1), labels.astype(np.int64)


def _missing(data_dir: Path, names) -> list:
    return [str(data_dir / n) for n in names if not (data_dir / n).is_file()]


def load_mnist(data_dir, n_train=None, n_val=None, n_test=None, seed=0) -> Dataset:
    """MNIST from the four standard IDX ``.gz`` files in ``data_dir``.

    Train and validation sets are disjoint parts of the 60,000 training images
    (defaults: 50,000 and 10,000); the test set is taken from the 10,000 t10k
    images (default: all of them). Pixels are divided by 255.
    """
    data_dir, seed = Path(data_dir), check_seed(seed)
    missing = _missing(data_dir, MNIST_FILES)
    if missing:
        hint = ""
        if not _missing(data_dir, [n for n in MNIST_FILES if n.startswith("t10k")]):
            hint = " (only the t10k pair is present: use dataset 'mnist-t10k' / load_mnist_test_only)"
        raise DataError(f"MNIST: missing file(s) {', '.join(missing)}{hint}")
    Xtr, ytr = _read_mnist_pair(data_dir, "train")
    Xte, yte = _read_mnist_pair(data_dir, "t10k")
    n_val_ = resolve_size(n_val, min(10000, len(ytr)), "n_val")
    n_train_ = resolve_size(n_train, max(len(ytr) - n_val_, 0), "n_train")
    n_test_ = resolve_size(n_test, len(yte), "n_test")
    val, train = partition(len(ytr), (n_val_, n_train_), ("n_val", "n_train"), seed, STREAM_SPLIT,
                            f"{data_dir}/train-*")
    (test,) = partition(len(yte), (n_test_,), ("n_test",), seed, STREAM_TEST, f"{data_dir}/t10k-*")
    return Dataset("mnist", take(Xtr, ytr, train, 255.0), take(Xtr, ytr, val, 255.0),
                   take(Xte, yte, test, 255.0), 10,
                   {"source": str(data_dir), "files": sorted(MNIST_FILES), "seed": seed})


def load_mnist_test_only(data_dir, n_train=None, n_val=None, n_test=None, seed=0) -> Dataset:
    """Train/validation/test from the 10,000 MNIST t10k images alone.

    For machines that hold only ``t10k-images-idx3-ubyte.gz`` and
    ``t10k-labels-idx1-ubyte.gz``. Split: ``perm =
    np.random.default_rng([seed, 0]).permutation(10000)``; validation is
    ``perm[:n_val]``, train the next ``n_train``, test the next ``n_test``
    (defaults 2000, 6000, 2000). Numbers on this split are not comparable with
    published MNIST results.
    """
    data_dir, seed = Path(data_dir), check_seed(seed)
    X, y = _read_mnist_pair(data_dir, "t10k")
    n_val_, n_train_ = resolve_size(n_val, 2000, "n_val"), resolve_size(n_train, 6000, "n_train")
    n_test_ = resolve_size(n_test, max(len(y) - n_val_ - n_train_, 0), "n_test")
    val, train, test = partition(len(y), (n_val_, n_train_, n_test_), ("n_val", "n_train", "n_test"),
                                  seed, STREAM_SPLIT, f"{data_dir}/t10k-*")
    return Dataset("mnist-t10k", take(X, y, train, 255.0), take(X, y, val, 255.0),
                   take(X, y, test, 255.0), 10,
                   {"source": str(data_dir), "files": sorted(n for n in MNIST_FILES if n.startswith("t10k")),
                    "seed": seed, "note": "train/val/test all drawn from the MNIST test set"})
