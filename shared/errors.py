"""Errors that name what went wrong, where, and at which step.

Every user-facing failure of the toolkit is one of these; the command-line
front ends catch ``HPOError``, print its message on one line and exit with
status 2, so no traceback from inside numpy, autograd or Theano reaches a user
for an input problem.
"""
from __future__ import annotations

import numpy as np


class HPOError(Exception):
    """Base class: a problem with the user's input or with the numerics of a run."""


class DataError(HPOError, ValueError):
    """A data file is missing, truncated, corrupt or of the wrong shape."""


class ConfigError(HPOError, ValueError):
    """An option or hyperparameter value is out of its valid range."""


class NonFiniteError(HPOError, FloatingPointError):
    """A loss, gradient or hypergradient became NaN or infinite."""

    def __init__(self, what: str, step, detail: str = ""):
        self.what, self.step = what, step
        super().__init__(f"non-finite {what} at step {step}" + (f": {detail}" if detail else ""))


class DivergedError(NonFiniteError):
    """A loss stayed finite but left any sane range (``check_loss``)."""

    def __init__(self, what: str, step, value: float, bound: float):
        self.what, self.step = what, step
        HPOError.__init__(self, f"{what} diverged at step {step}: {value:.4g} exceeds {bound:g} "
                                "(lower the learning rate)")


class FixedPointOverflow(HPOError, OverflowError):
    """A value left the range of the exact fixed-point representation."""


class ReversalError(HPOError, RuntimeError):
    """The reverse pass did not recover the forward trajectory bit for bit."""


def check_finite(what: str, value, step) -> None:
    """Raise NonFiniteError naming ``what`` and ``step`` if ``value`` has a NaN or inf."""
    a = np.asarray(value)
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise NonFiniteError(what, step, f"{bad} of {np.size(a)} entries are NaN or inf")


# A mean cross-entropy this large means logits about that far apart on the average
# example: the run has diverged (a network at its initial weights is near log(classes)).
LOSS_BOUND = 1e4


def check_loss(what: str, value, step, bound: float = LOSS_BOUND) -> None:
    """NonFiniteError naming ``what`` and ``step`` if the loss ``value`` is NaN, infinite or
    above ``bound`` (a diverged run stops there instead of reporting a huge loss)."""
    check_finite(what, value, step)
    v = float(np.max(value))
    if v > bound:
        raise DivergedError(what, step, v, bound)
