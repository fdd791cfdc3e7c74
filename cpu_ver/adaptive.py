"""Online (adaptive) hyperparameter methods: learning rates and L2 strengths
adapted during ONE training run from a short-horizon hypergradient.

Every method is a pair of pure functions, as in optax::

    method = make_method("hd", lr=1e-3, beta=1e-3, granularity="global")
    state = method.init(w0)
    w, state = method.update(GradInfo(g=grad_w L(w_t, l2(state); batch_t)), state, w)

``state`` is a NamedTuple of arrays (never mutated; ``update`` returns a new
one), ``GradInfo`` carries the training gradient at ``w_t`` and, when a
method needs them, a Hessian-vector-product closure at ``w_t`` on the same
batch and a validation-gradient closure. ``step(method, model, w, state,
batch, val_batch)`` builds the ``GradInfo`` with the autograd MLP and calls
``update``; the gradient is ``model.grad`` for every method, the plain
optimiser included, so overheads compare like with like.

Notation (docs/ALGORITHMS.md s.4, eqs. 31-41): g_t = grad_w L(w_t; B_t) (L includes
the L2 term sum_i l2_i w_i^2), u_t the direction actually applied,
w_{t+1} = w_t - alpha_t * u_t. "Groups" share one hyperparameter: ``global``
(one), ``block`` (one per parameter block W0, b0, W1, ...; "per layer"),
``unit`` (incoming weights and bias of one unit) or ``param``.

Learning rates from the training loss
-------------------------------------
Hypergradient descent (Baydin, Cornish, Martinez Rubio, Schmidt, Wood, ICLR
2018). The one-step hypergradient of the training loss wrt the rate used at
the previous step is

    d L(w_t; B_t) / d alpha_{t-1} = -g_t . u_{t-1}        (per group: sums)

``hd``       SGD-HD:  alpha_t = alpha_{t-1} - beta h_t;  u_t = g_t
``sgdn-hd``  SGDN-HD: m_t = mu m_{t-1} + g_t;  u_t = g_t + mu m_t (Nesterov)
``adam-hd``  Adam-HD: u_t = mhat_t / (sqrt(vhat_t) + eps) (bias-corrected)

Additive (``log_space=False``, the paper's rule; alpha is projected onto
alpha >= lr_min with a warning when the projection bites, and the number of
bites is kept in the state) or in log space, s = log alpha:
s_t = s_{t-1} - beta * alpha_{t-1} * h_t (chain rule; no projection needed,
but beta must be scaled up by about 1/alpha for a comparable speed).

``almeida``  Almeida, Langlois, Amaral, Plakhov (1998), per parameter:
             v_t = gamma v_{t-1} + (1 - gamma) g_t^2;
             alpha_t = alpha_{t-1} * max(1/2, 1 + beta g_t g_{t-1} / v_t)
             (the max(1/2, .) guard is SMD's; it keeps alpha positive).

``idbd``     IDBD (Sutton, AAAI 1992), per-parameter log step sizes beta_i:
             hg_t = g_t * h_t   (h ~ dw/dbeta, so hg ~ dL(w_t)/dbeta)
             beta_t = beta_{t-1} - theta hg_t;  alpha_t = exp(beta_t)
             w_{t+1} = w_t - alpha_t g_t
             h_{t+1} = decay * h_t * max(0, 1 - alpha_t d_t) - alpha_t g_t
             Sutton's linear unit (error delta, inputs x, loss delta^2/2):
             g = -delta x and d = x^2, decay = 1: exactly his rule. For
             non-linear models (``curvature="diag"``) d_t is the diagonal of
             the Hessian when the caller supplies it (``GradInfo.diag_h``)
             and ZERO otherwise: the DIAGONAL APPROXIMATION that drops the
             curvature term and relies on ``trace_decay < 1`` to forget, at
             O(n) cost per step. ``curvature="hvp"`` uses the exact
             non-linear generalisation h_{t+1} = decay (h_t - alpha_t H_t h_t)
             - alpha_t g_t with one Hessian-vector product per step.

``smd``      Stochastic meta-descent (Schraudolph 1999, 2002), gains p and a
             trace v ~ dw/dlog p propagated forward:
             p_t = p_{t-1} * max(1/2, 1 - mu g_t v_t)
             w_{t+1} = w_t - p_t g_t
             v_{t+1} = lambda v_t - p_t (g_t + lambda H_t v_t)
             lambda = 0 is the one-step (per-parameter HD in log space) rule
             and needs no Hessian-vector product.

Regularisation from held-out data
---------------------------------
``t1t2``     T1-T2 (Luketina, Berglund, Greff, Raiko, ICML 2016). Weights
             take plain SGD steps on the training loss C1 (training split)
             w_{t+1} = w_t - eta (grad CE + 2 lambda w_t); every ``every``
             steps the log L2 strengths s = log lambda (per block, unit or
             parameter) follow the exact one-step hypergradient of the
             validation cross-entropy C2 through the last update:
             dC2(w_{t+1})/dlambda = -eta grad_w C2(w_{t+1}) . (2 w_t)
             (per group: sums), dC2/ds = lambda dC2/dlambda.
             ``at="current"`` evaluates grad C2 at w_t (the original's
             approximation). Meta optimiser: Adam (as the original) or SGD.

``combined`` per-parameter learning rates (log-space SGD-HD on the training
             loss) and per-parameter (or per-group) log L2 strengths (T1-T2
             on the validation loss, with eta = the current per-parameter
             rates) adapted together in one run.

Safeguards: positive learning rates (log space, multiplicative guards, or
projection with a warning); elementwise hypergradient clipping (``clip``);
a NaN or infinity in a hypergradient, a hyperparameter or the weights raises
``NonFiniteError`` naming the step; bad options raise ``ConfigError``.

Checking
--------
``one_step_hypergradient`` exposes, for every method, the quantity its rule
follows together with a closure ``loss(hyper)`` of the loss after the step,
so it can be compared with central finite differences; ``build_check_problem``
builds a small float64 problem (data, w0, batches, hyperparameters) from a
seed with numpy alone, ``CHECK_CONFIGS`` lists the method configurations, and
``check_all`` / ``reference_hypergradients`` run them (the Theano backend
mirrors these functions and compares its values with ``reference_
hypergradients`` to 1e-10).
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, NamedTuple, Optional

import numpy as np

from cpu_ver import models as _models
from cpu_ver import online_kernels as _kernels
from shared.errors import ConfigError, check_finite, check_loss
from shared.layout import ParamLayout
from shared.online import (  # noqa: F401 (backend-neutral pieces, re-exported)
    CHECK_CONFIGS, CHECK_WARMUP, GRANULARITIES, METHOD_NAMES, PLAIN_NAMES, TRACE_HORIZON, TRACE_NAMES,
    CheckProblem, OneStep, build_check_problem, fd_check, fd_directional)
from shared.online import GRANULARITY_ALIASES as _GRANULARITY_ALIASES
from shared.online import check_validation_split, curve_arrays, record_due, restore_curves, spent_before
from shared.online import check_clip as _check_clip
from shared.online import check_decay as _check_decay
from shared.online import check_l2 as _check_l2
from shared.coverage import check_coverage
from shared.coverage import mask as coverage_mask
from shared.online import check_meta_step as _check_meta_step
from shared.online import check_positive as _check_positive


# ---------------------------------------------------------------------------
# Groups of parameters that share one hyperparameter

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

    ``unit``: a 2-D block (fan_in, fan_out) gives one group per column (unit);
    the 1-D block that follows with fan_out entries (its bias) joins them.
    """
    kind = _GRANULARITY_ALIASES.get(kind, kind)
    if kind == "global":
        return Grouping("global", 1, layout)
    if kind == "block":
        return Grouping("block", layout.n_blocks, layout)
    if kind == "param":
        return Grouping("param", layout.size, layout)
    if kind == "unit":
        parts, n, last = [], 0, None
        for shape in layout.shapes:
            if len(shape) == 2:
                parts.append(np.tile(np.arange(n, n + shape[1]), shape[0]))
                last, n = (n, shape[1]), n + shape[1]
            elif len(shape) == 1 and last is not None and shape[0] == last[1]:
                parts.append(np.arange(last[0], last[0] + shape[0]))
                last = None
            else:
                size = int(np.prod(shape, dtype=np.int64))
                parts.append(np.arange(n, n + size))
                n, last = n + size, None
        return Grouping("unit", n, layout, np.concatenate(parts).astype(np.int64))
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


