"""Datasets: loaders, splits, normalisation, minibatch schedules, download.

Everything here returns float64 inputs and int64 labels (the Theano backend
casts to its own float type). Every random choice is a pure function of the
``seed`` argument (and of the step ``t`` for minibatches and augmentation), so
two runs with the same options see the same data in the same order.

Sources
-------
``digits``     scikit-learn's 8x8 digits (1,797 images shipped inside the
               package, no download): 64 features scaled to [0, 1].
``mnist``      the four standard IDX ``.gz`` files in ``data_dir``; training
               and validation sets come from the 60,000 training images, the
               test set from the 10,000 t10k images. Pixels / 255.
``mnist-t10k`` only the t10k pair (as in the team's ``shared/data/mnist``):
               train, validation and test are disjoint parts of the 10,000
               test images (see ``load_mnist_test_only``). Real digits for
               tests and benchmarks; not comparable with published MNIST
               numbers.
``synthetic``  Gaussian clusters (``make_synthetic``).
``cifar10``    the ``cifar-10-batches-py`` folder or ``cifar-10-python.tar.gz``
               in ``data_dir``; X is (n, 3, 32, 32), normalised per channel
               with statistics of the training split only.

Splits
------
A pool of ``N`` examples is split by one permutation
``np.random.default_rng([seed, stream]).permutation(N)``: the validation set is
its first ``n_val`` entries and the training set the next ``n_train`` entries,
so the validation set does not change when ``n_train`` changes. The test set
is taken in the same way from its own pool (or from the same permutation for
``digits``, ``mnist-t10k`` and ``synthetic``, which have one pool).

Checksums
---------
``MNIST_FILES`` and ``CIFAR10_FILES`` map file names to ``(url, sha256)``; a
``sha256`` of ``None`` means that no SHA-256 is known with certainty and the
entry must be filled before ``download`` can use it on its own.
``PUBLISHED_MD5`` holds the MD5 sums that torchvision lists for the same
files; ``download_files`` falls back to them. The two t10k SHA-256 sums were
computed from files whose MD5 matches that list.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.errors import ConfigError, DataError

DATASET_NAMES = ("digits", "mnist", "mnist-t10k", "synthetic", "cifar10")

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (_MNIST_URL + "train-images-idx3-ubyte.gz", None),
    "train-labels-idx1-ubyte.gz": (_MNIST_URL + "train-labels-idx1-ubyte.gz", None),
    "t10k-images-idx3-ubyte.gz": (_MNIST_URL + "t10k-images-idx3-ubyte.gz",
                                  "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": (_MNIST_URL + "t10k-labels-idx1-ubyte.gz",
                                  "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
CIFAR10_FILES = {
    "cifar-10-python.tar.gz": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", None),
}
PUBLISHED_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
}

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

# Random streams: the second word of every seed sequence, so that the split,
# the minibatch order and the augmentation never share random numbers.
_STREAM_SPLIT, _STREAM_TEST, _STREAM_SYNTH, _STREAM_AUGMENT = 0, 1, 2, 3


# ---------------------------------------------------------------------------
# Containers

@dataclass(frozen=True, eq=False)
class Split:
    """Inputs ``X`` (float64, (n, features) or (n, 3, 32, 32)) and labels ``y`` (int64, (n,))."""

    X: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        if np.ndim(self.y) != 1 or len(self.X) != len(self.y):
            raise DataError(f"split: X has shape {np.shape(self.X)} but y has shape {np.shape(self.y)}; "
                            f"expected y of shape ({len(self.X)},)")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train, validation and test splits of one data source.

    ``meta`` holds what a results file should record about the data: the
    source (files or generator options), the seed, and for CIFAR-10 the
    normalisation statistics (``channel_mean``, ``channel_std``, in units of
    pixel / 255).
    """

    name: str
    train: Split
    val: Split
    test: Split
    n_classes: int
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.train.X.shape[1:])

    @property
    def n_features(self) -> int:
        return int(np.prod(self.input_shape))

    def describe(self) -> dict:
        """A JSON-friendly summary for ``results.json``."""
        return {"name": self.name, "n_train": len(self.train), "n_val": len(self.val),
                "n_test": len(self.test), "n_classes": int(self.n_classes),
                "input_shape": list(self.input_shape), **self.meta}


