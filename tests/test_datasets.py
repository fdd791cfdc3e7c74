"""Tests for shared.datasets on small files that the tests write themselves."""
from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shared import datasets as ds
from shared.errors import ConfigError, DataError

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


# ---------------------------------------------------------------------------
# writers in the real formats

def idx_bytes(a: np.ndarray, code=None, magic_override=None) -> bytes:
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
             np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}
    code = codes[a.dtype.newbyteorder("=")] if code is None else code
    head = bytes([0, 0, code, a.ndim]) if magic_override is None else magic_override.to_bytes(4, "big")
    head += b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, a: np.ndarray, gz=True, **kw) -> Path:
    data = idx_bytes(a, **kw)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist(folder: Path, n_train=60, n_test=30, seed=0, prefixes=("train", "t10k")) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in zip(("train", "t10k"), (n_train, n_test)):
        if prefix not in prefixes:
            continue
        img = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", img)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", lab)
        out[prefix] = (img, lab)
    return out


def cifar_batch(n, rng, offset=0) -> dict:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, :1024] //= 2  # channels with different statistics
    data[:, 2048:] = np.minimum(data[:, 2048:].astype(int) + offset, 255).astype(np.uint8)
    return {b"batch_label": b"batch", b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
            b"data": data, b"filenames": [b"f%d.png" % i for i in range(n)]}


def write_cifar(folder: Path, n=20, as_tar=False, seed=0) -> dict:
    """Six batches in the real pickle format; returns them by name."""
    rng = np.random.default_rng(seed)
    batches = {name: cifar_batch(n, rng, offset=60 if name == "test_batch" else 0)
               for name in (*ds.CIFAR10_TRAIN_BATCHES, ds.CIFAR10_TEST_BATCH)}
    if as_tar:
        with tarfile.open(folder / ds.CIFAR10_TARBALL, "w:gz") as tar:
            for name, b in batches.items():
                raw = pickle.dumps(b, protocol=2)
                info = tarfile.TarInfo(f"{ds.CIFAR10_DIR}/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        sub = folder / ds.CIFAR10_DIR
        sub.mkdir()
        for name, b in batches.items():
            (sub / name).write_bytes(pickle.dumps(b, protocol=2))
    return batches


# ---------------------------------------------------------------------------
# IDX

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_idx_round_trip(tmp_path, gz, dtype):
    rng = np.random.default_rng(1)
    a = (rng.normal(size=(4, 3, 5)) * 50).astype(dtype)
    p = write_idx(tmp_path / "a.idx", a, gz=gz)
    b = ds.read_idx(p)
    assert b.shape == a.shape and b.dtype.kind == a.dtype.kind and b.dtype.itemsize == a.dtype.itemsize
    np.testing.assert_array_equal(a, b)
    assert b.dtype.isnative


def test_idx_truncated_names_file_and_sizes(tmp_path):
    a = np.zeros((10, 28, 28), np.uint8)
    data = idx_bytes(a)[:-100]
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(data))
    with pytest.raises(DataError) as e:
        ds.read_idx(p)
    msg = str(e.value)
    assert str(p) in msg and "truncated" in msg and "10x28x28 = 7840" in msg and "7740" in msg


def test_idx_trailing_bytes(tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(idx_bytes(np.zeros(5, np.uint8)) + b"\0\0")
    with pytest.raises(DataError, match="2 unexpected trailing bytes"):
        ds.read_idx(p)


def test_idx_wrong_magic(tmp_path):
    p = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(5, np.uint8))  # labels-like: magic 2049
    with pytest.raises(DataError) as e:
        ds.read_idx(p, magic=2051)
    assert str(p) in str(e.value) and "expected IDX magic 2051" in str(e.value) and "2049" in str(e.value)
    assert ds.read_idx(p, magic=2049).shape == (5,)


