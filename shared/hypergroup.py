"""One hyperparameter group: the transforms between free and constrained
coordinates, and a validated, read-only group of free values.

    log       h = exp(s)            s = log h              dh/ds = h
    logit     h = sigmoid(s)        s = log h - log(1-h)   dh/ds = h (1 - h)
    identity  h = s                 s = h                  dh/ds = 1

(``shared.hyperparams`` explains the shape rules and holds the container.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError

TRANSFORMS = ("log", "logit", "identity")
SHAPES = ("scalar", "block", "unit", "param", "iter", "iter_block")
ITER_SHAPES = ("iter", "iter_block")


def sigmoid(s) -> np.ndarray:
    """sigmoid(s) = 1 / (1 + exp(-s)), evaluated with exp(-|s|) so it never overflows."""
    s = np.asarray(s, dtype=float)
    with np.errstate(under="ignore"):
        e = np.exp(-np.abs(s))
    return np.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def logit(h) -> np.ndarray:
    """logit(h) = log h - log(1 - h), the inverse of ``sigmoid`` on (0, 1)."""
    h = np.asarray(h, dtype=float)
    return np.log(h) - np.log1p(-h)


def to_constrained(transform: str, free) -> np.ndarray:
    """h = exp(s) | sigmoid(s) | s."""
    free = np.asarray(free, dtype=float)
    if transform == "log":
        with np.errstate(over="ignore", under="ignore"):
            return np.exp(free)
    if transform == "logit":
        return sigmoid(free)
    if transform == "identity":
        return free.copy()
    raise ConfigError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")


def to_free(transform: str, value) -> np.ndarray:
    """s = log h | logit h | h (the caller has checked the domain)."""
    value = np.asarray(value, dtype=float)
    if transform == "log":
        return np.log(value)
    if transform == "logit":
        return logit(value)
    if transform == "identity":
        return value.copy()
    raise ConfigError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")


def dconstrained_dfree(transform: str, value) -> np.ndarray:
    """dh/ds from the constrained value h: h | h (1 - h) | 1."""
    value = np.asarray(value, dtype=float)
    if transform == "log":
        return value
    if transform == "logit":
        return value * (1.0 - value)
    if transform == "identity":
        return np.ones_like(value)
    raise ConfigError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")


def first_bad(a: np.ndarray, bad: np.ndarray) -> str:
    """'got V at index I (k of n entries ...)' for the first True entry of ``bad``."""
    idx = tuple(int(i) for i in np.argwhere(bad)[0]) if a.ndim else ()
    v = float(a[idx]) if a.ndim else float(a)
    where = f" at index {idx[0] if len(idx) == 1 else idx}" if a.ndim else ""
    count = f" ({int(np.count_nonzero(bad))} of {a.size} entries)" if a.size > 1 else ""
    return f"got {v!r}{where}{count}"


def check_finite_values(name: str, what: str, a: np.ndarray) -> None:
    """ConfigError naming group ``name`` and the first non-finite entry of ``a`` (its ``what``)."""
    bad = ~np.isfinite(a)
    if np.any(bad):
        raise ConfigError(f"hyperparameter {name!r}: non-finite {what}; {first_bad(a, bad)}")


def check_domain(name: str, transform: str, value: np.ndarray) -> None:
    """Constrained values must be finite and inside the transform's range."""
    check_finite_values(name, "value", value)
    if transform == "log":
        bad = ~(value > 0)
        if np.any(bad):
            raise ConfigError(f"hyperparameter {name!r} (transform 'log') must be > 0; "
                              f"{first_bad(value, bad)}")
    elif transform == "logit":
        bad = ~((value > 0) & (value < 1))
        if np.any(bad):
            raise ConfigError(f"hyperparameter {name!r} (transform 'logit') must lie strictly "
                              f"in (0, 1); {first_bad(value, bad)}")


def as_shape(name: str, what: str, a, shape: str, want: tuple) -> np.ndarray:
    """Float array of shape ``want``; a scalar is broadcast."""
    try:
        arr = np.asarray(a, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"hyperparameter {name!r}: {what} is not numeric: {a!r}") from None
    if arr.ndim == 0:
        return np.full(want, float(arr))
    if arr.shape != want:
        raise ConfigError(f"hyperparameter {name!r}: shape {shape!r} expects an array of shape "
                          f"{want} (or a scalar); got {what} of shape {arr.shape}")
    return arr.copy()


def readonly(a: np.ndarray) -> np.ndarray:
    """``a`` itself, made read-only."""
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class HyperGroup:
    """One named group: free values ``free`` (read-only), a transform and a shape rule.

    Construction checks the transform and shape names, that ``free`` is finite
    and that the constrained value is inside its range (exp(s) > 0 and finite,
    0 < sigmoid(s) < 1), so that a saturated transform is reported, not used.
    The shape against a layout is checked by ``HyperParams``.
    """

    name: str
    transform: str
    shape: str
    free: np.ndarray

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"hyperparameter group name must be a non-empty string; got {self.name!r}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"hyperparameter {self.name!r}: unknown transform {self.transform!r}; "
                              f"expected one of {TRANSFORMS}")
        if self.shape not in SHAPES:
            raise ConfigError(f"hyperparameter {self.name!r}: unknown shape {self.shape!r}; "
                              f"expected one of {SHAPES}")
        free = np.array(self.free, dtype=float)
        check_finite_values(self.name, "free value", free)
        value = to_constrained(self.transform, free)
        check_domain(self.name, self.transform, value)
        object.__setattr__(self, "free", readonly(free))
        object.__setattr__(self, "_value", readonly(value))

    @property
    def value(self) -> np.ndarray:
        """Constrained values h = transform(free), same shape as ``free`` (read-only)."""
        return self._value

    @property
    def count(self) -> int:
        return int(self.free.size)

    def __repr__(self):
        return f"HyperGroup({self.name!r}, {self.transform!r}, {self.shape!r}, shape={self.free.shape})"
