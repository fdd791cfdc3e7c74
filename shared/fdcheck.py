"""Finite-difference checks of hypergradients (backend-neutral).

A hypergradient ``g`` of ``F(h)`` is checked along random directions ``u``::

    <g, u>  vs  D_u F = [8 (F(h + eps u) - F(h - eps u)) - (F(h + 2 eps u) - F(h - 2 eps u))] / (12 eps)

(the fourth-order central stencil: truncation error O(eps^4), rounding error
O(macheps |F| / eps)). Directions are scaled by the hyperparameter values, so
``eps`` is a relative step. The relative error is ``|a - n| / max(|a|, |n|)``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from shared.exact_rep import quantised_momentum


def directional_fd(F: Callable[[float], float], eps: float) -> float:
    """Fourth-order central difference of the scalar function F(s) at s = 0."""
    return (8.0 * (F(eps) - F(-eps)) - (F(2 * eps) - F(-2 * eps))) / (12.0 * eps)


def relative_error(a: float, n: float) -> float:
    scale = max(abs(a), abs(n))
    return 0.0 if scale == 0 else abs(a - n) / scale


def check_groups(objective: Callable, hypers, grads: dict, *, seed: int = 0, eps: float = 1e-3,
                 groups=None) -> list:
    """Compare ``grads`` (name -> gradient wrt constrained values) with finite differences of
    ``objective(hypers) -> float`` (plain training without momentum quantisation), one random
    direction per group. Momentum is perturbed around the quantised value the hypergradient
    methods apply. Returns rows (group, analytic, numeric, rel_err).
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
            return objective(base.with_value(name, val + s * u))
        n = directional_fd(F, eps)
        rows.append((name, a, n, relative_error(a, n)))
    return rows


def print_table(rows, tol: float) -> None:
    """The ``check`` commands' table of rows ``(method, group, analytic, numeric, rel_err)``
    (no analytic value: '-'); rows above ``tol`` are flagged FAIL."""
    print(f"{'method':<28}{'group':<12}{'analytic':>16}{'finite diff':>16}{'rel err':>11}")
    for m, g, a, n, e in rows:
        flag = "" if e <= tol else "  FAIL"
        a_s, n_s = (f"{a:>16.8e}", f"{n:>16.8e}") if np.isfinite(a) else (f"{'-':>16}", f"{'-':>16}")
        print(f"{m:<28}{g:<12}{a_s}{n_s}{e:>11.2e}{flag}")


def worst_by_method(rows) -> dict:
    """method -> the largest relative error of its rows (results.json's ``max_rel_err``)."""
    worst = {}
    for m, _, _, _, e in rows:
        worst[m] = max(worst.get(m, 0.0), e)
    return worst
