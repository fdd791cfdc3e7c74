"""Data containers and the seeded split of a pool of examples.

A pool of ``N`` examples is split by one permutation
``np.random.default_rng([seed, stream]).permutation(N)`` into consecutive
slices (``partition``); every loader in ``shared.datasets`` uses it, with its
own ``stream`` so that the split, the test set, generated data and the
augmentation never share random numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.errors import ConfigError, DataError

# Random streams: the second word of every seed sequence, so that the split,
# the minibatch order and the augmentation never share random numbers.
STREAM_SPLIT, STREAM_TEST, STREAM_SYNTH, STREAM_AUGMENT = 0, 1, 2, 3


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


def check_seed(seed) -> int:
    """``seed`` as an int; ConfigError unless it is a non-negative integer."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def resolve_size(n, default, what) -> int:
    """``n`` (``default`` when None) as an int; ConfigError naming ``what`` unless non-negative."""
    n = default if n is None else n
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {n!r}")
    return int(n)


def partition(pool: int, sizes, names, seed: int, stream: int, source: str) -> list:
    """Disjoint index arrays of the given sizes: consecutive slices of one seeded permutation."""
    if sum(sizes) > pool:
        parts = " + ".join(f"{k}={v}" for k, v in zip(names, sizes))
        raise ConfigError(f"{source}: {parts} = {sum(sizes)} exceeds the {pool} examples available")
    perm = np.random.default_rng([seed, stream]).permutation(pool)
    bounds = np.cumsum([0, *sizes])
    return [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def take(X, y, idx, divide_by=1.0) -> Split:
    """Rows ``idx`` of (X / divide_by, y) as float64 / int64; converts only the selected rows."""
    Xs = np.array(X[idx], dtype=np.float64)
    if divide_by != 1.0:
        Xs /= divide_by
    return Split(Xs, np.asarray(y[idx], dtype=np.int64))
