"""Hyperparameter containers: named groups in free coordinates.

A hyperparameter group is stored in *free* (unconstrained) coordinates ``s``
and used in *constrained* coordinates ``h`` through a transform::

    log       h = exp(s)            s = log h              dh/ds = h
    logit     h = sigmoid(s)        s = log h - log(1-h)   dh/ds = h (1 - h)
    identity  h = s                 s = h                  dh/ds = 1

Meta-optimisers move ``s``; training uses ``h``. The chain rule from a gradient
with respect to ``h`` to one with respect to ``s`` is applied once, here
(``HyperParams.chain``), never inside the hypergradient recursions.

Each group has a *shape rule* that fixes the shape of its free array, for a
parameter layout with ``P = layout.size`` parameters in ``B = layout.n_blocks``
blocks and ``T = n_iters`` training steps::

    scalar      ()        one value for every parameter and step
    block       (B,)      one value per parameter block (W0, b0, W1, ...)
    unit        (U,)      one value per output unit of each block (see below)
    param       (P,)      one value per parameter
    iter        (T,)      one value per step
    iter_block  (T, B)    one value per step and block

Training needs full per-parameter arrays. ``per_param(name, t)`` is the linear
expansion ``E_t``: the per-parameter array ``a`` at step ``t`` with

    scalar: a_i = h          block: a_i = h[b(i)]        param: a_i = h_i
    iter:   a_i = h[t]       iter_block: a_i = h[t, b(i)]

where ``b(i)`` is the block of parameter ``i`` (and ``unit: a_i = h[u(i)]``, ``u(i)``
its unit). ``reduce(name, g, t)`` is its
adjoint ``E_t^T``: it turns a per-parameter gradient ``g = dF/da`` into the
gradient with respect to the group's constrained value (sums over each block,
over all parameters, or the identity; placed in row ``t`` for the iteration
shapes), so that ``<reduce(g), h> == <g, per_param(h)>`` for every ``h``.

Units (``unit_index``). Every block is cut into its output units, block by
block in layout order, and units never span two blocks:

    ndim 2, (fan_in, fan_out) dense weights   a unit is a COLUMN: fan_out units,
                                              unit j = the weights into output j
    ndim 1, (n,) bias / BN scale or shift     a unit is an ENTRY: n units
    ndim >= 3, (out, in, kh, kw) convolution  a unit is an OUTPUT CHANNEL (index on
                                              axis 0): out units
    ndim 0                                    one unit

so ``U = sum over blocks of (shape[-1] if ndim 2, else shape[0] if ndim >= 1,
else 1)``. A layer's bias entries are units of the bias block, separate from
the weight columns (per-unit L2 as in the DrMAD experiments: one strength per
unit's incoming weights, and one per bias). A block with zero-sized axes
contributes its units (possibly with no parameters: they reduce to 0).

Coverage (``cover``, ``shared.coverage``). A group may cover only some parameters:
``cover = {"l2": "weights"}`` (the ``--l2-on weights`` option) multiplies its
expansion by the 0/1 mask ``m`` of the dense and convolution weight blocks,
``a = m * E_t h``, and its adjoint masks the gradient first, ``E_t^T (m * g)``. The
uncovered parameters train with the value 0, and the group's entries that reach
only them get a hypergradient of exactly 0 (they stay in the free vector, so
shapes and files do not change with the coverage). A group not named in
``cover`` covers every parameter ('all').

The container is immutable: every method that changes something returns a new
``HyperParams``; constrained values returned by ``value`` are read-only arrays.

Tuned groups. A container always holds every group a training run needs (for
``standard``: ``l2``, ``lr``, ``momentum``, ``init_scale``), but a
meta-optimisation run may tune only some of them. ``HyperParams.tuned`` names
those (default: all groups). ``flatten``, ``unflatten``, ``flatten_grads`` and
``size`` see ONLY the tuned groups, concatenated in container order (the order
of ``groups``, not the order in which ``tuned`` was written); untuned groups
keep their values through ``unflatten``. ``total_size`` counts every group.

Modules: ``shared.hypergroup`` (the transforms and one validated group),
``shared.hypers_file`` (the ``save``/``load`` file pair), ``shared.run_hypers``
(the command line's ``standard`` container and ``--hypers-from``); this one
holds the container ``HyperParams``, the shape rules and the units.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from shared import hypers_file
from shared.coverage import DEFAULT as COVER_ALL
from shared.coverage import check_coverage
from shared.coverage import mask as coverage_mask
from shared.errors import ConfigError
from shared.hypergroup import (ITER_SHAPES, SHAPES, TRANSFORMS, HyperGroup, as_shape, check_domain,  # noqa: F401
                               dconstrained_dfree, logit, readonly, sigmoid, to_constrained, to_free)
from shared.hypers_file import FILE_FORMAT, FILE_VERSION  # noqa: F401
from shared.layout import ParamLayout

STANDARD_GROUPS = ("l2", "lr", "momentum", "init_scale")


def units_of_block(shape) -> int:
    """Number of output units of a block of this shape (module docstring, "Units")."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1
    return shape[-1] if len(shape) == 2 else shape[0]