# ---------------------------------------------------------------------------
# Gradient information passed to ``update``

class GradInfo(NamedTuple):
    """What ``update`` receives about step t.

    g:        grad_w L(w_t, l2; B_t), L2 term included (flat array)
    hvp:      v -> H_t v at (w_t, B_t), or None (needed by smd with lambda>0, idbd-hvp)
    val_grad: w -> grad_w C2(w) on the validation batch of step t (t1t2, combined)
    diag_h:   diagonal of H_t when the caller knows it (IDBD's linear unit), or None
    """
    g: np.ndarray
    hvp: Optional[Callable] = None
    val_grad: Optional[Callable] = None
    diag_h: Optional[np.ndarray] = None


class Method(NamedTuple):
    """An online method: pure ``init(w0) -> state`` and ``update(info, state, w) -> (w, state)``.

    ``l2(state)``: the L2 strengths (float or per-parameter array) the training
    gradient must use at this step; ``lr(state)`` / ``l2_values(state)``: the
    per-parameter (or scalar) learning rates and L2 strengths, for logging.
    """
    name: str
    config: dict
    init: Callable
    update: Callable
    l2: Callable
    lr: Callable
    l2_values: Callable
    needs_hvp: bool = False
    needs_val: bool = False


# ---------------------------------------------------------------------------
# Small helpers

def _clip(h, c):
    return h if c is None else np.clip(h, -c, c)


def _finite(what, x, step):
    """Cheap finiteness check: one sum, and the full check only when it is not finite."""
    s = np.sum(x)
    if not np.isfinite(s):
        check_finite(what, x, step)  # raises unless the sum merely overflowed


# ---------------------------------------------------------------------------
# Optimiser directions (shared by the plain optimisers and the HD rules)

def _direction(opt, g, t, m, v, mu, b1, b2, eps):
    """Direction u_t for SGD (g), Nesterov SGD (g + mu m_t) or Adam (mhat/(sqrt vhat + eps))."""
    if opt == "sgd":
        return g, m, v
    if opt == "sgdn":
        m = mu * m + g
        return g + mu * m, m, v
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * (g * g)
    mhat = m / (1.0 - b1 ** (t + 1))
    vhat = v / (1.0 - b2 ** (t + 1))
    return mhat / (np.sqrt(vhat) + eps), m, v


# ---------------------------------------------------------------------------
# Plain optimisers (the baselines)

class PlainState(NamedTuple):
    t: int
    m: np.ndarray
    v: np.ndarray


def plain(layout, optimizer="sgd", lr=1e-3, l2=0.0, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8) -> Method:
    """Plain SGD / Nesterov SGD / Adam with a fixed learning rate: w_{t+1} = w_t - lr u_t."""
    if optimizer not in PLAIN_NAMES:
        raise ConfigError(f"optimizer must be one of {', '.join(PLAIN_NAMES)}, got {optimizer!r}")
    lr = float(_check_positive("learning rate", lr))
    l2 = _check_l2(l2, layout.size)
    cfg = dict(optimizer=optimizer, lr=lr, momentum=momentum, b1=b1, b2=b2, eps=eps)

    def init(w0):
        z = np.zeros_like(w0) if optimizer != "sgd" else np.zeros(0)
        return PlainState(0, z, np.zeros_like(w0) if optimizer == "adam" else np.zeros(0))

    def update(info, state, w):
        u, m, v = _direction(optimizer, info.g, state.t, state.m, state.v, momentum, b1, b2, eps)
        return w - lr * u, PlainState(state.t + 1, m, v)

    return Method(optimizer, cfg, init, update, lambda s: l2, lambda s: lr, lambda s: l2)


# ---------------------------------------------------------------------------
# Hypergradient descent: SGD-HD, SGDN-HD, Adam-HD

class HDState(NamedTuple):
    """t: step; hyper: per-group alpha (additive) or log alpha (log space);
    u: last applied direction u_{t-1}; m, v: momentum / Adam moments;
    hg: last hypergradient wrt ``hyper``; n_projected: projections that bit."""
    t: int
    hyper: np.ndarray
    u: np.ndarray
    m: np.ndarray
    v: np.ndarray
    hg: np.ndarray
    n_projected: int


