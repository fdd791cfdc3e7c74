"""Backend-neutral pieces of the online (adaptive) methods' checks and training loops.

Both ``cpu_ver.online`` (autograd/numpy) and ``gpu_ver.online`` (Theano) use: the
deterministic float64 check problem and its configurations (the numbers both backends
must reproduce to 1e-10), the finite-difference check of a one-step hypergradient
(``shared.fdcheck``'s fourth-order stencil along directions), and the records of
``train_online`` (curves, hyperparameter quantiles, what a checkpoint holds). The
methods' names and options are ``shared.online_spec``; the ``adaptive`` commands'
helpers ``shared.online_cli``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from shared.errors import ConfigError
from shared.fdcheck import directional_fd
from shared.mlp_spec import MLPSpec


class OneStep(NamedTuple):
    """``value``: analytic d loss / d hyper at ``hyper``; ``loss(hyper)``: the loss after the step."""
    value: np.ndarray
    hyper: np.ndarray
    loss: Callable


def fd_directional(loss, hyper, d, h):
    """Central finite difference of loss(hyper + eps d) at eps = 0 (fourth order)."""
    return directional_fd(lambda s: loss(hyper + s * d), h)


def fd_check(onestep: OneStep, seed=0, n_random=3, rel_step=1e-3) -> float:
    """Max relative error of ``value . d`` against central FD over directions d.

    Directions: every coordinate when there are at most 12 hyperparameters,
    else ``n_random`` seeded Gaussian directions and the all-ones direction.
    """
    m = onestep.hyper.size
    if m <= 12:
        dirs = list(np.eye(m))
    else:
        rng = np.random.default_rng([seed, m])
        dirs = [rng.standard_normal(m) for _ in range(n_random)] + [np.ones(m)]
    h = rel_step * max(float(np.sqrt(np.mean(onestep.hyper ** 2))), 1e-2)
    worst = 0.0
    for d in dirs:
        a = float(np.dot(onestep.value, d))
        fd = fd_directional(onestep.loss, onestep.hyper, d, h)
        worst = max(worst, abs(a - fd) / max(abs(a), abs(fd), 1e-300))
    return worst


class CheckProblem(NamedTuple):
    """A small float64 problem built from a seed with numpy alone.

    sizes/activation: the MLP; X, y (train) and Xv, yv (validation); w0;
    batches: list of index arrays into the training set (step t uses batches[t]);
    val_batches: index arrays into the validation set; l2: per-parameter L2.
    """
    sizes: tuple
    activation: str
    X: np.ndarray
    y: np.ndarray
    Xv: np.ndarray
    yv: np.ndarray
    w0: np.ndarray
    batches: list
    val_batches: list
    l2: np.ndarray


def check_batch(p: CheckProblem, t) -> tuple:
    """(X, y) of training minibatch t of the check problem."""
    i = p.batches[t]
    return p.X[i], p.y[i]


def check_val_batch(p: CheckProblem, t) -> tuple:
    """(Xv, yv) of validation minibatch t of the check problem (T1-T2's C2 batch)."""
    i = p.val_batches[t]
    return p.Xv[i], p.yv[i]


CHECK_WARMUP = 3


def build_check_problem(seed=0, sizes=(5, 4, 3), activation="tanh", n_train=30, n_val=20, batch=10,
                        n_steps=CHECK_WARMUP + 4) -> CheckProblem:
    """Data from a random linear teacher, w0 = MLPSpec.init(seed), fixed batch indices."""
    rng = np.random.default_rng([seed, 7])
    d, k = sizes[0], sizes[-1]
    teacher = rng.standard_normal((d, k))
    X = rng.standard_normal((n_train + n_val, d))
    y = np.argmax(X @ teacher + 0.5 * rng.standard_normal((n_train + n_val, k)), axis=1).astype(np.int64)
    spec = MLPSpec(tuple(sizes), activation)
    w0 = spec.init(seed)
    batches = [np.sort(rng.permutation(n_train)[:batch]) for _ in range(n_steps)]
    val_batches = [np.sort(rng.permutation(n_val)[:batch]) for _ in range(n_steps)]
    l2 = 1e-2 * np.exp(0.3 * rng.standard_normal(spec.layout.size))
    return CheckProblem(tuple(sizes), activation, X[:n_train], y[:n_train], X[n_train:], y[n_train:],
                        w0, batches, val_batches, l2)


# name -> (method, options). lr values are initial rates; warm-up steps make
# momentum, Adam moments, traces and previous directions non-trivial.
CHECK_CONFIGS = {
    "hd": ("hd", dict(lr=0.2, beta=0.05, granularity="global")),
    "hd-block-log": ("hd", dict(lr=0.2, beta=0.3, granularity="block", log_space=True)),
    "hd-unit": ("hd", dict(lr=0.2, beta=0.05, granularity="unit")),
    "hd-param-log": ("hd", dict(lr=0.2, beta=0.3, granularity="param", log_space=True)),
    "sgdn-hd": ("sgdn-hd", dict(lr=0.1, beta=0.05, granularity="block", momentum=0.9)),
    "adam-hd": ("adam-hd", dict(lr=0.02, beta=1e-3, granularity="global")),
    "almeida": ("almeida", dict(lr=0.2, beta=0.05, gamma=0.9)),
    "idbd": ("idbd", dict(lr=0.2, theta=0.1, trace_decay=0.9)),
    "idbd-hvp": ("idbd", dict(lr=0.2, theta=0.1, trace_decay=0.9, curvature="hvp")),
    "smd": ("smd", dict(lr=0.2, mu=0.1, lam=0.9)),
    "t1t2-block": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="block", meta_lr=0.1, every=1)),
    "t1t2-unit": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="unit", meta_lr=0.1, every=1)),
    "t1t2-param": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="param", meta_lr=0.1, every=1)),
    # --l2-on weights: the bias blocks' strengths get hypergradient 0 (block) or only the
    # weight columns' part (unit groups join a column and its bias)
    "t1t2-block-weights": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="block", meta_lr=0.1, every=1,
                                        l2_on="weights")),
    "t1t2-unit-weights": ("t1t2", dict(lr=0.3, l2_init=1e-2, l2_groups="unit", meta_lr=0.1, every=1,
                                       l2_on="weights")),
    "combined": ("combined", dict(lr=0.2, beta=0.3, l2_init=1e-2, meta_lr=0.1, every=1)),
}
TRACE_HORIZON = 3
TRACE_NAMES = (f"smd-trace{TRACE_HORIZON}", f"idbd-hvp-trace{TRACE_HORIZON}")


