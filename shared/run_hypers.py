"""The hyperparameters a training run takes: ``standard`` (the four groups built
from the command line's options) or, with ``--hypers-from``, those an earlier
run learned (``load_for_run``, ``load_fixed``).
"""
from __future__ import annotations

import os
from pathlib import Path

from shared.coverage import DEFAULT as COVER_ALL
from shared.errors import ConfigError
from shared.hypergroup import ITER_SHAPES
from shared.hyperparams import STANDARD_GROUPS, HyperParams
from shared.hypers_file import file_paths
from shared.layout import ParamLayout


def standard(layout: ParamLayout, n_iters: int, *, lr, momentum, l2, init_scales,
             groups=STANDARD_GROUPS, l2_shape="param", lr_shape="iter_block",
             momentum_shape="iter_block", l2_on=COVER_ALL) -> HyperParams:
    """The four groups every training run uses; ``groups`` says which are TUNED.

    l2 (log, ``l2_shape``), lr (log, ``lr_shape``), momentum (logit,
    ``momentum_shape``), init_scale (log, 'block'; ``init_scales`` is a
    per-block array or a scalar). All four are always present, in that order;
    ``groups`` becomes ``HyperParams.tuned`` (what flatten/unflatten see).
    ``l2_on`` is the coverage of l2 (``shared.coverage``: 'all' or 'weights').
    """
    groups = tuple(groups)
    unknown = [g for g in groups if g not in STANDARD_GROUPS]
    if unknown:
        raise ConfigError(f"unknown hyperparameter groups {unknown}; choose from {list(STANDARD_GROUPS)}")
    specs = {"l2": (l2, "log", l2_shape), "lr": (lr, "log", lr_shape),
             "momentum": (momentum, "logit", momentum_shape),
             "init_scale": (init_scales, "log", "block")}
    return HyperParams.from_values(layout, n_iters, specs, tuned=groups, cover={"l2": l2_on})


# --- --hypers-from: starting from hyperparameters an earlier run learned ---------

HYPERS_STEM = "hypers"        # RUN_DIR/hypers.npz + hypers.json (``meta``, ``gpu_ver drmad``)


def _layout_difference(saved: ParamLayout, here: ParamLayout) -> str:
    """The first difference between two layouts, in words (names and shapes of the blocks)."""
    def shape(s):
        return "x".join(map(str, s)) or "scalar"
    for i, (a, b) in enumerate(zip(zip(saved.names, saved.shapes), zip(here.names, here.shapes))):
        if a != b:
            return f"block {i} is {a[0]} {shape(a[1])} there, {b[0]} {shape(b[1])} in this model"
    return f"{saved.n_blocks} parameter blocks there, {here.n_blocks} in this model"


def check_coverage_matches(h: HyperParams, source, l2_on, option="--hypers-from") -> None:
    """ConfigError unless the file's l2 coverage is the run's ``--l2-on`` (None: not checked)."""
    if l2_on is None or "l2" not in h:
        return
    saved = h.coverage("l2")
    if saved != l2_on:
        raise ConfigError(f"{option} {source}: its l2 was learned with --l2-on {saved}; this run has --l2-on "
                          f"{l2_on} (pass --l2-on {saved})")


def load_for_run(source, layout: ParamLayout, n_iters, groups=None, option="--hypers-from",
                 steps_option="--iters", l2_on=None) -> HyperParams:
    """The hyperparameters saved in ``source`` (a run folder holding ``hypers.json`` and
    ``hypers.npz``, or such a file / stem), for a run with ``layout`` and ``n_iters`` steps.

    ConfigError, naming ``option`` and ``source``, for a path that holds none, a file
    saved for another layout (which block differs) or for another number of training
    steps. ``groups`` (the command's ``--hypers``) become the tuned groups; each must be
    in the file. The file's values and shapes replace the command's ``--lr``, ``--l2``,
    ``--momentum`` and ``--*-shape``. ``n_iters=None``: any number of steps (the caller
    checks the shapes); ``steps_option`` names the option that sets the steps. ``l2_on``
    (the run's ``--l2-on``; None: not checked) must be the coverage the file's l2 has."""
    p = Path(os.fspath(source))
    if p.is_dir():
        if not (p / f"{HYPERS_STEM}.json").is_file():
            raise ConfigError(f"{option} {source}: no {HYPERS_STEM}.json there (a run of meta or gpu_ver drmad "
                              "saves its learned hyperparameters)")
        p = p / HYPERS_STEM
    elif not any(q.is_file() for q in file_paths(p)):
        raise ConfigError(f"{option} {source}: no such run folder or hyperparameter file")
    h = HyperParams.load(p)
    if h.layout != layout:
        raise ConfigError(f"{option} {source}: saved for another layout ({h.layout.size} parameters; this model has "
                          f"{layout.size}: {_layout_difference(h.layout, layout)})")
    if n_iters is not None and h.n_iters != n_iters:
        raise ConfigError(f"{option} {source}: saved for {h.n_iters} training steps; this run has {n_iters} "
                          f"({steps_option})")
    check_coverage_matches(h, source, l2_on, option)
    if groups is not None:
        missing = [g for g in groups if g not in h]
        if missing:
            raise ConfigError(f"{option} {source}: has no {missing[0]!r} group to tune (it holds "
                              f"{', '.join(h.names)})")
        h = h.with_tuned(groups)
    return h


def load_fixed(source, layout: ParamLayout, scalar=(), per_param=(), option="--hypers-from",
               l2_on=None) -> dict:
    """Values for a run that keeps its hyperparameters fixed over the steps (``gpu_ver train``):
    from the file ``load_for_run`` finds in ``source`` (same layout; any number of steps),
    each group of ``scalar`` as a float (its shape must be ``scalar``) and each group of
    ``per_param`` as a (layout.size,) array (any shape that does not change with the step:
    scalar, block, unit, param). A group the file lacks is left out; one of another shape
    is refused, naming it. ``l2_on``: as for ``load_for_run`` (the per-parameter values
    are masked by the file's coverage)."""
    h = load_for_run(source, layout, None, option=option, l2_on=l2_on)
    out = {}
    for name in (*scalar, *per_param):
        if name not in h:
            continue
        shape = h.group(name).shape
        if name in scalar and shape != "scalar":
            raise ConfigError(f"{option} {source}: its {name!r} has shape {shape!r}; this command takes one value "
                              f"(a file whose {name!r} has shape 'scalar')")
        if name in per_param and shape in ITER_SHAPES:
            raise ConfigError(f"{option} {source}: its {name!r} has shape {shape!r} (one value per step); this "
                              f"command keeps {name!r} fixed (shape scalar, block, unit or param)")
        out[name] = float(h.value(name)) if name in scalar else h.per_param(name)
    return out
