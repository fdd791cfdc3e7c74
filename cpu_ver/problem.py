"""A training problem: model, data, minibatch schedule and meta-objective.

Everything a forward or reverse pass needs to recompute step t: minibatch t is
a pure function of ``(batch_seed, t)`` (``shared.datasets.batch_indices``), the
initial weights are ``w0 = expand(init_scale) * eps(init_seed)``, and the
meta-objective is the mean cross-entropy (no penalty) of the final weights on
the validation split (or, for schedule learning as in Maclaurin et al. 2015,
on the training split).

``schedule(hypers, t)`` turns a hyperparameter container into the per-parameter
arrays that step t applies: learning rate alpha_t, momentum gamma_t (quantised
to n/2^16 by default, the value exact arithmetic applies) and L2 strength.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cpu_ver.models import MLP
from shared.datasets import Dataset, batch_indices
from shared.errors import ConfigError
from shared.exact_rep import momentum_numerator, D
from shared.hyperparams import check_fits


class Step(NamedTuple):
    """Per-parameter hyperparameters applied at one step."""
    alpha: np.ndarray
    gamma: np.ndarray      # the momentum applied (quantised n/d unless quantise=False)
    n: object              # momentum numerator: int when uniform, else int array (None if not quantised)
    l2: np.ndarray


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


def schedule(hypers, t: int, quantise: bool = True) -> Step:
    """Per-parameter (alpha_t, gamma_t, n_t, l2_t) for step t."""
    def at(name):
        return hypers.per_param(name, t if hypers.group(name).shape.startswith("iter") else None)

    alpha, gamma, l2 = at("lr"), at("momentum"), at("l2")
    if not quantise:
        return Step(alpha, gamma, None, l2)
    n = momentum_numerator(gamma)
    if np.all(n == n[0]):
        n = int(n[0])
    return Step(alpha, n / D if np.ndim(n) else np.full_like(gamma, n / D), n, l2)