def check_validation_split(method_name: str, needs_val: bool, n_val: int) -> None:
    """ConfigError when a method that learns from held-out data (T1-T2, combined) has none."""
    if needs_val and n_val == 0:
        raise ConfigError(f"{method_name}: the validation split is empty; T1-T2 needs held-out data (--n-val)")


# ---------------------------------------------------------------------------
# What ``train_online`` records and checkpoints (both backends)

def restore_curves(resume, steps, curves: dict, hyp: dict, record_hypers: bool) -> int:
    """Fill ``curves`` (and ``hyp``) in place from a checkpoint ``resume = (arrays, meta)``
    written with ``curve_arrays``; return the step it holds (ConfigError outside 0..steps)."""
    arrays, meta = resume
    start = int(meta["step"])
    if not 0 <= start <= steps:
        raise ConfigError(f"checkpoint step {start} is outside 0..{steps}")
    for k in curves:
        curves[k] = arrays[f"curve/{k}"].tolist()
    if record_hypers:
        for k in hyp:
            hyp[k] = arrays[f"hyp/{k}"].tolist()
    return start


def curve_arrays(curves: dict, hyp: dict, record_hypers: bool) -> dict:
    """The curves (and hyperparameter quantiles) as arrays for a checkpoint: the step
    numbers as integers (so that a resumed run writes them as an uninterrupted one
    does), everything else as floats."""
    out = {f"curve/{k}": np.asarray(v, np.int64 if k == "step" else float) for k, v in curves.items()}
    if record_hypers:
        out.update({f"hyp/{k}": np.asarray(v, float) for k, v in hyp.items()})
    return out


def spent_before(resume) -> float:
    """Seconds a resumed run spent before its checkpoint (0 for a new run): the
    checkpoints of ``train_online`` record ``spent_s`` so that a resumed run's
    timings count the whole run."""
    return 0.0 if resume is None else float(resume[1].get("spent_s", 0.0))


def record_due(t, eval_every, steps) -> bool:
    """Whether the curves are recorded after t steps: at 0, every ``eval_every``, at the end."""
    return t == 0 or t % eval_every == 0 or t == steps


QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def block_quantiles(layout, values, quantiles=QUANTILES) -> list:
    """Per block, the quantiles of per-parameter ``values`` (a number gives the same row
    for every block): a list (blocks) of lists (quantiles)."""
    if np.ndim(values) == 0:
        return [[float(values)] * len(quantiles) for _ in layout.names]
    v = np.asarray(values)
    return [np.quantile(v[layout.slice(b)], quantiles).tolist() for b in range(layout.n_blocks)]