def hypergradient_descent(layout, optimizer="sgd", lr=1e-3, beta=1e-3, granularity="global",
                          log_space=False, l2=0.0, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8,
                          clip=None, lr_min=1e-12) -> Method:
    """SGD-HD / SGDN-HD / Adam-HD (Baydin et al. 2018) with global, per-block, per-unit
    or per-parameter rates, additive or in log space (see the module docstring)."""
    if optimizer not in PLAIN_NAMES:
        raise ConfigError(f"optimizer must be one of {', '.join(PLAIN_NAMES)}, got {optimizer!r}")
    lr = _check_positive("initial learning rate", lr)
    beta = _check_meta_step("beta", beta)
    clip = _check_clip(clip)
    if not (0.0 <= momentum < 1.0):
        raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
    gr = make_grouping(layout, granularity)
    l2 = _check_l2(l2, layout.size)
    name = {"sgd": "hd", "sgdn": "sgdn-hd", "adam": "adam-hd"}[optimizer]
    cfg = dict(optimizer=optimizer, lr=lr, beta=beta, granularity=gr.kind, log_space=bool(log_space),
               momentum=momentum, b1=b1, b2=b2, eps=eps, clip=clip, lr_min=lr_min)

    def init(w0):
        h0 = np.full(gr.n, float(lr)) if np.ndim(lr) == 0 else np.asarray(lr, float).copy()
        if h0.shape != (gr.n,):
            raise ConfigError(f"initial learning rate: expected a number or {gr.n} values, got shape {h0.shape}")
        z = np.zeros_like(w0)
        return HDState(0, np.log(h0) if log_space else h0, z,
                       z if optimizer != "sgd" else np.zeros(0),
                       z if optimizer == "adam" else np.zeros(0), np.zeros(gr.n), 0)

    def update(info, state, w):
        g, t = info.g, state.t
        hg = -reduce_dot(gr, g, state.u)               # dL(w_t)/dalpha_{t-1}
        if log_space:
            hg = hg * np.exp(state.hyper)               # dL/dlog alpha
        hg = _clip(hg, clip)
        _finite("learning-rate hypergradient", hg, t)
        hyper = state.hyper - beta * hg
        n_proj = state.n_projected
        if log_space:
            alpha = np.exp(hyper)
        else:
            if np.any(hyper < lr_min):
                if n_proj == 0:   # warn once per run; the state counts every projection
                    bad = int(np.count_nonzero(hyper < lr_min))
                    warnings.warn(f"{name}: step {t}: {bad} learning rate(s) went below lr_min={lr_min:g} "
                                  f"and were projected onto it (counted in state.n_projected)",
                                  RuntimeWarning, stacklevel=3)
                hyper, n_proj = np.maximum(hyper, lr_min), n_proj + 1
            alpha = hyper
        u, m, v = _direction(optimizer, g, t, state.m, state.v, momentum, b1, b2, eps)
        w_new = w - expand(gr, alpha) * u
        return w_new, HDState(t + 1, hyper, u, m, v, hg, n_proj)

    def lr_of(state):
        return expand(gr, np.exp(state.hyper) if log_space else state.hyper)

    m = Method(name, cfg, init, update, lambda s: l2, lr_of, lambda s: l2)
    return m


# ---------------------------------------------------------------------------
# Almeida et al. (1998)

class AlmeidaState(NamedTuple):
    t: int
    hyper: np.ndarray   # per-parameter alpha
    u: np.ndarray       # g_{t-1}
    v: np.ndarray       # running average of g^2
    hg: np.ndarray      # -g_t g_{t-1} = dL(w_t)/dalpha_{t-1}


def almeida(layout, lr=1e-3, beta=1e-2, gamma=0.99, l2=0.0, clip=None) -> Method:
    """Per-parameter multiplicative rates (Almeida et al. 1998), normalised by a running g^2."""
    lr = float(_check_positive("initial learning rate", lr))
    beta = _check_meta_step("beta", beta)
    gamma = _check_decay("gamma", gamma)
    clip = _check_clip(clip)
    l2 = _check_l2(l2, layout.size)
    cfg = dict(lr=lr, beta=beta, gamma=gamma, clip=clip)

    def init(w0):
        z = np.zeros_like(w0)
        return AlmeidaState(0, np.full(w0.shape, lr), z, z, z)

    def update(info, state, w):
        g, t = info.g, state.t
        v = gamma * state.v + (1.0 - gamma) * g * g if t > 0 else g * g
        hg = _clip(-g * state.u, clip)
        _finite("learning-rate hypergradient", hg, t)
        alpha = state.hyper * np.maximum(0.5, 1.0 - beta * hg / (v + 1e-300))
        return w - alpha * g, AlmeidaState(t + 1, alpha, g, v, hg)

    return Method("almeida", cfg, init, update, lambda s: l2, lambda s: s.hyper, lambda s: l2)


# ---------------------------------------------------------------------------
# IDBD (Sutton 1992)

class IDBDState(NamedTuple):
    t: int
    hyper: np.ndarray   # beta = log alpha, per parameter
    h: np.ndarray       # trace ~ dw/dbeta
    u: np.ndarray       # last applied direction (g)
    h_prev: np.ndarray  # the trace the last update used
    clip: float         # hypergradient clip (inf: none)

    @property
    def hg(self):
        """The last update's hypergradient clip(g h), formed on demand (the
        update itself never stores it: one array pass less per step)."""
        return np.clip(self.u * self.h_prev, -self.clip, self.clip)


