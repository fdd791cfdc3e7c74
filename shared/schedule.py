"""The per-parameter hyperparameters that training step t applies (both backends).

``schedule(hypers, t)`` expands a hyperparameter container into per-parameter
arrays for step t: the learning rate alpha_t, the momentum gamma_t (quantised to
n/2^16 by default, the value exact arithmetic applies; docs/ALGORITHMS.md eq. 15)
with its numerator n, and the L2 strength.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from shared.exact_rep import D, momentum_numerator


class Step(NamedTuple):
    """Per-parameter hyperparameters applied at one step."""
    alpha: np.ndarray
    gamma: np.ndarray      # the momentum applied (quantised n/d unless quantise=False)
    n: object              # momentum numerator: int when uniform, else int array (None if not quantised)
    l2: np.ndarray


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
