"""Parameter layout: named blocks of a flat parameter vector.

A model's parameters are a list of arrays (weights and biases per layer). The
hyperparameter containers, the exact-arithmetic storage and the meta-optimisers
see one flat vector ``w``; the layout maps between the two and says which block
each coordinate belongs to, so that a per-block hyperparameter ``h[b]`` can be
expanded to a per-parameter array ``h[block_of[i]]`` and a per-parameter
gradient reduced back to per-block sums.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from shared.errors import HPOError


class LayoutError(HPOError, ValueError):
    """An array or a layout description does not fit the parameter layout (a ``ValueError``,
    so existing handlers still catch it; an ``HPOError``, so a command prints one line)."""


class UnknownBlockError(HPOError, KeyError):
    """A block name that the layout does not have (a ``KeyError``, so existing handlers still
    catch it; an ``HPOError``, so a command prints one line)."""

    def __str__(self) -> str:           # the message itself, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the parameter blocks, in flat order."""

    names: tuple
    shapes: tuple

    def __post_init__(self):
        if len(self.names) != len(self.shapes):
            raise LayoutError(f"layout: {len(self.names)} block names but {len(self.shapes)} shapes; "
                              "give one shape per name")
        if len(set(self.names)) != len(self.names):
            raise LayoutError(f"layout: block names {_repeated(self.names)} appear more than once; "
                              "give every block its own name")
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))
        object.__setattr__(self, "names", tuple(self.names))

    @property
    def sizes(self) -> tuple:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def offsets(self) -> tuple:
        return tuple(int(o) for o in np.concatenate([[0], np.cumsum(self.sizes)[:-1]]))

    @property
    def size(self) -> int:
        """Total number of parameters."""
        return int(sum(self.sizes))

    @property
    def n_blocks(self) -> int:
        return len(self.names)

    def slice(self, name_or_index) -> slice:
        b = self.index(name_or_index)
        o = self.offsets[b]
        return slice(o, o + self.sizes[b])

    def index(self, name_or_index) -> int:
        if isinstance(name_or_index, (int, np.integer)):
            return int(name_or_index)
        try:
            return self.names.index(name_or_index)
        except ValueError:
            raise UnknownBlockError(f"layout has no block {name_or_index!r}; use one of {list(self.names)}") from None

    def block_of(self) -> np.ndarray:
        """Block index of every flat coordinate (int array of length ``size``)."""
        return np.repeat(np.arange(self.n_blocks), self.sizes)

    def flatten(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Concatenate a list of block arrays into one flat vector."""
        if len(arrays) != self.n_blocks:
            raise LayoutError(f"layout: expected {self.n_blocks} block arrays ({_first_names(self.names)}), "
                              f"got {len(arrays)}; pass one array per block, in layout order")
        for a, s, n in zip(arrays, self.shapes, self.names):
            if tuple(np.shape(a)) != s:
                raise LayoutError(f"layout: block {n!r} has shape {np.shape(a)}, expected {s}; the arrays were "
                                  "made for another model")
        return np.concatenate([np.ravel(a) for a in arrays])

    def unflatten(self, w: np.ndarray) -> list:
        """Views of the flat vector ``w`` as a list of block arrays."""
        w = np.asarray(w)
        if w.shape != (self.size,):
            raise LayoutError(f"layout: flat vector has shape {w.shape}, expected ({self.size},) "
                              f"({self.n_blocks} blocks); it was made for another model")
        return [w[o:o + n].reshape(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]

    def expand(self, per_block: np.ndarray) -> np.ndarray:
        """Per-block values ``h[b]`` -> per-parameter array ``h[block_of(i)]``."""
        per_block = np.asarray(per_block, dtype=float)
        if per_block.shape != (self.n_blocks,):
            raise LayoutError(f"layout: per-block values have shape {per_block.shape}, expected "
                              f"({self.n_blocks},), one value per block ({_first_names(self.names)})")
        return np.repeat(per_block, self.sizes)

    def reduce(self, per_param: np.ndarray) -> np.ndarray:
        """Per-parameter array -> per-block sums (the adjoint of ``expand``)."""
        per_param = np.asarray(per_param)
        if per_param.shape[-1] != self.size:
            raise LayoutError(f"layout: per-parameter array has last axis {per_param.shape[-1]}, expected "
                              f"{self.size} (one entry per parameter); it was made for another model")
        return np.add.reduceat(per_param, np.asarray(self.offsets), axis=-1)

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, d: dict) -> "ParamLayout":
        """The layout ``to_json`` wrote; LayoutError naming the missing entry otherwise."""
        try:
            names, shapes = d["names"], d["shapes"]
        except (KeyError, TypeError):
            raise LayoutError(f"layout description {d!r} lacks 'names' or 'shapes'; "
                              "it was not written by ParamLayout.to_json") from None
        return cls(tuple(names), tuple(tuple(s) for s in shapes))


def _repeated(names) -> list:
    return sorted({n for n in names if list(names).count(n) > 1})


def _first_names(names, k=4) -> str:
    shown = ", ".join(map(str, names[:k]))
    return shown + (", ..." if len(names) > k else "")