def idbd(layout, lr=1e-3, theta=1e-2, trace_decay=1.0, curvature="diag", l2=0.0, clip=None) -> Method:
    """IDBD with per-parameter log step sizes (see the module docstring for the
    generalisation: ``curvature="diag"`` diagonal approximation, ``"hvp"`` exact)."""
    lr = _check_positive("initial learning rate", lr)
    theta = _check_meta_step("theta", theta)
    decay = _check_decay("trace_decay", trace_decay)
    clip = _check_clip(clip)
    if curvature not in ("diag", "hvp"):
        raise ConfigError(f"idbd curvature must be 'diag' or 'hvp', got {curvature!r}")
    l2 = _check_l2(l2, layout.size)
    cfg = dict(lr=lr, theta=theta, trace_decay=decay, curvature=curvature, clip=clip)

    clip_value = np.inf if clip is None else clip

    def init(w0):
        z = np.zeros_like(w0)
        return IDBDState(0, np.log(np.broadcast_to(np.asarray(lr, float), w0.shape)).copy(), z, z, z, clip_value)

    def update(info, state, w):
        g, t, h = info.g, state.t, state.h
        if curvature == "diag" or decay == 0.0:
            # one compiled pass (cpu_ver/online_kernels.py); the same arithmetic as below
            w_new, b, h_new = np.empty_like(w), np.empty_like(w), np.empty_like(w)
            if info.diag_h is None or curvature == "hvp":
                bad = _kernels.idbd_kernel(g, h, state.hyper, w, theta, decay, clip_value, w_new, b, h_new)
            else:
                d = np.ascontiguousarray(info.diag_h, float)
                bad = _kernels.idbd_diag_kernel(g, h, state.hyper, w, d, theta, decay, clip_value, w_new, b, h_new)
            if bad:
                check_finite("IDBD hypergradient", _clip(g * h, clip), t)
            return w_new, IDBDState(t + 1, b, h_new, g, h, clip_value)
        hg = _clip(g * h, clip)
        _finite("IDBD hypergradient", hg, t)
        b = np.multiply(hg, -theta)
        b += state.hyper                      # beta_t = beta_{t-1} - theta g_t h_t
        step = np.exp(b)                      # alpha_t
        h_new = h - step * info.hvp(h)        # (I - alpha H) h, before alpha is overwritten
        step *= g                             # alpha_t g_t
        w_new = w - step
        if decay != 1.0:
            h_new *= decay
        h_new -= step
        return w_new, IDBDState(t + 1, b, h_new, g, h, clip_value)

    return Method("idbd", cfg, init, update, lambda s: l2, lambda s: np.exp(s.hyper), lambda s: l2,
                  needs_hvp=(curvature == "hvp" and decay > 0))


# ---------------------------------------------------------------------------
# SMD (Schraudolph 1999, 2002)

class SMDState(NamedTuple):
    t: int
    p: np.ndarray       # gains (per-parameter learning rates)
    v: np.ndarray       # trace ~ dw/dlog p
    u: np.ndarray       # last applied direction (g)
    hg: np.ndarray      # last g * v = dL(w_t)/dlog p (one-step)


def smd(layout, lr=1e-3, mu=1e-2, lam=0.99, l2=0.0, clip=None) -> Method:
    """Stochastic meta-descent with its Hessian-vector-product trace (module docstring)."""
    lr = _check_positive("initial learning rate", lr)
    mu = _check_meta_step("mu", mu)
    lam = _check_decay("lambda", lam)
    clip = _check_clip(clip)
    l2 = _check_l2(l2, layout.size)
    cfg = dict(lr=lr, mu=mu, lam=lam, clip=clip)

    def init(w0):
        z = np.zeros_like(w0)
        return SMDState(0, np.broadcast_to(np.asarray(lr, float), w0.shape).copy(), z, z, z)

    def update(info, state, w):
        g, t, v = info.g, state.t, state.v
        hg = _clip(g * v, clip)
        _finite("SMD hypergradient", hg, t)
        p = state.p * np.maximum(0.5, 1.0 - mu * hg)
        step = p * g
        w_new = w - step
        v_new = lam * (v - p * info.hvp(v)) - step if lam > 0 else -step
        return w_new, SMDState(t + 1, p, v_new, g, hg)

    return Method("smd", cfg, init, update, lambda s: l2, lambda s: s.p, lambda s: l2, needs_hvp=lam > 0)


# ---------------------------------------------------------------------------
# T1-T2 (Luketina et al. 2016) and the combined method

class T1T2State(NamedTuple):
    """t: step; s: per-group log L2 strengths; l2: expand(exp(s)) (cached);
    hg: last dC2/ds; m, v, k: Adam state of the meta optimiser (k meta steps)."""
    t: int
    s: np.ndarray
    l2: np.ndarray
    hg: np.ndarray
    m: np.ndarray
    v: np.ndarray
    k: int


class _T1T2Config(NamedTuple):
    gr: Grouping
    meta_lr: float
    every: int
    at: str
    clip: Optional[float]
    meta_opt: str
    mask: Optional[np.ndarray] = None      # --l2-on: 0/1 per parameter (None: every parameter)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def _t1t2_config(layout, l2_groups, meta_lr, every, at, clip, meta_opt, l2_on="all"):
    meta_lr = _check_meta_step("meta_lr", meta_lr)
    if not isinstance(every, (int, np.integer)) or every < 1:
        raise ConfigError(f"hyper-step interval must be an integer >= 1, got {every!r}")
    if at not in ("next", "current"):
        raise ConfigError(f"T1-T2: 'at' must be 'next' (exact, w_t+1) or 'current' (w_t), got {at!r}")
    if meta_opt not in ("adam", "sgd"):
        raise ConfigError(f"T1-T2 meta optimiser must be 'adam' or 'sgd', got {meta_opt!r}")
    return _T1T2Config(make_grouping(layout, l2_groups), meta_lr, int(every), at, _check_clip(clip), meta_opt,
                       coverage_mask(layout, check_coverage(l2_on, "l2_on")))


def _t1t2_l2(c: _T1T2Config, s) -> np.ndarray:
    """Per-parameter L2 strengths m * expand(exp(s)) (m: the --l2-on mask, 1 without one)."""
    l2 = np.broadcast_to(expand(c.gr, np.exp(s)), (c.gr.layout.size,))
    return l2.copy() if c.mask is None else l2 * c.mask


def _t1t2_init(c: _T1T2Config, l2_init):
    l2_init = np.asarray(l2_init, float)
    _check_positive("initial L2 strength (log space)", l2_init)
    s = np.log(np.broadcast_to(l2_init, (c.gr.n,))).copy()
    z = np.zeros(c.gr.n)
    return T1T2State(0, s, _t1t2_l2(c, s), z, z, z, 0)


def _t1t2_hypergradient(c: _T1T2Config, st: T1T2State, w, w_new, eta, val_grad):
    """dC2(w_{t+1})/ds = -reduce(m * eta * grad C2 * 2 w_t) * exp(s) (exact for at='next'; m: the
    --l2-on mask, so a group of uncovered parameters gets 0)."""
    gv = val_grad(w_new if c.at == "next" else w)
    x = -2.0 * (eta * gv) * w
    return reduce(c.gr, x if c.mask is None else x * c.mask) * np.exp(st.s)