def n_units(layout: ParamLayout) -> int:
    """U: the total number of output units of a layout."""
    return int(sum(units_of_block(s) for s in layout.shapes))


def unit_index(layout: ParamLayout, bias_joins_weights: bool = False) -> np.ndarray:
    """Unit ``u(i)`` of every flat coordinate (int array of length ``layout.size``).

    The one definition of a "unit" for both backends. Units are numbered block by
    block in layout order; inside a block: the column for a 2-D block (flat C order,
    so ``i % fan_out``), the entry for a 1-D block, the index on axis 0 for a block
    of 3 or more dimensions (a convolution kernel's output channel), one unit for a
    0-D block. ``bias_joins_weights`` (the online methods' ``unit`` groups: the
    incoming weights and bias of one unit): a 1-D block of ``fan_out`` entries right
    after a 2-D block (its bias) takes that block's column units instead of new ones.
    """
    parts, u0, last = [], 0, None        # last: (first unit, fan_out) of the 2-D block just before
    for shape in layout.shapes:
        shape = tuple(int(d) for d in shape)
        size = int(np.prod(shape, dtype=np.int64))
        if bias_joins_weights and len(shape) == 1 and last is not None and shape[0] == last[1]:
            parts.append(np.arange(last[0], last[0] + shape[0], dtype=np.intp))
            last = None
            continue
        if len(shape) == 0:
            idx = np.zeros(size, dtype=np.intp)
        elif len(shape) == 2:
            idx = np.tile(np.arange(shape[1], dtype=np.intp), shape[0])
        else:
            idx = np.repeat(np.arange(shape[0], dtype=np.intp), size // shape[0] if shape[0] else 0)
        last = (u0, shape[1]) if len(shape) == 2 else None
        parts.append(idx + u0)
        u0 += units_of_block(shape)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.intp)


def expected_shape(shape: str, layout: ParamLayout, n_iters: int) -> tuple:
    """Shape of the free array for a shape rule (see the module docstring)."""
    if shape == "scalar":
        return ()
    if shape == "block":
        return (layout.n_blocks,)
    if shape == "unit":
        return (n_units(layout),)
    if shape == "param":
        return (layout.size,)
    if shape == "iter":
        return (int(n_iters),)
    if shape == "iter_block":
        return (int(n_iters), layout.n_blocks)
    raise ConfigError(f"unknown hyperparameter shape {shape!r}; expected one of {SHAPES}")


