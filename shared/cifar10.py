"""CIFAR-10: the python batches (folder or tarball), per-channel normalisation
with training-split statistics, and the shift-and-flip augmentation.
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from shared.errors import ConfigError, DataError
from shared.splits import (STREAM_AUGMENT, STREAM_SPLIT, STREAM_TEST, Dataset, Split, check_seed, partition,
                           resolve_size)

CIFAR10_FILES = {
    "cifar-10-python.tar.gz": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", None),
}
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"


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
    data_dir, seed = Path(data_dir), check_seed(seed)
    kind, where = _cifar_source(data_dir)
    names = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
    batches = (_cifar_read_folder if kind == "folder" else _cifar_read_tarball)(where, names)
    tr_data = np.concatenate([batches[n][0] for n in CIFAR10_TRAIN_BATCHES])
    tr_lab = np.concatenate([batches[n][1] for n in CIFAR10_TRAIN_BATCHES])
    te_data, te_lab = batches[CIFAR10_TEST_BATCH]
    n_val_ = resolve_size(n_val, 5000, "n_val")
    n_train_ = resolve_size(n_train, max(len(tr_lab) - n_val_, 0), "n_train")
    n_test_ = resolve_size(n_test, len(te_lab), "n_test")
    val, train = partition(len(tr_lab), (n_val_, n_train_), ("n_val", "n_train"), seed, STREAM_SPLIT,
                            f"{where} (training batches)")
    (test,) = partition(len(te_lab), (n_test_,), ("n_test",), seed, STREAM_TEST, f"{where} (test batch)")
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
    rng = np.random.default_rng([check_seed(seed), STREAM_AUGMENT, check_seed(t)])
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