def _t1t2_after_step(c: _T1T2Config, st: T1T2State, w, w_new, eta, info) -> T1T2State:
    t = st.t
    if (t + 1) % c.every:
        return st._replace(t=t + 1)
    if info.val_grad is None:
        raise ConfigError("T1-T2 needs a validation batch (GradInfo.val_grad); the validation split is empty?")
    hg = _clip(_t1t2_hypergradient(c, st, w, w_new, eta, info.val_grad), c.clip)
    _finite("L2 hypergradient", hg, t)
    m, v, k = st.m, st.v, st.k
    if c.meta_opt == "adam":
        m = c.b1 * m + (1 - c.b1) * hg
        v = c.b2 * v + (1 - c.b2) * hg * hg
        step = (m / (1 - c.b1 ** (k + 1))) / (np.sqrt(v / (1 - c.b2 ** (k + 1))) + c.eps)
    else:
        step = hg
    s = st.s - c.meta_lr * step
    _finite("log L2 strength", s, t)
    return T1T2State(t + 1, s, _t1t2_l2(c, s), hg, m, v, k + 1)


def t1t2(layout, lr=0.1, l2_init=1e-4, l2_groups="block", meta_lr=1e-2, every=1, at="next",
         clip=None, meta_opt="adam", l2_on="all") -> Method:
    """T1-T2: plain SGD on the training loss, per-group log L2 from the validation loss
    (on the parameters ``l2_on`` covers; the others keep L2 = 0)."""
    lr = float(_check_positive("learning rate", lr))
    c = _t1t2_config(layout, l2_groups, meta_lr, every, at, clip, meta_opt, l2_on)
    cfg = dict(lr=lr, l2_init=np.asarray(l2_init).tolist(), l2_groups=c.gr.kind, meta_lr=c.meta_lr,
               every=c.every, at=at, clip=c.clip, meta_opt=meta_opt, l2_on=l2_on)

    def init(w0):
        return _t1t2_init(c, l2_init)

    def update(info, state, w):
        w_new = w - lr * info.g
        return w_new, _t1t2_after_step(c, state, w, w_new, lr, info)

    return Method("t1t2", cfg, init, update, lambda s: s.l2, lambda s: lr, lambda s: s.l2, needs_val=True)


class CombinedState(NamedTuple):
    lr: HDState
    reg: T1T2State


def combined(layout, lr=1e-2, beta=1e-2, lr_granularity="param", l2_init=1e-4, l2_groups="param",
             meta_lr=1e-2, every=1, at="next", clip=None, meta_opt="adam", l2_on="all") -> Method:
    """Per-parameter log-space SGD-HD rates and T1-T2 log L2 strengths in one run.

    Step t: g_t = grad C1(w_t, lambda_t); s_t = s_{t-1} - beta alpha_{t-1} (-g_t u_{t-1});
    w_{t+1} = w_t - alpha_t g_t; every ``every`` steps a T1-T2 step with eta = alpha_t.
    """
    c = _t1t2_config(layout, l2_groups, meta_lr, every, at, clip, meta_opt, l2_on)
    hd = hypergradient_descent(layout, "sgd", lr, beta, lr_granularity, log_space=True, clip=clip)
    gr_lr = make_grouping(layout, lr_granularity)
    cfg = dict(lr=np.asarray(lr).tolist(), beta=beta, lr_granularity=gr_lr.kind, log_space=True,
               l2_init=np.asarray(l2_init).tolist(), l2_groups=c.gr.kind, meta_lr=c.meta_lr,
               every=c.every, at=at, clip=c.clip, meta_opt=meta_opt, l2_on=l2_on)

    def init(w0):
        return CombinedState(hd.init(w0), _t1t2_init(c, l2_init))

    def update(info, state, w):
        w_new, lr_state = hd.update(info, state.lr, w)
        eta = expand(gr_lr, np.exp(lr_state.hyper))
        return w_new, CombinedState(lr_state, _t1t2_after_step(c, state.reg, w, w_new, eta, info))

    return Method("combined", cfg, init, update, lambda s: s.reg.l2, lambda s: hd.lr(s.lr),
                  lambda s: s.reg.l2, needs_val=True)


# ---------------------------------------------------------------------------
# Front door

def make_method(name, layout: ParamLayout, **kw) -> Method:
    """Build method ``name`` (``METHOD_NAMES`` or a plain optimiser ``PLAIN_NAMES``) for ``layout``.

    Keyword options are those of the constructor: ``plain``, ``hypergradient_descent``
    (hd, sgdn-hd, adam-hd), ``almeida``, ``idbd``, ``smd``, ``t1t2``, ``combined``.
    """
    if name in PLAIN_NAMES:
        return plain(layout, name, **kw)
    if name in ("hd", "sgd-hd"):
        return hypergradient_descent(layout, "sgd", **kw)
    if name == "sgdn-hd":
        return hypergradient_descent(layout, "sgdn", **kw)
    if name == "adam-hd":
        return hypergradient_descent(layout, "adam", **kw)
    builders = {"almeida": almeida, "idbd": idbd, "smd": smd, "t1t2": t1t2, "combined": combined}
    if name not in builders:
        raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(METHOD_NAMES + PLAIN_NAMES)}")
    return builders[name](layout, **kw)


# ---------------------------------------------------------------------------
# One step with the autograd MLP

def grad_and_hvp(model, w, l2, X, y):
    """g = grad_w L(w, l2; X, y) and a closure v -> H v sharing one forward/backward pass."""
    g, hvp_and_mixed = model.grad_and_hvp_fn(w, l2, X, y)
    return g, (lambda v: hvp_and_mixed(v)[0])


def step(method: Method, model, w, state, batch, val_batch=None):
    """One update of ``method`` on minibatch ``batch = (X, y)``; ``val_batch`` for T1-T2.

    Raises NonFiniteError naming the step when the new weights are not finite.
    """
    X, y = batch
    l2 = method.l2(state)
    if method.needs_hvp:
        g, hvp = grad_and_hvp(model, w, l2, X, y)
    else:
        g, hvp = model.grad(w, l2, X, y), None
    val_grad = None
    if val_batch is not None:
        Xv, yv = val_batch
        val_grad = lambda wv: model.nll_grad(wv, Xv, yv)  # noqa: E731
    return method.update(GradInfo(g, hvp, val_grad), state, w)


