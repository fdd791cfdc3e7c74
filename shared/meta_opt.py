"""Meta-optimisers for the outer loop, as (init, update) pairs of pure functions (optax style).

    state = init(x0);  x_new, state = update(x, grad, state)

* SGD with momentum:  m = mu m + g;  x -= eta m
* Adam (Kingma & Ba 2015), textbook: the reversible-learning code's "adam"
  disabled momentum after step 0, this one does not:
  m = b1 m + (1-b1) g;  s = b2 s + (1-b2) g^2;  x -= eta mhat / (sqrt(shat) + eps)
* sign-SGD (the DrMAD experiments): x -= eta sign(g)

Backend-neutral (numpy): both backends' meta loops use these.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from shared.errors import ConfigError


class Optimizer(NamedTuple):
    init: Callable
    update: Callable


def sgd_momentum(lr: float, mass: float = 0.9) -> Optimizer:
    def init(x):
        return {"m": np.zeros_like(x)}

    def update(x, g, state):
        m = mass * state["m"] + g
        return x - lr * m, {"m": m}
    return Optimizer(init, update)


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    def init(x):
        return {"m": np.zeros_like(x), "s": np.zeros_like(x), "k": np.zeros(())}

    def update(x, g, state):
        k = state["k"] + 1
        m = b1 * state["m"] + (1 - b1) * g
        s = b2 * state["s"] + (1 - b2) * g * g
        mhat, shat = m / (1 - b1 ** k), s / (1 - b2 ** k)
        return x - lr * mhat / (np.sqrt(shat) + eps), {"m": m, "s": s, "k": k}
    return Optimizer(init, update)


def sign_sgd(lr: float) -> Optimizer:
    def init(x):
        return {}

    def update(x, g, state):
        return x - lr * np.sign(g), state
    return Optimizer(init, update)


OPTIMIZERS = {"adam": adam, "sgd": sgd_momentum, "sign": sign_sgd}


def make_optimizer(name: str, lr: float) -> Optimizer:
    if name not in OPTIMIZERS:
        raise ConfigError(f"meta-optimiser must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    if not (lr >= 0 and np.isfinite(lr)):       # 0: every step is x - 0 = x (a fixed-hyperparameter baseline)
        raise ConfigError(f"meta learning rate must be finite and >= 0, got {lr}")
    return OPTIMIZERS[name](lr)


class Clip(NamedTuple):
    """Hypergradient clipping in both meta loops (``meta.run(..., clip=...)``)::

        g <- g * min(1, norm / ||g||)          (when ``norm`` is set)
        g <- clip(g, -value, value)            (when ``value`` is set; after the norm)

    ``meta.run`` takes a ``Clip``, a number (the norm alone, the ``--clip`` option) or
    None (no clipping)."""
    norm: float | None = None
    value: float | None = None


def as_clip(clip) -> Clip:
    """A checked ``Clip`` from ``meta.run``'s ``clip`` argument; ConfigError for a bound <= 0."""
    if clip is None:
        return Clip()
    c = clip if isinstance(clip, Clip) else Clip(norm=clip)
    for option, bound in (("--clip", c.norm), ("--clip-value", c.value)):
        if bound is not None and not bound > 0:
            raise ConfigError(f"{option} must be positive, got {bound}")
    return c


def clip_by_norm(g: np.ndarray, max_norm) -> np.ndarray:
    """g * min(1, max_norm / ||g||); no-op when max_norm is None."""
    if max_norm is None:
        return g
    norm = float(np.linalg.norm(g))
    return g if norm <= max_norm else g * (max_norm / norm)


def apply_clip(g: np.ndarray, clip: Clip) -> np.ndarray:
    """``Clip``'s rule: the norm first, then the entries."""
    g = clip_by_norm(g, clip.norm)
    return g if clip.value is None else np.clip(g, -clip.value, clip.value)


# One entry per meta-iteration in both backends' histories (losses and errors at the
# weights trained with that iteration's hyperparameters), then ``seconds``.
HISTORY_KEYS = ("train_loss", "val_loss", "val_error", "test_error", "hypergradient_norm", "meta_objective")


def new_history() -> dict:
    return {k: [] for k in (*HISTORY_KEYS, "seconds")}


def checkpoint_arrays(x, state: dict, history: dict) -> dict:
    """A meta-loop's checkpoint arrays (both backends): the free hyperparameter vector
    ``hypers``, the optimiser state ``opt_<name>`` and the history ``hist_<key>``."""
    return {"hypers": x, **{"opt_" + k: np.asarray(v) for k, v in state.items()},
            **{"hist_" + k: np.asarray(v, float) for k, v in history.items()}}
