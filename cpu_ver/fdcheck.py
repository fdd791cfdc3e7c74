"""Finite-difference checks of this backend's hypergradients (the stencil and the
comparison are ``shared.fdcheck``).

``check_problem`` builds the small float64 problem that ``python -m cpu_ver
check`` uses (deterministic given a seed) and ``check_methods`` runs every
hypergradient method of this backend over it.
"""
from __future__ import annotations

import numpy as np

from cpu_ver import drmad, reversible, sgd
from cpu_ver.models import MLP
from cpu_ver.problem import Problem
from shared.datasets import load
from shared.fdcheck import check_groups as _check_groups
from shared.hyperparams import standard


def check_groups(problem: Problem, hypers, grads: dict, *, seed: int = 0, eps: float = 1e-3,
                 groups=None) -> list:
    """``shared.fdcheck.check_groups`` with plain float training of ``problem`` as the objective."""
    return _check_groups(lambda h: sgd.objective_after_training(problem, h, quantise=False),
                         hypers, grads, seed=seed, eps=eps, groups=groups)


def check_problem(seed: int = 0, T: int = 50) -> tuple:
    """The small float64 check problem: digits, MLP 64-20-10 (tanh), T steps, batch 50,
    per-parameter L2, per-iteration x per-block learning rates and momenta, per-block scales."""
    data = load("digits", n_train=300, n_val=200, n_test=100, seed=seed)
    model = MLP((64, 20, 10), "tanh")
    problem = Problem.from_dataset(model, data, n_iters=T, batch_size=50, batch_seed=seed, init_seed=seed)
    rng = np.random.default_rng(seed + 1)
    nb = model.layout.n_blocks
    hypers = standard(model.layout, T, lr=np.exp(rng.uniform(-1.5, -0.5, (T, nb))),
                      momentum=rng.uniform(0.5, 0.9, (T, nb)),
                      l2=np.exp(rng.uniform(-8, -5, model.layout.size)),
                      init_scales=model.default_init_scales())
    return problem, hypers


def check_methods(seed: int = 0, T: int = 50, eps: float = 1e-3) -> dict:
    """method -> rows: exact reversal, DrMAD with K = T (both per group)."""
    problem, hypers = check_problem(seed, T)
    out = {}
    ex = reversible.hypergradient(problem, hypers)
    out["exact"] = check_groups(problem, hypers, ex.grads, seed=seed, eps=eps)
    dm = drmad.hypergradient(problem, hypers, K=T)
    out["drmad_K=T"] = check_groups(problem, hypers, dm.grads, seed=seed, eps=eps)
    return out