def state_step(state) -> int:
    """The step counter t of any method's state."""
    return state.lr.t if isinstance(state, CombinedState) else state.t


# ---------------------------------------------------------------------------
# One-step hypergradients (what each rule follows) and their finite-difference closures

def _lr_view(method: Method, state):
    """(free hyperparameter used by the last step, map free -> per-group learning rate, grouping)."""
    name, cfg = method.name, method.config
    if name in ("hd", "sgdn-hd", "adam-hd"):
        return state.hyper, (np.exp if cfg["log_space"] else (lambda h: h)), cfg["granularity"]
    if name == "idbd":
        return state.hyper, np.exp, "param"
    if name == "smd":
        return np.log(state.p), np.exp, "param"
    if name == "almeida":
        return state.hyper, (lambda h: h), "param"
    raise ConfigError(f"method {name!r} has no learning-rate view")


def one_step_hypergradient(method: Method, model, w, state, batch, next_batch, val_batch) -> dict:
    """The one-step hypergradient(s) that ``method``'s rule follows, with FD closures.

    Learning-rate methods (hd, sgdn-hd, adam-hd, almeida, idbd, smd, and the
    rates of combined): one step from ``(w, state)`` on ``batch`` gives
    w1 = w - alpha(hyper) * u; the quantity is d L(w1, l2; next_batch) / d hyper
    (hyper: the free parameter - alpha or log alpha - used by that step), which
    the method's NEXT update computes (``state.hg``). For idbd and smd it is
    exact when the incoming trace is zero (lambda = 0 or a fresh trace); the
    caller resets it (``reset_trace``).

    T1-T2 (and the L2 part of combined): the step on ``batch`` with the hyper
    step taken at once; the quantity is d C2(w1; val_batch) / d s with
    s = log lambda, computed by the update itself (exact for at='next').

    Returns ``{"lr": OneStep, "l2": OneStep}`` (the parts the method has).
    """
    out = {}
    name = method.name
    w1, s1 = step(method, model, w, state, batch, val_batch)
    if name in ("t1t2", "combined"):
        reg0 = state.reg if name == "combined" else state
        c = method.config
        gr = make_grouping(model.layout, c["l2_groups"])
        cm = coverage_mask(model.layout, c.get("l2_on", "all"))
        cm = 1.0 if cm is None else cm
        eta = method.lr(s1) if name == "combined" else c["lr"]
        Xb, yb = batch
        Xv, yv = val_batch
        use_next = c["at"] == "next"
        g_nll = model.nll_grad(w, Xb, yb)
        gv_now = None if use_next else model.nll_grad(w, Xv, yv)

        def l2_loss(s):
            # C2(w_{t+1}(s)), or for at='current' its linearisation grad C2(w_t) . w_{t+1}(s)
            wn = w - eta * (g_nll + 2.0 * cm * expand(gr, np.exp(s)) * w)
            return model.nll(wn, Xv, yv) if use_next else float(np.dot(gv_now, wn))
        reg1 = s1.reg if name == "combined" else s1
        if reg1.k == reg0.k:
            raise ConfigError("one_step_hypergradient: the method must take a hyper step every step (every=1)")
        out["l2"] = OneStep(reg1.hg, reg0.s.copy(), l2_loss)
        if name == "t1t2":
            return out
    lr_state1 = s1.lr if name == "combined" else s1
    free, to_lr, kind = _lr_view(method if name != "combined" else
                                 method._replace(name="hd", config={"log_space": True,
                                                                    "granularity": method.config["lr_granularity"]}),
                                 lr_state1)
    gr = make_grouping(model.layout, kind)
    u = lr_state1.u
    l2 = method.l2(s1)   # the L2 strengths the next step's gradient uses
    Xn, yn = next_batch

    def lr_loss(h):
        return model.loss(w - expand(gr, to_lr(h)) * u, l2, Xn, yn)

    _, s2 = step(method, model, w1, s1, next_batch, val_batch)
    lr_state2 = s2.lr if name == "combined" else s2
    out["lr"] = OneStep(lr_state2.hg, np.array(free, float).copy(), lr_loss)
    return out


def reset_trace(state):
    """IDBD/SMD state with a zero trace (so the next hypergradient is exactly one-step)."""
    if isinstance(state, IDBDState):
        return state._replace(h=np.zeros_like(state.h))
    if isinstance(state, SMDState):
        return state._replace(v=np.zeros_like(state.v))
    return state


# ---------------------------------------------------------------------------
# The deterministic check problem (mirrored by the Theano backend)


def _check_model(p: CheckProblem):
    return _models.MLP(p.sizes, p.activation)


def _batch(p: CheckProblem, t):
    i = p.batches[t]
    return p.X[i], p.y[i]


def _val_batch(p: CheckProblem, t):
    i = p.val_batches[t]
    return p.Xv[i], p.yv[i]


def check_method_config(name):
    """(method name, options) of a ``CHECK_CONFIGS`` entry, with the problem's fixed L2 for
    the learning-rate methods."""
    method, kw = CHECK_CONFIGS[name]
    return method, dict(kw)


def reference_onestep(name, problem: CheckProblem) -> dict:
    """One-step hypergradients (dict part -> OneStep) of ``CHECK_CONFIGS[name]`` on ``problem``:
    ``CHECK_WARMUP`` steps of the method, then the checked step (trace reset for idbd/smd)."""
    p, model = problem, _check_model(problem)
    method_name, kw = check_method_config(name)
    if method_name not in ("t1t2", "combined"):
        kw["l2"] = p.l2
    method = make_method(method_name, model.layout, **kw)
    w, state = p.w0, method.init(p.w0)
    for t in range(CHECK_WARMUP):
        w, state = step(method, model, w, state, _batch(p, t), _val_batch(p, t))
    state = reset_trace(state)
    t = CHECK_WARMUP
    return one_step_hypergradient(method, model, w, state, _batch(p, t), _batch(p, t + 1), _val_batch(p, t))


