"""Groups of parameters that share one online hyperparameter (numpy).

``global`` (one group), ``block`` (one per parameter block W0, b0, W1, ...; "per
layer"), ``unit`` (the incoming weights and bias of one unit) or ``param`` (one per
parameter). A per-group vector h multiplies a flat parameter vector through
``expand`` (h[index]), and a per-parameter array x comes back to per-group sums
through ``reduce`` (its adjoint: sum over the coordinates of each group).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from shared.errors import ConfigError
from shared.hyperparams import unit_index
from shared.layout import ParamLayout
from shared.online_spec import GRANULARITIES
from shared.online_spec import GRANULARITY_ALIASES as _GRANULARITY_ALIASES


class Grouping(NamedTuple):
    """Which hyperparameter each flat coordinate uses.

    ``kind`` is one of ``GRANULARITIES``; ``index`` (int array, length n) maps
    every coordinate to its group for ``unit``; ``n`` is the number of groups.
    """
    kind: str
    n: int
    layout: ParamLayout
    index: Optional[np.ndarray] = None


def make_grouping(layout: ParamLayout, kind: str) -> Grouping:
    """Groups for ``kind``: global (1), block (one per block), unit, param.

    ``unit``: ``shared.hyperparams.unit_index`` with the bias joining its weights: a 2-D
    block (fan_in, fan_out) gives one group per column (unit) and the 1-D block of
    fan_out entries that follows (its bias) joins them.
    """
    kind = _GRANULARITY_ALIASES.get(kind, kind)
    if kind == "global":
        return Grouping("global", 1, layout)
    if kind == "block":
        return Grouping("block", layout.n_blocks, layout)
    if kind == "param":
        return Grouping("param", layout.size, layout)
    if kind == "unit":
        index = unit_index(layout, bias_joins_weights=True).astype(np.int64)
        return Grouping("unit", int(index.max()) + 1 if index.size else 0, layout, index)
    raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {kind!r}")


def expand(gr: Grouping, h):
    """Per-group values -> what multiplies a flat vector (a float for global)."""
    if gr.kind == "global":
        return float(h[0])
    if gr.kind == "block":
        return gr.layout.expand(h)
    if gr.kind == "unit":
        return h[gr.index]
    return h


def reduce(gr: Grouping, x) -> np.ndarray:
    """Per-parameter array -> per-group sums (the adjoint of ``expand``)."""
    if gr.kind == "global":
        return np.array([np.sum(x)])
    if gr.kind == "block":
        return gr.layout.reduce(x)
    if gr.kind == "unit":
        return np.bincount(gr.index, weights=x, minlength=gr.n)
    return x


def reduce_dot(gr: Grouping, a, b) -> np.ndarray:
    """Per-group sums of a * b (a dot product for ``global``)."""
    if gr.kind == "global":
        return np.array([np.dot(a, b)])
    return reduce(gr, a * b)
