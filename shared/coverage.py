"""Which parameters a hyperparameter group covers (``--l2-on``).

A group such as L2 is usually applied to every parameter (``all``, the default).
DenseNets and most convolutional networks are trained with weight decay on the
convolution and dense weight matrices only, not on batch-norm scales and shifts
nor on biases (``weights``). With coverage ``C``, the effective per-parameter
value used in training is

    a_i = m_i * E_t h        m_i = 1 if parameter i is covered, else 0

so an uncovered parameter trains with L2 fixed at 0. The adjoint is masked the
same way (``E_t^T (m * g)``): the hypergradient entries of a group's values that
reach only uncovered parameters are exactly 0, so a meta-optimiser (SGD, Adam,
sign) never moves them; they keep the value they were given, which training
never uses. Entries of a shape rule that mix covered and uncovered parameters
(``scalar``, ``iter``) see only the covered ones.

Weight blocks are recognised by their shape: a block of two or more dimensions
(a dense ``(fan_in, fan_out)`` matrix, a convolution kernel ``(out, in, kh, kw)``)
is a weight; a 1-D block (bias, batch-norm scale or shift) or a 0-D one is not.
"""
from __future__ import annotations

import numpy as np

from shared.errors import ConfigError

COVERAGES = ("all", "weights")
DEFAULT = "all"


def check_coverage(kind, option="--l2-on") -> str:
    """``kind`` if it is one of ``COVERAGES``, else ConfigError naming ``option``."""
    if kind not in COVERAGES:
        raise ConfigError(f"{option} must be one of {', '.join(COVERAGES)}; got {kind!r}")
    return kind


def is_weight(shape) -> bool:
    """Whether a block of this shape is a weight matrix or convolution kernel (ndim >= 2)."""
    return len(tuple(shape)) >= 2


def covered_blocks(layout, kind) -> tuple:
    """Per block of ``layout``: whether coverage ``kind`` includes it."""
    check_coverage(kind)
    return tuple(kind == "all" or is_weight(s) for s in layout.shapes)


def mask(layout, kind):
    """The (layout.size,) 0/1 float mask ``m`` of coverage ``kind``; None for ``all`` (no mask)."""
    if check_coverage(kind) == "all":
        return None
    return np.repeat(np.asarray(covered_blocks(layout, kind), dtype=float), layout.sizes)


def apply(values, layout, kind):
    """``values`` (a number or a (layout.size,) array) times the mask of ``kind``: a per-parameter
    array with 0 on the uncovered parameters; ``values`` unchanged for ``all``."""
    m = mask(layout, kind)
    if m is None:
        return values
    return np.broadcast_to(np.asarray(values, dtype=float), (layout.size,)) * m