def trace_hypergradient(problem: CheckProblem, horizon=TRACE_HORIZON, method_name="smd") -> OneStep:
    """SMD's (or IDBD-hvp's) Hessian-vector-product trace over ``horizon`` steps.

    With fixed gains (mu = theta = 0) and no decay (lambda = 1), the trace from
    v_0 = 0 is v_K = sum_j dw_K/dlog p_j exactly, so the sum of the per-parameter
    hypergradient g_K * v_K is the derivative of L(w_K; B_K) along log p + c 1.
    Returns a OneStep over the scalar c.
    """
    p, model = problem, _check_model(problem)
    if method_name == "smd":
        method = make_method("smd", model.layout, lr=0.2, mu=0.0, lam=1.0, l2=p.l2)
    else:
        method = make_method("idbd", model.layout, lr=0.2, theta=0.0, trace_decay=1.0, curvature="hvp", l2=p.l2)
    state0 = method.init(p.w0)

    def run(c, k):
        st = state0._replace(p=state0.p * np.exp(c)) if method_name == "smd" else \
            state0._replace(hyper=state0.hyper + c)
        w = p.w0
        for t in range(k):
            w, st = step(method, model, w, st, _batch(p, t))
        return w, st

    _, st = run(0.0, horizon + 1)
    value = np.array([np.sum(st.hg)])

    def loss(c):
        w, _ = run(float(c[0]), horizon)
        return model.loss(w, p.l2, *_batch(p, horizon))

    return OneStep(value, np.zeros(1), loss)


def reference_hypergradients(seed=0) -> dict:
    """``name -> {part: analytic hypergradient}`` on ``build_check_problem(seed)`` for
    every ``CHECK_CONFIGS`` entry and the two trace checks: the numbers another
    backend must reproduce."""
    problem = build_check_problem(seed)
    out = {name: {k: v.value for k, v in reference_onestep(name, problem).items()} for name in CHECK_CONFIGS}
    out[f"smd-trace{TRACE_HORIZON}"] = {"lr": trace_hypergradient(problem, method_name="smd").value}
    out[f"idbd-hvp-trace{TRACE_HORIZON}"] = {"lr": trace_hypergradient(problem, method_name="idbd").value}
    return out


def check_all(tol=1e-6, seed=0) -> dict:
    """``method -> max relative error`` of each one-step hypergradient against central FD
    (float64, ``build_check_problem(seed)``). ``tol`` is not applied here; the caller compares."""
    problem = build_check_problem(seed)
    errs = {}
    for name in CHECK_CONFIGS:
        parts = reference_onestep(name, problem)
        errs[name] = max(fd_check(o, seed) for o in parts.values())
    errs[f"smd-trace{TRACE_HORIZON}"] = fd_check(trace_hypergradient(problem, method_name="smd"), seed)
    errs[f"idbd-hvp-trace{TRACE_HORIZON}"] = fd_check(trace_hypergradient(problem, method_name="idbd"), seed)
    return errs


# ---------------------------------------------------------------------------
# IDBD on a tracking task whose best step size is known analytically

def tracking_mse(alpha, q, r):
    """Steady-state mean squared one-step prediction error of LMS with step ``alpha``
    tracking a random walk w*_{t+1} = w*_t + N(0, q) observed as y_t = w*_t + N(0, r):
    d_{t+1} = (1 - alpha) d_t - alpha n_t + q_t gives E d^2 = (alpha^2 r + q) / (alpha (2 - alpha)),
    and MSE = E d^2 + r."""
    alpha = np.asarray(alpha, float)
    return (alpha ** 2 * r + q) / (alpha * (2.0 - alpha)) + r


def kalman_optimal_step(q, r):
    """The step size minimising ``tracking_mse``: the steady-state Kalman gain of the
    local-level model, K = P / (P + r) with P = (q + sqrt(q^2 + 4 q r)) / 2."""
    q, r = np.asarray(q, float), np.asarray(r, float)
    P = (q + np.sqrt(q * q + 4.0 * q * r)) / 2.0
    return P / (P + r)


def idbd_tracking(q, r=1.0, theta=2e-3, steps=20000, n_rep=20, alpha0=0.5, seed=0, record_every=100):
    """Sutton's IDBD on independent linear units with input x = 1 tracking random walks.

    Coordinate i (``len(q) * n_rep`` of them) sees y_t = w*_{t,i} + N(0, r),
    w*_{t+1,i} = w*_{t,i} + N(0, q_i); the loss delta^2/2 gives g = -delta,
    and the Hessian diagonal is x^2 = 1 (passed as ``GradInfo.diag_h``), so the
    ``idbd`` update is exactly Sutton's. Returns (steps recorded, alpha history
    of shape (records, len(q), n_rep)).
    """
    q = np.asarray(q, float)
    n = q.size * n_rep
    layout = ParamLayout(("w",), ((n,),))
    method = idbd(layout, lr=alpha0, theta=theta, trace_decay=1.0)
    rng = np.random.default_rng(seed)
    qs = np.repeat(q, n_rep)
    target = np.zeros(n)
    w = np.zeros(n)
    state = method.init(w)
    ones = np.ones(n)
    rec_t, rec_a = [], []
    for t in range(steps):
        y = target + np.sqrt(r) * rng.standard_normal(n)
        w, state = method.update(GradInfo(g=w - y, diag_h=ones), state, w)
        target = target + np.sqrt(qs) * rng.standard_normal(n)
        if (t + 1) % record_every == 0:
            rec_t.append(t + 1)
            rec_a.append(np.exp(state.hyper).reshape(q.size, n_rep))
    return np.array(rec_t), np.array(rec_a)


# ---------------------------------------------------------------------------
# A training run with curves and hyperparameter trajectories

QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def block_quantiles(layout: ParamLayout, values, quantiles=QUANTILES) -> list:
    """Per block, the quantiles of per-parameter ``values`` (a number gives the same row
    for every block): a list (blocks) of lists (quantiles)."""
    if np.ndim(values) == 0:
        return [[float(values)] * len(quantiles) for _ in layout.names]
    v = np.asarray(values)
    return [np.quantile(v[layout.slice(b)], quantiles).tolist() for b in range(layout.n_blocks)]


