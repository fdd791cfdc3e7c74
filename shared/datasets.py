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

Modules: ``shared.splits`` (the containers and the seeded partition),
``shared.mnist`` (IDX files), ``shared.cifar10`` (python batches and
augmentation), ``shared.download`` (checksummed fetching); their public names
are re-exported here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.cifar10 import (CIFAR10_DIR, CIFAR10_FILES, CIFAR10_TARBALL, CIFAR10_TEST_BATCH,  # noqa: F401
                            CIFAR10_TRAIN_BATCHES, augment_cifar, load_cifar10)
from shared.download import PUBLISHED_MD5, download, download_files  # noqa: F401
from shared.errors import ConfigError
from shared.mnist import MNIST_FILES, load_mnist, load_mnist_test_only, read_idx  # noqa: F401
from shared.splits import (STREAM_SPLIT, STREAM_SYNTH, Dataset, Split, check_seed, partition,  # noqa: F401
                           resolve_size, take)

DATASET_NAMES = ("digits", "mnist", "mnist-t10k", "synthetic", "cifar10")


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
# digits and synthetic

def load_digits(n_train=None, n_val=None, n_test=None, seed=0) -> Dataset:
    """scikit-learn's 8x8 digits: 1,797 images, 64 features in [0, 1], 10 classes.

    Defaults: 1000 train, 400 validation, the remaining 397 test.
    """
    seed = check_seed(seed)
    X, y = digits_arrays()
    n_val_, n_train_ = resolve_size(n_val, 400, "n_val"), resolve_size(n_train, 1000, "n_train")
    n_test_ = resolve_size(n_test, max(len(y) - n_val_ - n_train_, 0), "n_test")
    val, train, test = partition(len(y), (n_val_, n_train_, n_test_), ("n_val", "n_train", "n_test"),
                                  seed, STREAM_SPLIT, "digits")
    return Dataset("digits", take(X, y, train, 16.0), take(X, y, val, 16.0), take(X, y, test, 16.0), 10,
                   {"source": "sklearn.datasets.load_digits", "seed": seed})


def digits_arrays() -> tuple:
    """``(X, y)`` of scikit-learn's digits, as ``sklearn.datasets.load_digits()`` gives them
    (``X`` float64 (1797, 64) with values 0..16, ``y`` int64): read from the ``digits.csv.gz``
    that scikit-learn ships (each row 64 pixels and the label), without importing
    scikit-learn, whose import takes longer than a tiny run's training; through
    ``load_digits`` where that file is not found."""
    import gzip  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415

    found = importlib.util.find_spec("sklearn")
    path = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz" if found and found.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sk_digits  # noqa: PLC0415

        d = sk_digits()
        return d.data, d.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def make_synthetic(n=1000, n_features=20, n_classes=3, seed=0, n_val=None, n_test=None,
                   separation=3.0) -> Dataset:
    """Gaussian clusters: ``n`` training points (``n_val``, ``n_test`` default ``n // 2``).

    Class centres are drawn from N(0, separation^2 / n_features) per feature
    (so centres lie about ``separation`` * sqrt(2) apart); each point is its
    class centre plus N(0, 1) noise; labels are uniform. All three splits come
    from one draw, so they share the distribution.
    """
    seed = check_seed(seed)
    n = resolve_size(n, 1000, "n")
    n_val_, n_test_ = resolve_size(n_val, n // 2, "n_val"), resolve_size(n_test, n // 2, "n_test")
    if n_features < 1 or n_classes < 2:
        raise ConfigError(f"synthetic: need n_features >= 1 and n_classes >= 2, got {n_features}, {n_classes}")
    rng = np.random.default_rng([seed, STREAM_SYNTH])
    total = n + n_val_ + n_test_
    centres = rng.normal(scale=separation / np.sqrt(n_features), size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=total).astype(np.int64)
    X = centres[y] + rng.normal(size=(total, n_features))
    idx = np.split(np.arange(total), [n, n + n_val_])
    return Dataset("synthetic", take(X, y, idx[0]), take(X, y, idx[1]), take(X, y, idx[2]), n_classes,
                   {"source": "gaussian clusters", "seed": seed, "n_features": n_features,
                    "separation": float(separation)})


def synthetic_images(n_train=512, n_val=128, n_test=128, n_classes=10, size=32, seed=0) -> Dataset:
    """A tiny CIFAR-format set: (n, 3, size, size) float64, about zero mean and unit variance.

    Each class has a fixed smooth random template (a sum of a few low-frequency
    sinusoids per channel); an image is its class template plus N(0, 1) noise,
    scaled by 1/sqrt(2). Labels are uniform. A pure function of the arguments.
    """
    rng = np.random.default_rng([int(seed), 11])
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    templates = np.zeros((n_classes, 3, size, size))
    for c in range(n_classes):
        for ch in range(3):
            for _ in range(3):
                fy, fx = rng.uniform(0.5, 3.0, size=2) * 2 * np.pi / size
                ph = rng.uniform(0, 2 * np.pi)
                templates[c, ch] += np.sin(fy * yy + fx * xx + ph)
    templates /= templates.std()
    total = n_train + n_val + n_test
    y = rng.integers(0, n_classes, size=total).astype(np.int64)
    X = (templates[y] + rng.standard_normal((total, 3, size, size))) / np.sqrt(2.0)
    a, b = n_train, n_train + n_val
    # the recorded source keeps the name it had when results were first written with it
    return Dataset("synthetic-images", Split(X[:a], y[:a]), Split(X[a:b], y[a:b]),
                   Split(X[b:], y[b:]), n_classes,
                   {"source": "gpu_ver.train.synthetic_images", "seed": int(seed), "size": int(size)})


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
