"""Finite-difference checks of hypergradients.

A hypergradient ``g`` of ``F(h)`` is checked along random directions ``u``::

    <g, u>  vs  D_u F = [8 (F(h + eps u) - F(h - eps u)) - (F(h + 2 eps u) - F(h - 2 eps u))] / (12 eps)

(the fourth-order central stencil: truncation error O(eps^4), rounding error
O(macheps |F| / eps)). Directions are scaled by the hyperparameter values, so
``eps`` is a relative step. The relative error is ``|a - n| / max(|a|, |n|)``.

``check_problem`` builds the small float64 problem that ``python -m cpu_ver
check`` uses (deterministic given a seed) and ``check_methods`` runs every
hypergradient method of this backend over it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from cpu_ver import drmad, reversible, sgd
from cpu_ver.models import MLP
from cpu_ver.problem import Problem
from shared.datasets import load
from shared.exact_rep import quantised_momentum
from shared.hyperparams import standard


def directional_fd(F: Callable[[float], float], eps: float) -> float:
    """Fourth-order central difference of the scalar function F(s) at s = 0."""
    return (8.0 * (F(eps) - F(-eps)) - (F(2 * eps) - F(-2 * eps))) / (12.0 * eps)


def relative_error(a: float, n: float) -> float:
    scale = max(abs(a), abs(n))
    return 0.0 if scale == 0 else abs(a - n) / scale


def check_groups(problem: Problem, hypers, grads: dict, *, seed: int = 0, eps: float = 1e-3,
                 groups=None) -> list:
    """Compare ``grads`` (name -> gradient wrt constrained values) with finite differences of
    plain float training, one random direction per group. Momentum is perturbed around the
    quantised value the exact methods apply. Returns rows (group, analytic, numeric, rel_err).
    """
    rng = np.random.default_rng(seed)
    base = hypers.with_value("momentum", quantised_momentum(hypers.value("momentum")))
    rows = []
    for name in (groups or grads):
        if name not in grads:
            continue
        val = base.value(name)
        u = rng.standard_normal(val.shape) * val
        a = float(np.sum(grads[name] * u))

        def F(s, name=name, u=u, val=val):
            return sgd.objective_after_training(problem, base.with_value(name, val + s * u), quantise=False)
        n = directional_fd(F, eps)
        rows.append((name, a, n, relative_error(a, n)))
    return rows


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