def state_arrays(state, prefix="state") -> tuple:
    """(arrays, structure): a method state (NamedTuples of arrays, numbers and None, nested)
    as flat numeric arrays named ``<prefix>.<field>...`` plus a JSON structure for
    ``state_from_arrays``; numbers are stored as 0-d arrays, so every value round-trips exactly."""
    arrays = {}

    def walk(x, key):
        if x is None:
            return None
        if isinstance(x, tuple):
            return {"type": type(x).__name__, "items": [walk(v, f"{key}.{i}") for i, v in enumerate(x)]}
        arrays[key] = np.asarray(x)
        return {"key": key, "scalar": type(x).__name__ if np.ndim(x) == 0 and not isinstance(x, np.ndarray)
                else None}

    return arrays, walk(state, prefix)


_STATE_TYPES = {c.__name__: c for c in (tuple, PlainState, HDState, AlmeidaState, IDBDState, SMDState, T1T2State,
                                        CombinedState)}
_SCALARS = {"int": int, "float": float, "bool": bool}


def state_from_arrays(arrays, structure):
    """Inverse of ``state_arrays``."""

    def build(node):
        if node is None:
            return None
        if "items" in node:
            cls = _STATE_TYPES.get(node["type"])
            if cls is None:
                raise ConfigError(f"checkpoint state has an unknown part {node['type']!r}")
            items = [build(v) for v in node["items"]]
            return cls(items) if cls is tuple else cls(*items)
        a = np.asarray(arrays[node["key"]])
        if a.ndim == 0:
            a = a[()]
        return _SCALARS[node["scalar"]](a) if node["scalar"] in _SCALARS else a

    return build(structure)


def train_online(method: Method, model, data, steps, batch_size, seed=0, eval_every=10,
                 eval_train_n=None, record_hypers=True, progress=False, desc=None,
                 checkpoint=None, checkpoint_every=0, identity=None, resume=None, stop_after=None):
    """Train ``model`` with ``method`` for ``steps`` minibatch steps; return curves.

    ``data = (X, y, Xv, yv)``. Minibatch t is ``shared.datasets.batch_indices(n, batch_size,
    seed, t)``; the validation batch of step t (T1-T2) the same with seed + 1 on the
    validation split. Every ``eval_every`` steps (and at 0 and ``steps``): full
    training cross-entropy (the first ``eval_train_n`` training examples when given),
    validation cross-entropy and error, and per-block quantiles of the learning rates
    and L2 strengths. Raises NonFiniteError naming the step when the weights or a
    loss become non-finite, ConfigError for an empty validation split when the method
    needs one.

    Checkpoints as ``gpu_ver.adaptive.train_online``: with a ``checkpoint`` path, the
    weights, the method state (``state_arrays``), the curves so far and ``identity`` are
    written atomically every ``checkpoint_every`` steps (0: never in between), when the
    loop ends and when SIGINT/SIGTERM stops it (``shared.interrupt``: only between two
    steps, so the checkpoint's step count and weights agree); ``resume = (arrays, meta)`` continues from the
    step it holds to the same result as an uninterrupted run; ``stop_after`` stops once
    that many steps are done. The curves carry ``steps_done``.
    """
    from shared.datasets import batch_indices
    from shared.interrupt import check as check_interrupt
    from shared.interrupt import checkpointed
    from shared.records import save_checkpoint

    X, y, Xv, yv = data
    check_validation_split(method.name, method.needs_val, len(yv))
    if batch_size < 1 or batch_size > len(y):
        raise ConfigError(f"batch size must be in 1..{len(y)} (training examples), got {batch_size}")
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    layout = model.layout
    t_start, before = time.perf_counter(), spent_before(resume)
    w = model.init(seed)
    state = method.init(w)
    Xe, ye = (X, y) if eval_train_n is None else (X[:eval_train_n], y[:eval_train_n])
    vb = min(batch_size, len(yv)) if len(yv) else 0
    curves = {"step": [], "train_loss": [], "val_loss": [], "val_error": []}
    hyp = {"lr_quantiles": [], "l2_quantiles": []}
    start = 0
    if resume is not None:
        start = restore_curves(resume, steps, curves, hyp, record_hypers)
        arrays, meta = resume
        w = arrays["w"].copy()
        state = state_from_arrays(arrays, meta["state"])

    def save(step, w, state):
        if checkpoint is None:
            return
        arrays, structure = state_arrays(state)
        arrays.update(curve_arrays(curves, hyp, record_hypers), w=w)
        save_checkpoint(checkpoint, arrays, {**(identity or {}), "step": step, "state": structure,
                                             "spent_s": before + time.perf_counter() - t_start})

    def record(t, w, state):
        """Evaluate first, then append everything (an interruption leaves no half record)."""
        tl = model.nll(w, Xe, ye)
        check_loss("training loss", tl, t)
        row = {"step": t, "train_loss": tl, "val_loss": model.nll(w, Xv, yv) if len(yv) else float("nan"),
               "val_error": model.error(w, Xv, yv) if len(yv) else float("nan")}
        if record_hypers:
            row.update(lr_quantiles=block_quantiles(layout, method.lr(state)),
                       l2_quantiles=block_quantiles(layout, method.l2_values(state)))
        for k, v in row.items():
            (curves if k in curves else hyp)[k].append(v)

    def due(t):
        return record_due(t, eval_every, steps)

    if due(start) and (not curves["step"] or curves["step"][-1] != start):
        record(start, w, state)          # also a record an interruption fell before
    end = steps if stop_after is None else max(start, min(steps, int(stop_after)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc=desc or method.name, leave=False)
    done = start
    try:
        with checkpointed(lambda: save(done, w, state)):
            for t in range(start, end):
                check_interrupt()                 # Ctrl-C takes effect here, between two steps
                i = batch_indices(len(y), batch_size, seed, t)
                vbatch = None
                if method.needs_val:
                    j = batch_indices(len(yv), vb, seed + 1, t)
                    vbatch = (Xv[j], yv[j])
                w, state = step(method, model, w, state, (X[i], y[i]), vbatch)
                done = t + 1
                if due(done):
                    _finite("weights", w, t)
                    record(done, w, state)
                if bar is not None:
                    bar.update(1)
                if checkpoint_every and done % checkpoint_every == 0 and done < end:
                    save(done, w, state)
    finally:
        if bar is not None:
            bar.close()
    save(done, w, state)
    out = dict(curves, steps_done=done, spent_s=before + time.perf_counter() - t_start)
    if record_hypers:
        out.update(hyp, blocks=list(layout.names), quantiles=list(QUANTILES))
    return out, w, state