# ---------------------------------------------------------------------------
# Front door

def load(name, data_dir=None, n_train=None, n_val=None, n_test=None, seed=0) -> Dataset:
    """Load dataset ``name`` (one of ``DATASET_NAMES``) with the given split sizes.

    ``None`` sizes take each loader's default. ``mnist``, ``mnist-t10k`` and
    ``cifar10`` need ``data_dir``.
    """
    sizes = dict(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    if name == "digits":
        return load_digits(**sizes)
    if name == "synthetic":
        return make_synthetic(n=1000 if n_train is None else n_train, n_val=n_val, n_test=n_test, seed=seed)
    if name in ("mnist", "mnist-t10k", "cifar10"):
        if data_dir is None:
            raise ConfigError(f"dataset {name!r} needs a data directory (--data-dir)")
        if name == "mnist":
            return load_mnist(data_dir, **sizes)
        if name == "mnist-t10k":
            return load_mnist_test_only(data_dir, **sizes)
        return load_cifar10(data_dir, n_train=n_train, n_val=5000 if n_val is None else n_val,
                            n_test=n_test, seed=seed)
    raise ConfigError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


# ---------------------------------------------------------------------------
# Splitting helpers

def _check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _resolve(n, default, what) -> int:
    n = default if n is None else n
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {n!r}")
    return int(n)


def _partition(pool: int, sizes, names, seed: int, stream: int, source: str) -> list:
    """Disjoint index arrays of the given sizes: consecutive slices of one seeded permutation."""
    if sum(sizes) > pool:
        parts = " + ".join(f"{k}={v}" for k, v in zip(names, sizes))
        raise ConfigError(f"{source}: {parts} = {sum(sizes)} exceeds the {pool} examples available")
    perm = np.random.default_rng([seed, stream]).permutation(pool)
    bounds = np.cumsum([0, *sizes])
    return [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _split(X, y, idx, divide_by=1.0) -> Split:
    """Rows ``idx`` of (X / divide_by, y) as float64 / int64; converts only the selected rows."""
    Xs = np.array(X[idx], dtype=np.float64)
    if divide_by != 1.0:
        Xs /= divide_by
    return Split(Xs, np.asarray(y[idx], dtype=np.int64))


# ---------------------------------------------------------------------------
# digits and synthetic

def load_digits(n_train=None, n_val=None, n_test=None, seed=0) -> Dataset:
    """scikit-learn's 8x8 digits: 1,797 images, 64 features in [0, 1], 10 classes.

    Defaults: 1000 train, 400 validation, the remaining 397 test.
    """
    from sklearn.datasets import load_digits as _sk_digits  # lazy: only this loader uses scikit-learn

    seed = _check_seed(seed)
    d = _sk_digits()
    X, y = d.data, d.target
    n_val_, n_train_ = _resolve(n_val, 400, "n_val"), _resolve(n_train, 1000, "n_train")
    n_test_ = _resolve(n_test, max(len(y) - n_val_ - n_train_, 0), "n_test")
    val, train, test = _partition(len(y), (n_val_, n_train_, n_test_), ("n_val", "n_train", "n_test"),
                                  seed, _STREAM_SPLIT, "digits")
    return Dataset("digits", _split(X, y, train, 16.0), _split(X, y, val, 16.0), _split(X, y, test, 16.0), 10,
                   {"source": "sklearn.datasets.load_digits", "seed": seed})


def make_synthetic(n=1000, n_features=20, n_classes=3, seed=0, n_val=None, n_test=None,
                   separation=3.0) -> Dataset:
    """Gaussian clusters: ``n`` training points (``n_val``, ``n_test`` default ``n // 2``).

    Class centres are drawn from N(0, separation^2 / n_features) per feature
    (so centres lie about ``separation`` * sqrt(2) apart); each point is its
    class centre plus N(0, 1) noise; labels are uniform. All three splits come
    from one draw, so they share the distribution.
    """
    seed = _check_seed(seed)
    n = _resolve(n, 1000, "n")
    n_val_, n_test_ = _resolve(n_val, n // 2, "n_val"), _resolve(n_test, n // 2, "n_test")
    if n_features < 1 or n_classes < 2:
        raise ConfigError(f"synthetic: need n_features >= 1 and n_classes >= 2, got {n_features}, {n_classes}")
    rng = np.random.default_rng([seed, _STREAM_SYNTH])
    total = n + n_val_ + n_test_
    centres = rng.normal(scale=separation / np.sqrt(n_features), size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=total).astype(np.int64)
    X = centres[y] + rng.normal(size=(total, n_features))
    idx = np.split(np.arange(total), [n, n + n_val_])
    return Dataset("synthetic", _split(X, y, idx[0]), _split(X, y, idx[1]), _split(X, y, idx[2]), n_classes,
                   {"source": "gaussian clusters", "seed": seed, "n_features": n_features,
                    "separation": float(separation)})


# ---------------------------------------------------------------------------
# IDX files (MNIST)

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
    data_dir, seed = Path(data_dir), _check_seed(seed)
    missing = _missing(data_dir, MNIST_FILES)
    if missing:
        hint = ""
        if not _missing(data_dir, [n for n in MNIST_FILES if n.startswith("t10k")]):
            hint = " (only the t10k pair is present: use dataset 'mnist-t10k' / load_mnist_test_only)"
        raise DataError(f"MNIST: missing file(s) {', '.join(missing)}{hint}")
    Xtr, ytr = _read_mnist_pair(data_dir, "train")
    Xte, yte = _read_mnist_pair(data_dir, "t10k")
    n_val_ = _resolve(n_val, min(10000, len(ytr)), "n_val")
    n_train_ = _resolve(n_train, max(len(ytr) - n_val_, 0), "n_train")
    n_test_ = _resolve(n_test, len(yte), "n_test")
    val, train = _partition(len(ytr), (n_val_, n_train_), ("n_val", "n_train"), seed, _STREAM_SPLIT,
                            f"{data_dir}/train-*")
    (test,) = _partition(len(yte), (n_test_,), ("n_test",), seed, _STREAM_TEST, f"{data_dir}/t10k-*")
    return Dataset("mnist", _split(Xtr, ytr, train, 255.0), _split(Xtr, ytr, val, 255.0),
                   _split(Xte, yte, test, 255.0), 10,
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
    data_dir, seed = Path(data_dir), _check_seed(seed)
    X, y = _read_mnist_pair(data_dir, "t10k")
    n_val_, n_train_ = _resolve(n_val, 2000, "n_val"), _resolve(n_train, 6000, "n_train")
    n_test_ = _resolve(n_test, max(len(y) - n_val_ - n_train_, 0), "n_test")
    val, train, test = _partition(len(y), (n_val_, n_train_, n_test_), ("n_val", "n_train", "n_test"),
                                  seed, _STREAM_SPLIT, f"{data_dir}/t10k-*")
    return Dataset("mnist-t10k", _split(X, y, train, 255.0), _split(X, y, val, 255.0),
                   _split(X, y, test, 255.0), 10,
                   {"source": str(data_dir), "files": sorted(n for n in MNIST_FILES if n.startswith("t10k")),
                    "seed": seed, "note": "train/val/test all drawn from the MNIST test set"})


# ---------------------------------------------------------------------------
# CIFAR-10 (python pickles)

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers, and nothing else.

    The CIFAR-10 batches are pickles; a pickle can run arbitrary code, so only
    the classes that a numpy array's pickle names are allowed.
    """

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy.core.multiarray", "scalar"),
                ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _parse_cifar_batch(raw: bytes, where: str):
    """(data uint8 (n, 3072), labels int64 (n,)) from one batch pickle's bytes."""
    try:
        d = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a corrupt or truncated file
        raise DataError(f"{where}: corrupt or truncated CIFAR-10 batch pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a dict with b'data' and b'labels', found {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{where}: expected keys b'data' and b'labels', found {sorted(map(repr, d))}")
    data, labels = np.asarray(data), np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{where}: expected b'data' uint8 of shape (n, 3072), found {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{where}: expected {len(data)} labels, found shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: expected labels 0..9, found range {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def _cifar_read_folder(folder: Path, names) -> dict:
    out = {}
    for n in names:
        p = folder / n
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{p}: file not found (expected a CIFAR-10 python batch)") from None
        out[n] = _parse_cifar_batch(raw, str(p))
    return out


def _cifar_read_tarball(path: Path, names) -> dict:
    out = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for n in names:
                member = f"{CIFAR10_DIR}/{n}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise DataError(f"{path}: expected member {member}, not found in the archive")
                out[n] = _parse_cifar_batch(f.read(), f"{path}:{member}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated tar.gz ({e})") from None
    return out


def _cifar_source(data_dir: Path):
    """('folder', path) or ('tarball', path); the folder wins when both exist."""
    for folder in (data_dir / CIFAR10_DIR, data_dir):
        if (folder / CIFAR10_TEST_BATCH).is_file() or (folder / CIFAR10_TRAIN_BATCHES[0]).is_file():
            return "folder", folder
    if (data_dir / CIFAR10_TARBALL).is_file():
        return "tarball", data_dir / CIFAR10_TARBALL
    raise DataError(f"{data_dir}: expected a {CIFAR10_DIR}/ folder or {CIFAR10_TARBALL}, found neither")


def _to_images(data: np.ndarray, idx) -> np.ndarray:
    """uint8 rows (n, 3072) -> float64 (len(idx), 3, 32, 32) in [0, 1]."""
    X = data[idx].reshape(-1, 3, 32, 32).astype(np.float64)
    X /= 255.0
    return X


def load_cifar10(data_dir, n_train=None, n_val=5000, n_test=None, seed=0) -> Dataset:
    """CIFAR-10 from ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` in ``data_dir``.

    The tarball is read in place (nothing is extracted). Validation is
    ``n_val`` images held out of the 50,000 training images, train the next
    ``n_train`` (default: the rest); test is ``n_test`` of the 10,000 test
    images (default: all). X is (n, 3, 32, 32) float64: pixel / 255, minus
    the per-channel mean, over the per-channel standard deviation, both
    computed from the training split alone and returned in
    ``meta['channel_mean']`` and ``meta['channel_std']``.
    """
    data_dir, seed = Path(data_dir), _check_seed(seed)
    kind, where = _cifar_source(data_dir)
    names = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
    batches = (_cifar_read_folder if kind == "folder" else _cifar_read_tarball)(where, names)
    tr_data = np.concatenate([batches[n][0] for n in CIFAR10_TRAIN_BATCHES])
    tr_lab = np.concatenate([batches[n][1] for n in CIFAR10_TRAIN_BATCHES])
    te_data, te_lab = batches[CIFAR10_TEST_BATCH]
    n_val_ = _resolve(n_val, 5000, "n_val")
    n_train_ = _resolve(n_train, max(len(tr_lab) - n_val_, 0), "n_train")
    n_test_ = _resolve(n_test, len(te_lab), "n_test")
    val, train = _partition(len(tr_lab), (n_val_, n_train_), ("n_val", "n_train"), seed, _STREAM_SPLIT,
                            f"{where} (training batches)")
    (test,) = _partition(len(te_lab), (n_test_,), ("n_test",), seed, _STREAM_TEST, f"{where} (test batch)")
    if n_train_ == 0:
        raise ConfigError("cifar10: n_train must be positive (normalisation statistics come from it)")
    Xtr = _to_images(tr_data, train)
    mean = Xtr.mean(axis=(0, 2, 3))
    std = Xtr.std(axis=(0, 2, 3))
    if np.any(std == 0):
        raise DataError(f"{where}: a colour channel is constant over the training split; cannot normalise")

    def normalise(X):
        X -= mean[None, :, None, None]
        X /= std[None, :, None, None]
        return X

    return Dataset("cifar10", Split(normalise(Xtr), tr_lab[train]),
                   Split(normalise(_to_images(tr_data, val)), tr_lab[val]),
                   Split(normalise(_to_images(te_data, test)), te_lab[test]), 10,
                   {"source": str(where), "format": kind, "seed": seed,
                    "channel_mean": mean.tolist(), "channel_std": std.tolist()})


def augment_cifar(X, seed, t, max_shift=4) -> np.ndarray:
    """Random horizontal flips (p = 0.5) and translations by up to ``max_shift`` pixels.

    A pure function of ``(X, seed, t)``: draws come from
    ``default_rng([seed, 3, t])``. Each image is flipped with probability 1/2,
    then shifted by (dy, dx) uniform in {-max_shift..max_shift}; pixels moved
    in from outside are 0 (the channel mean, after normalisation). Returns a
    new array; ``X`` (n, C, H, W) is not modified.
    """
    X = np.asarray(X)
    if X.ndim != 4:
        raise DataError(f"augment_cifar: expected images of shape (n, C, H, W), got {X.shape}")
    n, _, H, W = X.shape
    s = int(max_shift)
    rng = np.random.default_rng([_check_seed(seed), _STREAM_AUGMENT, _check_seed(t)])
    flip = rng.random(n) < 0.5
    dy, dx = rng.integers(-s, s + 1, size=(2, n))
    padded = np.pad(X, ((0, 0), (0, 0), (s, s), (s, s)))
    # Output pixel (r, c) reads input row r - dy and column c - dx of the
    # (possibly flipped) image; indices out of range land in the zero padding.
    rows = (s - dy)[:, None] + np.arange(H)
    src = np.arange(W)[None, :] - dx[:, None]
    cols = np.where(flip[:, None], W - 1 - src, src) + s
    return padded[np.arange(n)[:, None, None, None], np.arange(X.shape[1])[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------
# Minibatches

def batch_indices(n, batch_size, seed, t) -> np.ndarray:
    """Indices of minibatch ``t``: a pure function of ``(n, batch_size, seed, t)``.

    With ``k = n // batch_size`` batches per epoch, step ``t`` belongs to epoch
    ``e = t // k``, whose order is ``default_rng([seed, e]).permutation(n)``;
    the batch is slice ``t % k`` of it. The last ``n % batch_size`` examples
    of each epoch's permutation are skipped (a different set each epoch).
    """
    for name, v in (("n", n), ("batch_size", batch_size), ("seed", seed), ("t", t)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise ConfigError(f"batch_indices: {name} must be an integer, got {v!r}")
    if batch_size <= 0 or batch_size > n:
        raise ConfigError(f"batch_indices: batch size {batch_size} must be in 1..{n} (the number of examples)")
    if seed < 0 or t < 0:
        raise ConfigError(f"batch_indices: seed and t must be non-negative, got seed={seed}, t={t}")
    per_epoch = n // batch_size
    e, k = divmod(int(t), per_epoch)
    perm = np.random.default_rng([int(seed), e]).permutation(int(n))
    return perm[k * batch_size:(k + 1) * batch_size].astype(np.int64)


# ---------------------------------------------------------------------------
# Download

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
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for chunk in iter(lambda: resp.read(chunk_size), b""):
                        out.write(chunk)
                        for h in hs.values():
                            h.update(chunk)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise DataError(f"{dest}: could not download {url}: {e}") from None
            out.flush()
            os.fsync(out.fileno())
        want = {"sha256": sha256, "md5": md5}
        for k, h in hs.items():
            if h.hexdigest() != want[k].lower():
                raise DataError(f"{dest}: {k} checksum mismatch for {url}: expected {want[k].lower()}, "
                                f"got {h.hexdigest()}; file not written")
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
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
