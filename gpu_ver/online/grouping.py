"""Groups of parameters that share one online hyperparameter, symbolic and numpy.

As ``cpu_ver.online.grouping``: ``global`` (one group), ``block`` (one per parameter
block), ``unit`` or ``param``. A ``unit`` of a 2-D weight block is one column (with
the 1-D bias block that follows); for a 4-D convolution kernel (cout, cin, k, k) it is
one output channel; any other block (batch-norm scale/shift) has one group per entry
(per channel). ``expand`` (h[index]) and ``reduce`` (per-group sums, its adjoint) are
symbolic; ``expand_np`` / ``reduce_np`` their numpy twins (logging, FD closures).
"""
from __future__ import annotations

import numpy as np

from gpu_ver import config
from shared.errors import ConfigError
from shared.hyperparams import unit_index
from shared.layout import ParamLayout
from shared.online_spec import GRANULARITIES
from shared.online_spec import GRANULARITY_ALIASES as _GRANULARITY_ALIASES

theano = config.load()
tt = theano.tensor

from gpu_ver import models as M  # noqa: E402


class Grouping:
    """Which hyperparameter each flat coordinate uses (see the module docstring).

    ``index`` (int64, one entry per coordinate) maps coordinates to groups for
    ``block`` and ``unit``; ``expand``/``reduce`` are symbolic, ``expand_np``/
    ``reduce_np`` their numpy twins (logging, finite-difference closures).
    """

    def __init__(self, layout: ParamLayout, kind: str):
        kind = _GRANULARITY_ALIASES.get(kind, kind)
        if kind not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {kind!r}")
        self.kind, self.layout, self.index = kind, layout, None
        if kind == "global":
            self.n = 1
        elif kind == "param":
            self.n = layout.size
        elif kind == "block":
            self.n = layout.n_blocks
            self.index = np.repeat(np.arange(layout.n_blocks), layout.sizes).astype(np.int64)
        else:
            self.index = unit_index(layout, bias_joins_weights=True).astype(np.int64)
            self.n = int(self.index.max()) + 1 if self.index.size else 0

    # symbolic ------------------------------------------------------------------
    def expand(self, h):
        """Per-group values -> what multiplies a flat vector (a scalar for global)."""
        if self.kind == "global":
            return h[0]
        if self.kind == "param":
            return h
        return h[tt.constant(self.index)]

    def reduce(self, x):
        """Per-parameter vector -> per-group sums (the adjoint of ``expand``)."""
        if self.kind == "global":
            return tt.sum(x).reshape((1,))
        if self.kind == "param":
            return x
        if self.kind == "block":
            return M.block_sums(x, self.layout)
        return tt.inc_subtensor(tt.zeros((self.n,), dtype=x.dtype)[tt.constant(self.index)], x)

    # numpy ---------------------------------------------------------------------
    def expand_np(self, h):
        h = np.asarray(h)
        if self.kind == "global":
            return float(h[0])
        return h if self.kind == "param" else h[self.index]

    def reduce_np(self, x):
        if self.kind == "global":
            return np.array([np.sum(x)])
        if self.kind == "param":
            return np.asarray(x)
        return np.bincount(self.index, weights=x, minlength=self.n)


def make_grouping(layout: ParamLayout, kind: str) -> Grouping:
    return Grouping(layout, kind)