def test_idx_bad_header(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(bytes([0, 0, 0x07, 1]) + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="unknown IDX dtype code 0x07"):
        ds.read_idx(p)
    p.write_bytes(b"PK\x03\x04" + b"\0" * 20)
    with pytest.raises(DataError, match="two zero bytes"):
        ds.read_idx(p)
    p.write_bytes(b"\0\0")
    with pytest.raises(DataError, match="at least 4 bytes"):
        ds.read_idx(p)


def test_idx_shape_expectation(tmp_path):
    p = write_idx(tmp_path / "x.gz", np.zeros((2, 27, 28), np.uint8))
    with pytest.raises(DataError, match=r"expected an array of shape \?x28x28, header says 2x27x28"):
        ds.read_idx(p, shape=(None, 28, 28))


def test_idx_missing_and_corrupt_gzip(tmp_path):
    missing = tmp_path / "nope-idx1-ubyte.gz"
    with pytest.raises(DataError, match="nope-idx1-ubyte.gz: file not found"):
        ds.read_idx(missing)
    p = tmp_path / "cut.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8) % 7))[:-30])
    with pytest.raises(DataError) as e:
        ds.read_idx(p)
    assert str(p) in str(e.value) and "gzip" in str(e.value)


# ---------------------------------------------------------------------------
# MNIST

def test_load_mnist_small_files(tmp_path):
    raw = write_mnist(tmp_path, n_train=60, n_test=30)
    d = ds.load_mnist(tmp_path, n_train=40, n_val=15, n_test=20, seed=3)
    assert (len(d.train), len(d.val), len(d.test)) == (40, 15, 20)
    assert d.train.X.shape == (40, 784) and d.train.X.dtype == np.float64 and d.train.y.dtype == np.int64
    assert 0.0 <= d.train.X.min() and d.train.X.max() <= 1.0
    # every returned row is a training image / 255 with its own label; train and val disjoint
    img, lab = raw["train"]
    flat = img.reshape(60, -1).astype(np.float64) / 255.0
    rows = {r.tobytes(): i for i, r in enumerate(flat)}
    tr = [rows[r.tobytes()] for r in d.train.X]
    va = [rows[r.tobytes()] for r in d.val.X]
    assert not set(tr) & set(va)
    np.testing.assert_array_equal(d.train.y, lab[tr])
    timg, _ = raw["t10k"]
    trows = {r.tobytes() for r in timg.reshape(30, -1).astype(np.float64) / 255.0}
    assert all(r.tobytes() in trows for r in d.test.X)
    # deterministic given the seed, different for another seed
    d2 = ds.load("mnist", tmp_path, n_train=40, n_val=15, n_test=20, seed=3)
    np.testing.assert_array_equal(d.train.X, d2.train.X)
    d3 = ds.load_mnist(tmp_path, n_train=40, n_val=15, n_test=20, seed=4)
    assert not np.array_equal(d.train.y, d3.train.y)
    # validation set does not depend on n_train
    d4 = ds.load_mnist(tmp_path, n_train=10, n_val=15, n_test=20, seed=3)
    np.testing.assert_array_equal(d.val.X, d4.val.X)


def test_load_mnist_defaults_and_too_many(tmp_path):
    write_mnist(tmp_path, n_train=60, n_test=30)
    d = ds.load_mnist(tmp_path, n_val=10)
    assert (len(d.train), len(d.val), len(d.test)) == (50, 10, 30)
    with pytest.raises(ConfigError, match="exceeds the 60 examples"):
        ds.load_mnist(tmp_path, n_train=55, n_val=10)


def test_load_mnist_missing_train_files_suggests_test_only(tmp_path):
    write_mnist(tmp_path, prefixes=("t10k",))
    with pytest.raises(DataError) as e:
        ds.load_mnist(tmp_path)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(e.value) and "mnist-t10k" in str(e.value)


def test_load_mnist_label_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: expected 30 labels"):
        ds.load_mnist(tmp_path)


def test_load_mnist_test_only_split(tmp_path):
    raw = write_mnist(tmp_path, n_test=100, prefixes=("t10k",))
    d = ds.load_mnist_test_only(tmp_path, n_train=50, n_val=20, n_test=30, seed=1)
    img, lab = raw["t10k"]
    perm = np.random.default_rng([1, 0]).permutation(100)  # the documented split
    np.testing.assert_array_equal(d.val.y, lab[perm[:20]])
    np.testing.assert_array_equal(d.train.y, lab[perm[20:70]])
    np.testing.assert_array_equal(d.test.y, lab[perm[70:100]])
    np.testing.assert_array_equal(d.test.X, img[perm[70:100]].reshape(30, -1) / 255.0)


@pytest.mark.skipif(not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="real MNIST t10k not present")
def test_real_mnist_t10k():
    img = ds.read_idx(REAL_MNIST / "t10k-images-idx3-ubyte.gz", magic=2051)
    lab = ds.read_idx(REAL_MNIST / "t10k-labels-idx1-ubyte.gz", magic=2049)
    assert img.shape == (10000, 28, 28) and img.dtype == np.uint8 and lab.shape == (10000,)
    assert lab[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test labels
    assert np.bincount(lab).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    d = ds.load("mnist-t10k", REAL_MNIST)
    assert (len(d.train), len(d.val), len(d.test)) == (6000, 2000, 2000)
    assert d.train.X.shape == (6000, 784) and d.train.X.max() == 1.0 and d.train.X.min() == 0.0
    assert set(np.unique(d.train.y)) == set(range(10))


# ---------------------------------------------------------------------------
# CIFAR-10

def _expected_cifar(batches, n_val, seed):
    data = np.concatenate([batches[n][b"data"] for n in ds.CIFAR10_TRAIN_BATCHES])
    labels = np.concatenate([batches[n][b"labels"] for n in ds.CIFAR10_TRAIN_BATCHES])
    perm = np.random.default_rng([seed, 0]).permutation(len(labels))
    return data, labels, perm[:n_val], perm[n_val:]


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_formats_and_training_only_normalisation(tmp_path, as_tar):
    batches = write_cifar(tmp_path, n=20, as_tar=as_tar)
    d = ds.load_cifar10(tmp_path, n_val=10, seed=2)
    assert d.meta["format"] == ("tarball" if as_tar else "folder")
    assert d.train.X.shape == (90, 3, 32, 32) and d.val.X.shape == (10, 3, 32, 32)
    assert d.test.X.shape == (20, 3, 32, 32) and d.train.X.dtype == np.float64 and d.test.y.dtype == np.int64
    data, labels, val, train = _expected_cifar(batches, 10, 2)
    raw_train = data[train].reshape(-1, 3, 32, 32) / 255.0
    mean, std = raw_train.mean(axis=(0, 2, 3)), raw_train.std(axis=(0, 2, 3))
    np.testing.assert_allclose(d.meta["channel_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(d.meta["channel_std"], std, rtol=1e-12)
    # normalised with the training split's statistics: exact zero mean / unit std there only
    np.testing.assert_allclose(d.train.X.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(d.train.X.std(axis=(0, 2, 3)), 1.0, atol=1e-12)
    np.testing.assert_array_equal(d.train.y, labels[train])
    np.testing.assert_allclose(d.val.X, (data[val].reshape(-1, 3, 32, 32) / 255.0 - mean[:, None, None])
                               / std[:, None, None], rtol=1e-12, atol=1e-12)
    # the test batch (shifted blue channel) was not used for the statistics
    assert d.test.X[:, 2].mean() > 0.5


def test_cifar_folder_and_tarball_agree(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    write_cifar(tmp_path / "a", as_tar=False, seed=5)
    write_cifar(tmp_path / "b", as_tar=True, seed=5)
    da = ds.load("cifar10", tmp_path / "a", n_train=50, n_val=20, n_test=10, seed=1)
    db = ds.load("cifar10", tmp_path / "b", n_train=50, n_val=20, n_test=10, seed=1)
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(da, s).X, getattr(db, s).X)
        np.testing.assert_array_equal(getattr(da, s).y, getattr(db, s).y)
    assert not list((tmp_path / "b").glob("cifar-10-batches-py"))  # nothing extracted


def test_cifar_truncated_and_missing_batch(tmp_path):
    write_cifar(tmp_path)
    p = tmp_path / ds.CIFAR10_DIR / "data_batch_3"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(DataError) as e:
        ds.load_cifar10(tmp_path, n_val=10)
    assert str(p) in str(e.value) and "truncated" in str(e.value)
    p.unlink()
    with pytest.raises(DataError, match=r"data_batch_3: file not found"):
        ds.load_cifar10(tmp_path, n_val=10)


def test_cifar_bad_contents_and_tar_problems(tmp_path):
    write_cifar(tmp_path)
    p = tmp_path / ds.CIFAR10_DIR / "test_batch"
    p.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: expected b'data' uint8 of shape \(n, 3072\)"):
        ds.load_cifar10(tmp_path, n_val=10)
    # a pickle that would call anything other than numpy's array constructors is refused
    p.write_bytes(pickle.dumps(Path("x"), protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        ds.load_cifar10(tmp_path, n_val=10)
    t = tmp_path / "t"
    t.mkdir()
    with tarfile.open(t / ds.CIFAR10_TARBALL, "w:gz") as tar:
        raw = pickle.dumps(cifar_batch(5, np.random.default_rng(0)), protocol=2)
        info = tarfile.TarInfo(f"{ds.CIFAR10_DIR}/data_batch_1")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(DataError, match="expected member cifar-10-batches-py/data_batch_2"):
        ds.load_cifar10(t, n_val=1)
    (t / ds.CIFAR10_TARBALL).write_bytes((t / ds.CIFAR10_TARBALL).read_bytes()[:200])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        ds.load_cifar10(t, n_val=1)
    with pytest.raises(DataError, match="expected a cifar-10-batches-py/ folder"):
        ds.load_cifar10(tmp_path / "empty-nonexistent")


def test_cifar_sizes_checked(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(ConfigError, match="n_val=5000"):
        ds.load_cifar10(tmp_path)


# ---------------------------------------------------------------------------
# augmentation

def test_augment_is_pure_and_each_image_a_flip_shift_of_its_input():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 3, 32, 32))
    X0 = X.copy()
    A = ds.augment_cifar(X, seed=7, t=3)
    np.testing.assert_array_equal(X, X0)  # input untouched
    np.testing.assert_array_equal(A, ds.augment_cifar(X, seed=7, t=3))
    assert not np.array_equal(A, ds.augment_cifar(X, seed=7, t=4))
    assert not np.array_equal(A, ds.augment_cifar(X, seed=8, t=3))
    assert A.shape == X.shape and A.dtype == np.float64
    P = np.pad(X, ((0, 0), (0, 0), (4, 4), (4, 4)))
    seen_flip, seen_shift = set(), set()
    for i in range(len(X)):
        matches = []
        for flip, dy, dx in itertools.product((False, True), range(-4, 5), range(-4, 5)):
            src = P[i][:, :, ::-1] if flip else P[i]
            cand = src[:, 4 - dy:4 - dy + 32, 4 - dx:4 - dx + 32]
            if np.array_equal(cand, A[i]):
                matches.append((flip, dy, dx))
        assert len(matches) == 1, f"image {i}: not exactly one flip/shift of its input"
        seen_flip.add(matches[0][0])
        seen_shift.add(matches[0][1:])
    assert seen_flip == {False, True} and len(seen_shift) > 4


# ---------------------------------------------------------------------------
# minibatches

def test_batch_indices_pure_and_cover_each_epoch():
    n, b, seed = 23, 5, 11
    per_epoch = n // b
    batches = [ds.batch_indices(n, b, seed, t) for t in range(3 * per_epoch)]
    # order of calls does not matter
    for t in reversed(range(3 * per_epoch)):
        np.testing.assert_array_equal(ds.batch_indices(n, b, seed, t), batches[t])
    for e in range(3):
        epoch = np.concatenate(batches[e * per_epoch:(e + 1) * per_epoch])
        assert len(epoch) == per_epoch * b and len(set(epoch.tolist())) == per_epoch * b
        assert epoch.min() >= 0 and epoch.max() < n
        np.testing.assert_array_equal(epoch, np.random.default_rng([seed, e]).permutation(n)[:per_epoch * b])
    assert not np.array_equal(batches[0], batches[per_epoch])
    assert not np.array_equal(batches[0], ds.batch_indices(n, b, seed + 1, 0))
    assert batches[0].dtype == np.int64


@pytest.mark.parametrize("n,b,t", [(10, 0, 0), (10, 11, 0), (10, -1, 0), (10, 2, -1)])
def test_batch_indices_errors(n, b, t):
    with pytest.raises(ConfigError):
        ds.batch_indices(n, b, 0, t)


# ---------------------------------------------------------------------------
# digits, synthetic, load()

def test_digits():
    d = ds.load_digits(seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (1000, 400, 397)
    assert d.train.X.shape == (1000, 64) and d.n_classes == 10 and d.train.X.dtype == np.float64
    assert d.train.X.min() == 0.0 and d.train.X.max() == 1.0
    # the three splits together are exactly the 1797 digits (a partition, nothing repeated)
    from sklearn.datasets import load_digits
    full = load_digits()
    all_rows = np.concatenate([np.c_[s.X, s.y] for s in (d.train, d.val, d.test)])
    want = np.c_[full.data / 16.0, full.target]
    a, ca = np.unique(all_rows, axis=0, return_counts=True)
    b, cb = np.unique(want, axis=0, return_counts=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ca, cb)
    d2 = ds.load("digits", n_train=100, n_val=50, n_test=20, seed=0)
    assert (len(d2.train), len(d2.val), len(d2.test)) == (100, 50, 20)
    np.testing.assert_array_equal(d2.val.X, d.val.X[:50])
    with pytest.raises(ConfigError, match="exceeds the 1797"):
        ds.load_digits(n_train=1500)


def test_digits_arrays_are_scikit_learns_without_importing_it(monkeypatch):
    """The digits read from scikit-learn's data file equal ``load_digits()`` bit for bit, and
    reading them imports no scikit-learn (a child process, whose modules start clean); where
    the file is not found, ``load_digits`` itself gives them."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    full = load_digits()
    X, y = ds.digits_arrays()
    assert X.dtype == full.data.dtype and y.dtype == full.target.dtype
    np.testing.assert_array_equal(X, full.data)
    np.testing.assert_array_equal(y, full.target)
    code = ("import sys; from shared.datasets import digits_arrays; X, y = digits_arrays(); "
            "print(X.shape, int(y.sum()), any(m.split('.')[0] == 'sklearn' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == ["(1797,", "64)", str(int(full.target.sum())), "False"], out
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    X2, y2 = ds.digits_arrays()
    np.testing.assert_array_equal(X2, full.data)
    np.testing.assert_array_equal(y2, full.target)


def test_synthetic():
    d = ds.make_synthetic(n=200, n_features=5, n_classes=4, seed=1)
    assert (len(d.train), len(d.val), len(d.test)) == (200, 100, 100)
    assert d.train.X.shape == (200, 5) and d.n_classes == 4 and set(d.train.y.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(d.train.X, ds.make_synthetic(n=200, n_features=5, n_classes=4, seed=1).train.X)
    assert not np.array_equal(d.train.X, ds.make_synthetic(n=200, n_features=5, n_classes=4, seed=2).train.X)
    # learnable: nearest class mean (from train) beats chance clearly on test
    means = np.stack([d.train.X[d.train.y == c].mean(0) for c in range(4)])
    pred = np.argmin(((d.test.X[:, None] - means) ** 2).sum(-1), axis=1)
    assert (pred == d.test.y).mean() > 0.5


def test_load_errors():
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'"):
        ds.load("imagenet")
    with pytest.raises(ConfigError, match="needs a data directory"):
        ds.load("mnist")
    with pytest.raises(ConfigError, match="seed"):
        ds.load("synthetic", seed=-1)


def test_split_length_check():
    with pytest.raises(DataError):
        ds.Split(np.zeros((3, 2)), np.zeros(4, np.int64))
    assert len(ds.Split(np.zeros((3, 2)), np.zeros(3, np.int64))) == 3


# ---------------------------------------------------------------------------
# download

def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_download_good_checksum(tmp_path):
    payload = b"hello mnist" * 1000
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    dest = tmp_path / "data" / "file.gz"
    out = ds.download(src.as_uri(), dest, _sha(payload), chunk_size=1000)
    assert out == dest and dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.gz"]  # no temp files left
    md5 = hashlib.md5(payload).hexdigest()
    dest2 = tmp_path / "data" / "file2.gz"
    ds.download(src.as_uri(), dest2, None, md5=md5)
    assert dest2.read_bytes() == payload


def test_download_bad_checksum_leaves_nothing_and_keeps_existing(tmp_path):
    payload = b"corrupted payload"
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    dest = tmp_path / "data" / "file.gz"
    wrong = "0" * 64
    with pytest.raises(DataError) as e:
        ds.download(src.as_uri(), dest, wrong)
    msg = str(e.value)
    assert str(dest) in msg and wrong in msg and _sha(payload) in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    dest.write_bytes(b"previous good file")
    with pytest.raises(DataError):
        ds.download(src.as_uri(), dest, wrong)
    assert dest.read_bytes() == b"previous good file" and len(list(dest.parent.iterdir())) == 1


def test_download_requires_checksum_and_reports_missing_source(tmp_path):
    with pytest.raises(ConfigError, match="explicit checksum"):
        ds.download((tmp_path / "x").as_uri(), tmp_path / "y", None)
    with pytest.raises(DataError, match="could not download"):
        ds.download((tmp_path / "absent").as_uri(), tmp_path / "out" / "y", "0" * 64)
    assert list((tmp_path / "out").iterdir()) == []


def test_checksum_tables_well_formed():
    for table in (ds.MNIST_FILES, ds.CIFAR10_FILES):
        for name, (url, sha) in table.items():
            assert url.endswith(name)
            assert sha is None or (len(sha) == 64 and int(sha, 16) >= 0)
            assert len(ds.PUBLISHED_MD5[name]) == 32


@pytest.mark.skipif(not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="real MNIST t10k not present")
def test_real_mnist_matches_checksum_table():
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        raw = (REAL_MNIST / name).read_bytes()
        assert _sha(raw) == ds.MNIST_FILES[name][1]
        assert hashlib.md5(raw).hexdigest() == ds.PUBLISHED_MD5[name]


def test_synthetic_images_are_a_pure_function_of_the_arguments():
    d = ds.synthetic_images(n_train=40, n_val=10, n_test=6, n_classes=3, size=8, seed=4)
    assert d.name == "synthetic-images" and d.n_classes == 3 and d.input_shape == (3, 8, 8)
    assert (len(d.train), len(d.val), len(d.test)) == (40, 10, 6)
    assert d.train.X.dtype == np.float64 and d.train.y.dtype == np.int64
    again = ds.synthetic_images(n_train=40, n_val=10, n_test=6, n_classes=3, size=8, seed=4)
    np.testing.assert_array_equal(d.val.X, again.val.X)
    other = ds.synthetic_images(n_train=40, n_val=10, n_test=6, n_classes=3, size=8, seed=5)
    assert not np.array_equal(d.val.X, other.val.X)
    X = np.concatenate([d.train.X, d.val.X, d.test.X])
    # template (unit std) plus N(0, 1) noise, over sqrt 2: std about 1 (3 * 64 * 56 values)
    assert abs(X.std() - 1.0) < 0.1 and abs(X.mean()) < 0.2