# --- the container --------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class HyperParams:
    """Named hyperparameter groups for one parameter layout and ``n_iters`` training steps.

    ``tuned`` names the groups that ``flatten``/``unflatten``/``flatten_grads``/
    ``size`` see (default ``None``: all groups); it is stored in container order.
    """

    layout: ParamLayout
    n_iters: int
    groups: tuple
    tuned: Optional[tuple] = None
    cover: Optional[Mapping] = None

    def __post_init__(self):
        if isinstance(self.n_iters, bool) or not isinstance(self.n_iters, (int, np.integer)) or self.n_iters < 0:
            raise ConfigError(f"n_iters must be a non-negative integer; got {self.n_iters!r}")
        object.__setattr__(self, "n_iters", int(self.n_iters))
        groups = tuple(self.groups)
        for g in groups:
            if not isinstance(g, HyperGroup):
                raise ConfigError(f"groups must be HyperGroup objects; got {type(g).__name__}")
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate hyperparameter group names in {names}")
        for g in groups:
            if g.shape in ITER_SHAPES and self.n_iters < 1:
                raise ConfigError(f"hyperparameter {g.name!r}: shape {g.shape!r} needs n_iters >= 1; "
                                  f"got n_iters={self.n_iters}")
            want = expected_shape(g.shape, self.layout, self.n_iters)
            if g.free.shape != want:
                raise ConfigError(f"hyperparameter {g.name!r}: shape {g.shape!r} expects an array of "
                                  f"shape {want}; got shape {g.free.shape}")
        tuned = tuple(names) if self.tuned is None else tuple(self.tuned)
        unknown = [n for n in tuned if n not in names]
        if unknown:
            raise ConfigError(f"tuned groups {unknown} are not hyperparameter groups; groups are {names}")
        cover = {n: check_coverage(k, f"coverage of {n!r}") for n, k in dict(self.cover or {}).items()
                 if k != COVER_ALL}
        unknown = [n for n in cover if n not in names]
        if unknown:
            raise ConfigError(f"coverage given for {unknown}, which are not hyperparameter groups; groups are {names}")
        object.__setattr__(self, "cover", cover)
        object.__setattr__(self, "_masks", {n: readonly(coverage_mask(self.layout, k)) for n, k in cover.items()})
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "tuned", tuple(n for n in names if n in tuned))
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names)})
        # cached once: ParamLayout recomputes sizes/offsets on every access
        sizes = np.asarray(self.layout.sizes, dtype=np.intp)
        object.__setattr__(self, "_block_of", readonly(np.repeat(np.arange(len(sizes)), sizes)))
        object.__setattr__(self, "_offsets", readonly(np.asarray(self.layout.offsets, dtype=np.intp)))
        object.__setattr__(self, "_all_blocks_nonempty", bool(np.all(sizes > 0)))
        object.__setattr__(self, "_n_params", int(sizes.sum()))
        object.__setattr__(self, "_spans", tuple((int(o), int(n)) for o, n in zip(self._offsets, sizes)))
        object.__setattr__(self, "_unit_of", None)       # built on first use (unit shape only)

    def _units(self) -> np.ndarray:
        """``unit_index(layout)``, cached (read-only)."""
        if self._unit_of is None:
            object.__setattr__(self, "_unit_of", readonly(unit_index(self.layout)))
        return self._unit_of

    def _reduce_units(self, per_param: np.ndarray) -> np.ndarray:
        """Per-unit sums of a per-parameter vector (adjoint of h -> h[u(i)])."""
        return np.bincount(self._units(), weights=per_param, minlength=n_units(self.layout)).astype(float)

    def _expand(self, per_block: np.ndarray) -> np.ndarray:
        """h[..., b] -> h[..., b(i)] (same as layout.expand, on the last axis).

        Filled block by block with slice assignments: about 2x faster than
        fancy indexing and 8x faster than np.repeat for an MLP layout.
        """
        out = np.empty(per_block.shape[:-1] + (self._n_params,))
        for b, (o, n) in enumerate(self._spans):
            out[..., o:o + n] = per_block[..., b, None]
        return out

    def _reduce(self, per_param: np.ndarray) -> np.ndarray:
        """Per-block sums over the last axis (same as layout.reduce; empty blocks give 0)."""
        if self._all_blocks_nonempty:
            return np.add.reduceat(per_param, self._offsets, axis=-1)
        B = self.layout.n_blocks
        rows = per_param.reshape(-1, per_param.shape[-1])
        out = np.stack([np.bincount(self._block_of, weights=r, minlength=B) for r in rows])
        return out.reshape(per_param.shape[:-1] + (B,))

    # --- construction ---------------------------------------------------------
    @classmethod
    def from_values(cls, layout: ParamLayout, n_iters: int, specs: Mapping, tuned=None,
                    cover=None) -> "HyperParams":
        """Build from constrained values: ``specs[name] = (value, transform, shape)``.

        ``value`` is a scalar (broadcast to the shape) or an array of the group's
        shape. Checks: finite, ``log`` values > 0, ``logit`` values in (0, 1),
        shape matches; errors name the group, the expected shape and the value.
        """
        groups = []
        for name, spec in specs.items():
            if not isinstance(spec, (tuple, list)) or len(spec) != 3:
                raise ConfigError(f"hyperparameter {name!r}: spec must be (value, transform, shape); got {spec!r}")
            value, transform, shape = spec
            if transform not in TRANSFORMS:
                raise ConfigError(f"hyperparameter {name!r}: unknown transform {transform!r}; "
                                  f"expected one of {TRANSFORMS}")
            if shape in ITER_SHAPES and (not isinstance(n_iters, (int, np.integer)) or n_iters < 1):
                raise ConfigError(f"hyperparameter {name!r}: shape {shape!r} needs n_iters >= 1; "
                                  f"got n_iters={n_iters!r}")
            want = expected_shape(shape, layout, n_iters) if shape in SHAPES else None
            if want is None:
                raise ConfigError(f"hyperparameter {name!r}: unknown shape {shape!r}; expected one of {SHAPES}")
            h = as_shape(name, "value", value, shape, want)
            check_domain(name, transform, h)
            with np.errstate(divide="ignore"):
                groups.append(HyperGroup(name, transform, shape, to_free(transform, h)))
        return cls(layout, n_iters, tuple(groups), tuned, cover)

    def with_free(self, name: str, free) -> "HyperParams":
        """New container with group ``name``'s free values replaced (scalar broadcast)."""
        g = self.group(name)
        arr = as_shape(name, "free value", free, g.shape, g.free.shape)
        return self._replace(HyperGroup(name, g.transform, g.shape, arr))

    def with_value(self, name: str, value) -> "HyperParams":
        """New container with group ``name``'s constrained values replaced (validated)."""
        g = self.group(name)
        h = as_shape(name, "value", value, g.shape, g.free.shape)
        check_domain(name, g.transform, h)
        return self._replace(HyperGroup(name, g.transform, g.shape, to_free(g.transform, h)))

    def with_tuned(self, names) -> "HyperParams":
        """New container tuning exactly ``names`` (stored in container order)."""
        return HyperParams(self.layout, self.n_iters, self.groups, tuple(names), self.cover)

    def with_cover(self, cover) -> "HyperParams":
        """New container with coverage ``cover`` (group name -> 'all' | 'weights'; absent: all)."""
        return HyperParams(self.layout, self.n_iters, self.groups, self.tuned, cover)

    def coverage(self, name: str) -> str:
        """Which parameters group ``name`` covers: 'all' or 'weights' (``shared.coverage``)."""
        self.group(name)
        return self.cover.get(name, COVER_ALL)

    def _replace(self, new: HyperGroup) -> "HyperParams":
        groups = tuple(new if g.name == new.name else g for g in self.groups)
        return HyperParams(self.layout, self.n_iters, groups, self.tuned, self.cover)

    # --- access ---------------------------------------------------------------
    @property
    def names(self) -> tuple:
        return tuple(g.name for g in self.groups)

    def __contains__(self, name) -> bool:
        return name in self._index

    def group(self, name: str) -> HyperGroup:
        try:
            return self.groups[self._index[name]]
        except (KeyError, TypeError):
            raise ConfigError(f"no hyperparameter group {name!r}; groups are {list(self.names)}") from None

    def value(self, name: str) -> np.ndarray:
        """Constrained value of group ``name``, in the group's own shape (read-only)."""
        return self.group(name).value

    def free(self, name: str) -> np.ndarray:
        """Free value of group ``name``, in the group's own shape (read-only)."""
        return self.group(name).free

    @property
    def size(self) -> int:
        """Number of TUNED free hyperparameters (= len(flatten()))."""
        return int(sum(self.group(n).count for n in self.tuned))

    @property
    def total_size(self) -> int:
        """Number of free hyperparameters in all groups, tuned or not."""
        return int(sum(g.count for g in self.groups))

    def _check_t(self, g: HyperGroup, t) -> Optional[int]:
        if t is None:
            if g.shape in ITER_SHAPES:
                raise ConfigError(f"hyperparameter {g.name!r} has shape {g.shape!r}: an iteration t "
                                  f"in [0, {self.n_iters}) is required")
            return None
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.n_iters:
            raise ConfigError(f"hyperparameter {g.name!r}: iteration t must be an integer in "
                              f"[0, {self.n_iters}); got {t!r}")
        return int(t)

    # --- expansion and its adjoint -------------------------------------------------
    def per_param(self, name: str, t=None) -> np.ndarray:
        """Full (layout.size,) constrained array a = E_t h at iteration ``t`` (a new array).

        scalar: a_i = h; block: a_i = h[b(i)]; param: a_i = h_i; iter: a_i = h[t];
        iter_block: a_i = h[t, b(i)]. ``t`` is required for the iteration shapes
        and, when given, must lie in [0, n_iters).
        """
        a = self._per_param(name, t)
        m = self._masks.get(name)
        return a if m is None else a * m

    def _per_param(self, name, t):
        g = self.group(name)
        t = self._check_t(g, t)
        h, P = g.value, self._n_params
        if g.shape == "scalar":
            return np.full(P, float(h))
        if g.shape == "block":
            return self._expand(h)
        if g.shape == "unit":
            return h[self._units()]
        if g.shape == "param":
            return h.copy()
        if g.shape == "iter":
            return np.full(P, float(h[t]))
        return self._expand(h[t])

    def per_param_schedule(self, name: str) -> np.ndarray:
        """(n_iters, layout.size) array whose row t is ``per_param(name, t)`` (any shape)."""
        g = self.group(name)
        h, T, P = g.value, self.n_iters, self._n_params
        m = self._masks.get(name)
        if g.shape == "iter_block":
            out = self._expand(h)
        elif g.shape == "iter":
            out = np.repeat(h[:, None], P, axis=1)
        else:
            return np.tile(self.per_param(name), (T, 1))
        return out if m is None else out * m

    def reduce(self, name: str, per_param_grad, t=None) -> np.ndarray:
        """Adjoint of ``per_param``: dF/dh (group shape) from g = dF/da at iteration ``t``.

        scalar: sum_i g_i; block: per-block sums (layout.reduce); unit: per-unit sums; param: g;
        iter: zeros except [t] = sum_i g_i; iter_block: zeros except row t = per-block sums.
        Exactly <reduce(g, t), h> = <g, per_param(h, t)>.
        """
        g = self.group(name)
        t = self._check_t(g, t)
        gp = self._masked(name, self._check_grad(name, per_param_grad))
        if g.shape == "scalar":
            return np.asarray(gp.sum())
        if g.shape == "block":
            return self._reduce(gp)
        if g.shape == "unit":
            return self._reduce_units(gp)
        if g.shape == "param":
            return gp.copy()
        out = np.zeros(g.free.shape)
        out[t] = gp.sum() if g.shape == "iter" else self._reduce(gp)
        return out

    def reduce_schedule(self, name: str, schedule_grad) -> np.ndarray:
        """Adjoint of ``per_param_schedule``: dF/dh from a (n_iters, layout.size) gradient."""
        g = self.group(name)
        G = np.asarray(schedule_grad, dtype=float)
        want = (self.n_iters, self._n_params)
        if G.shape != want:
            raise ConfigError(f"hyperparameter {name!r}: schedule gradient has shape {G.shape}, expected {want}")
        G = self._masked(name, G)
        if g.shape == "iter_block":
            return self._reduce(G)
        if g.shape == "iter":
            return G.sum(axis=1)
        if g.shape == "scalar":
            return np.asarray(G.sum())
        if g.shape == "block":
            return self._reduce(G).sum(axis=0)
        if g.shape == "unit":
            return self._reduce_units(G.sum(axis=0))
        return G.sum(axis=0)

    def accumulate(self, grads: dict, name: str, per_param_grad, t=None) -> None:
        """grads[name] += reduce(name, per_param_grad, t), in place (zeros if absent).

        For the iteration shapes only row ``t`` is touched, so a reverse pass over
        T steps costs O(T * size), not O(T^2 * blocks).
        """
        g = self.group(name)
        if name not in grads:
            grads[name] = np.zeros(g.free.shape)
        acc = grads[name]
        if not isinstance(acc, np.ndarray) or acc.shape != g.free.shape:
            raise ConfigError(f"hyperparameter {name!r}: accumulated gradient has shape "
                              f"{np.shape(acc)}, expected {g.free.shape}")
        if g.shape in ITER_SHAPES:
            t = self._check_t(g, t)
            gp = self._masked(name, self._check_grad(name, per_param_grad))
            acc[t] += gp.sum() if g.shape == "iter" else self._reduce(gp)
        else:
            acc += self.reduce(name, per_param_grad, t)

    def zero_grads(self) -> dict:
        """{name: zeros of the group's shape} for every group (writable)."""
        return {g.name: np.zeros(g.free.shape) for g in self.groups}

    def _masked(self, name, per_param_grad) -> np.ndarray:
        """m * g for a covered group (the adjoint of the masked expansion), else g."""
        m = self._masks.get(name)
        return per_param_grad if m is None else per_param_grad * m

    def _check_grad(self, name, per_param_grad) -> np.ndarray:
        gp = np.asarray(per_param_grad, dtype=float)
        if gp.shape != (self._n_params,):
            raise ConfigError(f"hyperparameter {name!r}: per-parameter gradient has shape {gp.shape}, "
                              f"expected ({self._n_params},)")
        return gp

    def _check_group_grad(self, name, grad) -> np.ndarray:
        g = self.group(name)
        a = np.asarray(grad, dtype=float)
        if a.shape != g.free.shape:
            raise ConfigError(f"hyperparameter {name!r}: gradient has shape {a.shape}, "
                              f"expected {g.free.shape} (shape {g.shape!r})")
        return a

    # --- chain rule and flat vectors ----------------------------------------------
    def chain(self, grad_constrained: Mapping) -> dict:
        """dF/ds = dF/dh * dh/ds per group: log: * h; logit: * h (1 - h); identity: * 1.

        Takes and returns dicts name -> array of the group's shape (same keys).
        """
        out = {}
        for name, gr in grad_constrained.items():
            a = self._check_group_grad(name, gr)
            g = self.group(name)
            out[name] = a * dconstrained_dfree(g.transform, g.value)
        return out

    def flatten(self) -> np.ndarray:
        """Free values of the tuned groups, concatenated in container order."""
        parts = [self.group(n).free.ravel() for n in self.tuned]
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, vec) -> "HyperParams":
        """New container whose tuned groups take their free values from ``vec``."""
        v = np.asarray(vec, dtype=float)
        if v.shape != (self.size,):
            raise ConfigError(f"flat hyperparameter vector has shape {v.shape}, expected ({self.size},) "
                              f"for tuned groups {list(self.tuned)}")
        new, o = {}, 0
        for n in self.tuned:
            g = self.group(n)
            new[n] = HyperGroup(n, g.transform, g.shape, v[o:o + g.count].reshape(g.free.shape))
            o += g.count
        groups = tuple(new.get(g.name, g) for g in self.groups)
        return HyperParams(self.layout, self.n_iters, groups, self.tuned, self.cover)

    def flatten_grads(self, grads: Mapping) -> np.ndarray:
        """Gradients (name -> group-shaped array) of the tuned groups, in ``flatten`` order.

        A missing tuned group contributes zeros; entries for untuned groups are
        ignored; unknown names are an error. Pass gradients wrt the FREE values
        (``chain`` first), or use ``flatten_free_grads``.
        """
        unknown = [n for n in grads if n not in self]
        if unknown:
            raise ConfigError(f"gradients for unknown hyperparameter groups {unknown}; "
                              f"groups are {list(self.names)}")
        parts = []
        for n in self.tuned:
            g = self.group(n)
            parts.append(self._check_group_grad(n, grads[n]).ravel() if n in grads else np.zeros(g.count))
        return np.concatenate(parts) if parts else np.zeros(0)

    def flatten_free_grads(self, grad_constrained: Mapping) -> np.ndarray:
        """flatten_grads(chain(grad_constrained)): the meta-optimiser's gradient vector."""
        return self.flatten_grads(self.chain(grad_constrained))

    # --- summaries and files --------------------------------------------------------
    def describe(self) -> dict:
        """JSON-able summary: per group transform, shape, count, tuned, min/mean/max of h."""
        out = {}
        for g in self.groups:
            h = g.value
            out[g.name] = {"transform": g.transform, "shape": g.shape, "count": g.count,
                           "covers": self.cover.get(g.name, COVER_ALL),
                           "tuned": g.name in self.tuned, "min": float(h.min()),
                           "mean": float(h.mean()), "max": float(h.max())}
        return {"n_iters": self.n_iters, "size": self.size, "total_size": self.total_size,
                "tuned": list(self.tuned), "groups": out}

    def save(self, path) -> None:
        """Write ``STEM.npz`` (free arrays) and ``STEM.json`` (description), atomically
        (``shared.hypers_file``)."""
        hypers_file.save(self, path)

    @classmethod
    def load(cls, path, layout: Optional[ParamLayout] = None) -> "HyperParams":
        """Read a container written by ``save``; ConfigError naming the file on any problem.

        With ``layout`` given, the stored layout must equal it.
        """
        return hypers_file.load(cls, path, layout)

    def __repr__(self):
        gs = ", ".join(f"{g.name}:{g.transform}:{g.shape}{list(g.free.shape)}" + ("" if g.name in self.tuned else "(fixed)")
                       + (f"(on {self.cover[g.name]})" if g.name in self.cover else "") for g in self.groups)
        return f"HyperParams(n_iters={self.n_iters}, params={self.layout.size}, groups=[{gs}])"


def check_fits(hypers, layout: ParamLayout, n_iters: int) -> None:
    """ConfigError unless ``hypers`` were built for ``layout`` and ``n_iters`` training steps
    (both backends check this before training, instead of a numpy broadcast error or a
    silently cut per-iteration schedule)."""
    if hypers.layout != layout:
        raise ConfigError(f"hyperparameters were built for another layout ({hypers.layout.size} parameters in "
                          f"{hypers.layout.n_blocks} blocks); the model has {layout.size} in {layout.n_blocks}")
    if hypers.n_iters != n_iters:
        raise ConfigError(f"hyperparameters were built for {hypers.n_iters} training steps; this run has {n_iters}")


_MOVED = {"standard", "HYPERS_STEM", "check_coverage_matches", "load_for_run", "load_fixed"}


def __getattr__(name):
    """``standard`` and the ``--hypers-from`` loaders live in ``shared.run_hypers`` (which
    imports this module); the old names stay importable from here."""
    if name in _MOVED:
        from shared import run_hypers  # noqa: PLC0415 (run_hypers imports this module)
        return getattr(run_hypers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
