"""A training problem on the Theano backend: model, data, minibatch schedule and
validation objective (the same concept, names and fields as ``cpu_ver.problem``).

Step t uses minibatch ``batch_indices(n_train, batch_size, batch_seed, t)``
(``shared.datasets``), the initial weights are ``w0 = expand(init_scale) * base``
and the meta-objective is the validation loss

    f(w) = sum_c (n_c / N) CE_c(w)

over ``ceil(N / val_chunk)`` consecutive chunks of nearly equal size
(``val_chunks``); for the MLP this is the mean cross-entropy of the whole split,
for DenseNet every batch-norm layer normalises chunk c with chunk c's own batch
statistics (``gpu_ver.drmad``'s docstring).

The hyperparameters' schedule groups reach the device as (rows, blocks) tables
(``schedule_table``): row t (or row 0 when the group does not vary in time) holds
step t's per-block values; ``table_grad`` is its adjoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpu_ver import config
from shared.datasets import Dataset, batch_indices
from shared.errors import ConfigError
from shared.exact_rep import quantised_momentum
from shared.hyperparams import HyperParams, check_fits, standard

theano = config.load()

L2_SHAPES = ("scalar", "block", "unit", "param")
SCHEDULE_SHAPES = ("scalar", "block", "iter", "iter_block")
GROUPS = ("l2", "lr", "momentum", "init_scale")


def floatX() -> str:
    return str(theano.config.floatX)


def val_chunks(n: int, chunk: int) -> list:
    """(start, stop) of ceil(n / chunk) consecutive chunks of nearly equal size."""
    if chunk < 1:
        raise ConfigError(f"validation chunk size must be positive, got {chunk}")
    k = max(1, -(-n // chunk))
    bounds = np.concatenate([[0], np.cumsum([len(a) for a in np.array_split(np.arange(n), k)])])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- problem
@dataclass(frozen=True, eq=False)
class Problem:
    """Model, data splits (already in the model's input form), T, batch and seeds.

    Step t uses minibatch ``batch_indices(n_train, batch_size, batch_seed, t)``
    (as ``cpu_ver.problem.Problem``). Initial weights ``w0 = expand(s) * base``
    with per-block scales ``s`` (the ``init_scale`` group): for the MLP ``base``
    is the fixed standard-normal draw of ``MLPSpec.init_noise(init_seed)`` and
    the default scales are ``MLPSpec.default_init_scales()`` (so w0 equals
    cpu_ver's); for DenseNet ``base = DenseNet.init(init_seed)`` (He-normal
    convolutions, BN scale 1 and shift 0) and the default scales are 1.
    """

    model: object
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    n_iters: int
    batch_size: int
    batch_seed: int = 0
    init_seed: int = 0
    X_test: np.ndarray = None
    y_test: np.ndarray = None
    val_chunk: int = 1000
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        fx = floatX()
        conv = self.is_densenet
        for name in ("X_train", "X_val", "X_test"):
            X = getattr(self, name)
            if X is None:
                continue
            X = np.asarray(X)
            if not conv and X.ndim > 2:
                X = X.reshape(len(X), -1)
            object.__setattr__(self, name, np.ascontiguousarray(X, dtype=fx))
        for name in ("y_train", "y_val", "y_test"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        self.model.check_data(self.X_train, self.y_train, "training split")
        self.model.check_data(self.X_val, self.y_val, "validation split")
        if isinstance(self.n_iters, bool) or not isinstance(self.n_iters, (int, np.integer)) or self.n_iters < 1:
            raise ConfigError(f"the number of training steps must be a positive integer, got {self.n_iters!r}")
        if not 0 < self.batch_size <= len(self.y_train):
            raise ConfigError(f"batch size {self.batch_size} must be in [1, {len(self.y_train)}] "
                              f"(the training split has {len(self.y_train)} examples)")
        if len(self.y_val) == 0:
            raise ConfigError("the validation split is empty")
        if conv and self.val_chunk < 2:
            raise ConfigError("with batch norm every validation chunk needs at least 2 examples")

    @classmethod
    def from_dataset(cls, model, data: Dataset, **kw) -> "Problem":
        return cls(model, data.train.X, data.train.y, data.val.X, data.val.y,
                   X_test=data.test.X, y_test=data.test.y, **kw)

    @property
    def is_densenet(self) -> bool:
        return getattr(self.model, "n_bn", 0) > 0

    @property
    def layout(self):
        return self.model.layout

    def batch(self, t: int):
        idx = batch_indices(len(self.y_train), self.batch_size, self.batch_seed, t)
        return self.X_train[idx], self.y_train[idx]

    def init_base(self) -> np.ndarray:
        if "base" not in self._cache:
            m = self.model
            self._cache["base"] = m.init(self.init_seed) if self.is_densenet else m.init_noise(self.init_seed)
        return self._cache["base"]

    def default_init_scales(self) -> np.ndarray:
        if self.is_densenet:
            return np.ones(self.layout.n_blocks)
        return self.model.default_init_scales()

    def w0(self, hypers: HyperParams) -> np.ndarray:
        return self.layout.expand(hypers.value("init_scale")) * self.init_base()

    def hypers(self, *, lr=0.1, momentum=0.9, l2=1e-4, init_scales=None, groups=("l2",), l2_shape="param",
               lr_shape="scalar", momentum_shape="scalar", l2_on="all") -> HyperParams:
        """A ``shared.hyperparams.standard`` container for this problem (checked shapes)."""
        check_shapes(l2_shape, lr_shape, momentum_shape)
        return standard(self.layout, self.n_iters, lr=lr, momentum=momentum, l2=l2,
                        init_scales=self.default_init_scales() if init_scales is None else init_scales,
                        groups=groups, l2_shape=l2_shape, lr_shape=lr_shape, momentum_shape=momentum_shape,
                        l2_on=l2_on)

    def describe(self) -> dict:
        return {"model": self.model.describe(), "n_params": self.layout.size, "n_iters": int(self.n_iters),
                "batch_size": int(self.batch_size), "batch_seed": int(self.batch_seed),
                "init_seed": int(self.init_seed), "n_train": len(self.y_train), "n_val": len(self.y_val),
                "val_chunk": int(self.val_chunk)}


def check_shapes(l2_shape, lr_shape, momentum_shape) -> None:
    if l2_shape not in L2_SHAPES:
        raise ConfigError(f"L2 shape must be one of {L2_SHAPES} (fixed during training), got {l2_shape!r}")
    for what, s in (("learning-rate", lr_shape), ("momentum", momentum_shape)):
        if s not in SCHEDULE_SHAPES:
            raise ConfigError(f"{what} shape must be one of {SCHEDULE_SHAPES}, got {s!r}")


def schedule_table(hypers: HyperParams, name: str, quantise: bool = False) -> np.ndarray:
    """(rows, blocks) table whose row ``t`` (or row 0 when rows == 1) holds step t's per-block values."""
    g = hypers.group(name)
    h, B = np.asarray(g.value, float), hypers.layout.n_blocks
    if g.shape == "scalar":
        tab = np.full((1, B), float(h))
    elif g.shape == "block":
        tab = h[None, :].copy()
    elif g.shape == "iter":
        tab = np.repeat(h[:, None], B, axis=1)
    elif g.shape == "iter_block":
        tab = h.copy()
    else:
        raise ConfigError(f"hyperparameter {name!r}: shape {g.shape!r} is not a schedule shape {SCHEDULE_SHAPES}")
    return quantised_momentum(tab) if quantise else tab


def table_grad(shape: str, G: np.ndarray) -> np.ndarray:
    """Adjoint of ``schedule_table``: the gradient wrt the group's values from a table gradient."""
    if shape == "scalar":
        return np.asarray(G.sum())
    if shape == "block":
        return G[0].copy()
    if shape == "iter":
        return G.sum(axis=1)
    return G.copy()


def progress_bar(total, desc, enabled):
    """A tqdm bar over the T steps of a pass (off unless ``enabled``)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
