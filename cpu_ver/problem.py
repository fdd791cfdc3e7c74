"""A training problem: model, data, minibatch schedule and meta-objective.

Everything a forward or reverse pass needs to recompute step t: minibatch t is
a pure function of ``(batch_seed, t)`` (``shared.datasets.batch_indices``), the
initial weights are ``w0 = expand(init_scale) * eps(init_seed)``, and the
meta-objective is the mean cross-entropy (no penalty) of the final weights on
the validation split (or, for schedule learning as in Maclaurin et al. 2015,
on the training split).

``schedule(hypers, t)`` (``shared.schedule``, re-exported here) turns a
hyperparameter container into the per-parameter arrays that step t applies.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from cpu_ver.models import MLP
from shared.datasets import Dataset, batch_indices
from shared.errors import ConfigError
from shared.hyperparams import check_fits, standard
from shared.schedule import Step, schedule  # noqa: F401 (re-exported: cpu_ver's modules import them here)


@dataclass(frozen=True, eq=False)
class Problem:
    model: MLP
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    n_iters: int
    batch_size: int
    batch_seed: int = 0
    init_seed: int = 0
    meta_objective: str = "val"
    X_test: np.ndarray = None
    y_test: np.ndarray = None

    def __post_init__(self):
        self.model.check_data(self.X_train, self.y_train, "training split")
        self.model.check_data(self.X_val, self.y_val, "validation split")
        if self.n_iters < 1:
            raise ConfigError(f"the number of training steps must be positive, got {self.n_iters}")
        if not 0 < self.batch_size <= len(self.y_train):
            raise ConfigError(f"batch size {self.batch_size} must be in [1, {len(self.y_train)}] "
                              f"(the training split has {len(self.y_train)} examples)")
        if len(self.y_val) == 0:
            raise ConfigError("the validation split is empty")
        if self.meta_objective not in ("val", "train"):
            raise ConfigError(f"meta-objective must be 'val' or 'train', got {self.meta_objective!r}")

    @classmethod
    def from_dataset(cls, model, data: Dataset, **kw) -> "Problem":
        return cls(model, data.train.X, data.train.y, data.val.X, data.val.y,
                   X_test=data.test.X, y_test=data.test.y, **kw)

    @property
    def layout(self):
        return self.model.layout

    def default_init_scales(self) -> np.ndarray:
        return self.model.default_init_scales()

    def init_base(self) -> np.ndarray:
        """The draw the initial scales multiply, w0 = expand(scale) * base (``gpu_ver.problem``'s name)."""
        return self.init_noise()

    def hypers(self, *, lr=0.1, momentum=0.9, l2=1e-4, init_scales=None, groups=("l2",), l2_shape="param",
               lr_shape="scalar", momentum_shape="scalar", l2_on="all"):
        """A ``shared.hyperparams.standard`` container for this problem (as ``gpu_ver.problem.Problem.hypers``)."""
        return standard(self.layout, self.n_iters, lr=lr, momentum=momentum, l2=l2,
                        init_scales=self.default_init_scales() if init_scales is None else init_scales,
                        groups=groups, l2_shape=l2_shape, lr_shape=lr_shape, momentum_shape=momentum_shape,
                        l2_on=l2_on)

    def describe(self) -> dict:
        return {"model": {"model": "mlp", "sizes": list(self.model.sizes), "activation": self.model.activation},
                "n_params": self.layout.size, "n_iters": int(self.n_iters), "batch_size": int(self.batch_size),
                "batch_seed": int(self.batch_seed), "init_seed": int(self.init_seed), "n_train": len(self.y_train),
                "n_val": len(self.y_val), "meta_objective": self.meta_objective}

    def batch(self, t: int):
        idx = batch_indices(len(self.y_train), self.batch_size, self.batch_seed, t)
        return self.X_train[idx], self.y_train[idx]

    def _meta_data(self):
        return (self.X_val, self.y_val) if self.meta_objective == "val" else (self.X_train, self.y_train)

    def objective(self, w) -> float:
        """f(w_T): mean cross-entropy on the meta-objective's split."""
        return self.model.nll(w, *self._meta_data())

    def objective_grad(self, w) -> np.ndarray:
        return self.model.nll_grad(w, *self._meta_data())

    def init_noise(self) -> np.ndarray:
        return self.model.init_noise(self.init_seed)

    def w0(self, hypers) -> np.ndarray:
        """The initial weights; every training run starts here, so ``hypers`` is checked here
        to fit this model and number of steps."""
        check_fits(hypers, self.model.layout, self.n_iters)
        return self.model.layout.expand(hypers.value("init_scale")) * self.init_noise()
