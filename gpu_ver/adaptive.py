"""Online (adaptive) hyperparameter methods on the Theano backend.

The same methods, names, options and formulas as ``cpu_ver/adaptive.py`` (read
its docstring for the rules and references): ``hd``, ``sgdn-hd``, ``adam-hd``
(global | block | unit | param rates, additive or log space), ``almeida``,
``idbd`` (``curvature="diag"`` or ``"hvp"``), ``smd``, ``t1t2`` (per block,
unit or parameter log L2 strengths, validation gradient at ``next`` or
``current``, every N steps), ``combined``, and the plain optimisers ``sgd``,
``sgdn``, ``adam`` (the baselines).

Execution model
---------------
``OnlineRun(model, method, w0)`` keeps ALL state in Theano shared variables:
the weights ``w``, the method's state (learning rates or log step sizes,
traces, directions, optimiser moments, L2 strengths, counters) and the batch
norm running averages, and compiles ONE function per run,
``step(X, y[, Xv, yv])``, which does the whole update of step t (training
gradient, Hessian-vector product when the method needs one, validation
gradient for T1-T2, hyperparameter and weight updates) in one call; the host
sends the batch and receives a few scalars (loss, CE, errors, sums used for
the finiteness check). Hessian-vector products are reverse over reverse
(``T.grad`` of ``grad . v``; ``T.Rop`` fails for conv). A T1-T2 hyper step
every N > 1 steps sits behind a lazy ``ifelse``, so the steps in between do
not evaluate the validation gradient.

Groups (``global``, ``block``, ``unit``, ``param``) are as in cpu_ver: a
``unit`` of a 2-D weight block is one column (with the 1-D bias block that
follows); for a 4-D convolution kernel (cout, cin, k, k) it is one output
channel; any other block (batch-norm scale/shift) has one group per entry
(per channel).

Safeguards: positive learning rates (log space, the max(1/2, .) multiplicative
guards, or projection onto ``lr_min`` with a warning and a counter), optional
elementwise hypergradient clipping, ``NonFiniteError`` naming the quantity
and the step when the loss, a hypergradient or the weights become NaN/inf,
``ConfigError`` for bad options (negative meta step, trace decay outside
[0, 1], empty validation split, ...).

Checks
------
``build_check_problem`` / ``CHECK_CONFIGS`` / ``CHECK_WARMUP`` mirror
cpu_ver's (numpy only, no cpu_ver import; ``crosscheck_adaptive`` verifies
they are identical). ``reference_onestep`` gives, per configuration, this
backend's one-step hypergradients (what the rule follows, read from the
shared state after the compiled steps) with closures of the loss after the
step (compiled ``models.Functions``), ``check_all`` compares them with
central finite differences and ``crosscheck_adaptive`` with cpu_ver's
``reference_hypergradients``.
"""
from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import numpy as np

from gpu_ver import config
from shared.errors import ConfigError, NonFiniteError, check_finite, check_loss
from shared.coverage import check_coverage
from shared.coverage import mask as coverage_mask
from shared.layout import ParamLayout
from shared.online import (  # noqa: F401 (backend-neutral pieces, re-exported)
    CHECK_CONFIGS, CHECK_WARMUP, GRANULARITIES, METHOD_NAMES, PLAIN_NAMES, TRACE_HORIZON, TRACE_NAMES,
    CheckProblem, OneStep, build_check_problem, fd_check, fd_directional)
from shared.online import GRANULARITY_ALIASES as _GRANULARITY_ALIASES
from shared.online import check_validation_split, curve_arrays, record_due, restore_curves, spent_before
from shared.online import check_clip as _check_clip
from shared.online import check_decay as _check_decay
from shared.online import check_l2 as _check_l2
from shared.online import check_meta_step as _check_meta_step
from shared.online import check_positive as _check_positive

theano = config.load()
T = theano.tensor
from theano.ifelse import ifelse  # noqa: E402

from gpu_ver import fncache  # noqa: E402
from gpu_ver import models as M  # noqa: E402

BN_MOMENTUM = M.BN_MOMENTUM


def _fx() -> str:
    return str(theano.config.floatX)


def _tiny() -> float:
    """The guard added to Almeida's running g^2 (1e-300 in float64, as cpu_ver)."""
    return 1e-300 if _fx() == "float64" else float(np.finfo(np.float32).tiny)


# ---------------------------------------------------------------------------
# Groups of parameters that share one hyperparameter (numpy and symbolic)

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
            parts, n, last = [], 0, None
            for shape in layout.shapes:
                size = int(np.prod(shape, dtype=np.int64))
                if len(shape) == 2:
                    parts.append(np.tile(np.arange(n, n + shape[1]), shape[0]))
                    last, n = (n, shape[1]), n + shape[1]
                elif len(shape) == 1 and last is not None and shape[0] == last[1]:
                    parts.append(np.arange(last[0], last[0] + shape[0]))
                    last = None
                elif len(shape) == 4:           # conv kernel (cout, cin, k, k): one group per output channel
                    parts.append(np.repeat(np.arange(n, n + shape[0]), size // shape[0]))
                    n, last = n + shape[0], None
                else:
                    parts.append(np.arange(n, n + size))
                    n, last = n + size, None
            self.n = n
            self.index = np.concatenate(parts).astype(np.int64)

    # symbolic ------------------------------------------------------------------
    def expand(self, h):
        """Per-group values -> what multiplies a flat vector (a scalar for global)."""
        if self.kind == "global":
            return h[0]
        if self.kind == "param":
            return h
        return h[T.constant(self.index)]

    def reduce(self, x):
        """Per-parameter vector -> per-group sums (the adjoint of ``expand``)."""
        if self.kind == "global":
            return T.sum(x).reshape((1,))
        if self.kind == "param":
            return x
        if self.kind == "block":
            return M.block_sums(x, self.layout)
        return T.inc_subtensor(T.zeros((self.n,), dtype=x.dtype)[T.constant(self.index)], x)

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


# ---------------------------------------------------------------------------
# Option checks (as cpu_ver)

def _check_moments(momentum, b1, b2, eps):
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0) or not eps > 0:
        raise ConfigError(f"Adam needs b1, b2 in [0, 1) and eps > 0, got b1={b1!r}, b2={b2!r}, eps={eps!r}")


def _clip(h, c):
    return h if c is None else T.clip(h, -c, c)


def _tf(t):
    return T.cast(t, _fx())


# ---------------------------------------------------------------------------
# Symbolic pieces of one step

class Ctx(NamedTuple):
    """What a method's ``build`` receives about step t (symbolic).

    S: name -> shared variable (the method's state); w: weights (shared);
    g: grad_w L(w_t, l2; B_t) with the method's L2; hv: H_t times the state
    vector named by ``method.hvp_of`` (None when not needed); val_grad:
    wv -> grad_w C2(wv) on the validation batch (None without one).
    """
    S: dict
    w: object
    g: object
    hv: object
    val_grad: Optional[Callable]


def _direction(opt, g, t, m, v, mu, b1, b2, eps):
    """u_t for sgd (g), sgdn (g + mu m_t) or adam (mhat / (sqrt vhat + eps)); new m, v (or None)."""
    if opt == "sgd":
        return g, None, None
    if opt == "sgdn":
        m_new = mu * m + g
        return g + mu * m_new, m_new, None
    m_new = b1 * m + (1.0 - b1) * g
    v_new = b2 * v + (1.0 - b2) * (g * g)
    tp = _tf(t) + 1.0
    mhat = m_new / (1.0 - b1 ** tp)
    vhat = v_new / (1.0 - b2 ** tp)
    return mhat / (T.sqrt(vhat) + eps), m_new, v_new


# ---------------------------------------------------------------------------
# Methods: state layout + symbolic update + numpy views for logging

class Method:
    """An online method on this backend.

    ``init(w0)`` -> ordered dict of initial state arrays (becoming shared
    variables); ``build(ctx)`` -> (w_new, {state name: new value}, {monitor
    name: scalar}) where every monitor is a sum whose non-finiteness raises
    NonFiniteError naming it; ``l2_expr(S)``: the symbolic L2 strengths of the
    training gradient; ``lr_of(arrays)`` / ``l2_of(arrays)``: per-parameter (or
    scalar) learning rates and L2 strengths from state arrays, for logging.
    ``hvp_of``: the state vector multiplied by the Hessian (None: no HVP).
    """
    name = "method"
    needs_val = False
    hvp_of: Optional[str] = None
    trace: Optional[str] = None        # the trace reset by ``reset_trace``

    def __init__(self, layout: ParamLayout, config: dict):
        self.layout, self.config = layout, config

    def init(self, w0) -> "OrderedDict":
        raise NotImplementedError

    def build(self, c: Ctx):
        raise NotImplementedError

    def l2_expr(self, S):
        raise NotImplementedError

    def lr_of(self, a):
        raise NotImplementedError

    def l2_of(self, a):
        raise NotImplementedError

    @property
    def needs_hvp(self) -> bool:
        return self.hvp_of is not None

    def step_of(self, a) -> int:
        return int(a["t"])


class _FixedL2:
    def _set_l2(self, l2):
        self.l2 = _check_l2(l2, self.layout.size)

    def l2_expr(self, S):
        return S["l2"]

    def _l2_state(self):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(self.l2, float), (self.layout.size,)))

    def l2_of(self, a):
        return a["l2"]


class Plain(_FixedL2, Method):
    """Plain SGD / Nesterov SGD / Adam with a fixed learning rate (the baselines)."""

    def __init__(self, layout, optimizer="sgd", lr=1e-3, l2=0.0, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8):
        if optimizer not in PLAIN_NAMES:
            raise ConfigError(f"optimizer must be one of {', '.join(PLAIN_NAMES)}, got {optimizer!r}")
        lr = float(_check_positive("learning rate", lr))
        _check_moments(momentum, b1, b2, eps)
        super().__init__(layout, dict(optimizer=optimizer, lr=lr, momentum=momentum, b1=b1, b2=b2, eps=eps))
        self.name, self.opt, self.lr = optimizer, optimizer, lr
        self.mu, self.b1, self.b2, self.eps = momentum, b1, b2, eps
        self._set_l2(l2)

    def init(self, w0):
        z = np.zeros_like(w0)
        s = OrderedDict(t=np.int64(0), l2=self._l2_state())
        if self.opt != "sgd":
            s["m"] = z.copy()
        if self.opt == "adam":
            s["v"] = z.copy()
        return s

    def build(self, c):
        S = c.S
        u, m, v = _direction(self.opt, c.g, S["t"], S.get("m"), S.get("v"), self.mu, self.b1, self.b2, self.eps)
        upd = {"t": S["t"] + 1}
        if m is not None:
            upd["m"] = m
        if v is not None:
            upd["v"] = v
        return c.w - self.lr * u, upd, {}

    def lr_of(self, a):
        return self.lr


class HD(_FixedL2, Method):
    """SGD-HD / SGDN-HD / Adam-HD (Baydin et al. 2018); state: t, hyper (alpha or log alpha per
    group), u (u_{t-1}), m, v (moments), hg (last hypergradient wrt hyper), n_projected."""

    def __init__(self, layout, optimizer="sgd", lr=1e-3, beta=1e-3, granularity="global", log_space=False,
                 l2=0.0, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8, clip=None, lr_min=1e-12):
        if optimizer not in PLAIN_NAMES:
            raise ConfigError(f"optimizer must be one of {', '.join(PLAIN_NAMES)}, got {optimizer!r}")
        lr = _check_positive("initial learning rate", lr)
        beta = _check_meta_step("beta", beta)
        clip = _check_clip(clip)
        _check_moments(momentum, b1, b2, eps)
        if not (np.isfinite(lr_min) and lr_min > 0):
            raise ConfigError(f"lr_min must be finite and > 0, got {lr_min!r}")
        self.gr = Grouping(layout, granularity)
        name = {"sgd": "hd", "sgdn": "sgdn-hd", "adam": "adam-hd"}[optimizer]
        super().__init__(layout, dict(optimizer=optimizer, lr=np.asarray(lr).tolist(), beta=beta,
                                      granularity=self.gr.kind, log_space=bool(log_space), momentum=momentum,
                                      b1=b1, b2=b2, eps=eps, clip=clip, lr_min=lr_min))
        self.name, self.opt, self.lr0, self.beta, self.log_space = name, optimizer, lr, beta, bool(log_space)
        self.mu, self.b1, self.b2, self.eps, self.clip, self.lr_min = momentum, b1, b2, eps, clip, float(lr_min)
        self._set_l2(l2)

    def init(self, w0):
        gr = self.gr
        h0 = np.full(gr.n, float(self.lr0)) if np.ndim(self.lr0) == 0 else np.asarray(self.lr0, float).copy()
        if h0.shape != (gr.n,):
            raise ConfigError(f"initial learning rate: expected a number or {gr.n} values, got shape {h0.shape}")
        z = np.zeros_like(w0)
        s = OrderedDict(t=np.int64(0), hyper=np.log(h0) if self.log_space else h0, u=z.copy(),
                        hg=np.zeros(gr.n), n_projected=np.int64(0), l2=self._l2_state())
        if self.opt != "sgd":
            s["m"] = z.copy()
        if self.opt == "adam":
            s["v"] = z.copy()
        return s

    def lr_update(self, c: Ctx, S):
        """(new hyper, alpha per group, hg, n_projected) of step t (shared with ``combined``)."""
        gr = self.gr
        hg = -gr.reduce(c.g * S["u"])                        # dL(w_t)/dalpha_{t-1}
        if self.log_space:
            hg = hg * T.exp(S["hyper"])                       # dL/dlog alpha
        hg = _clip(hg, self.clip)
        hyper = S["hyper"] - self.beta * hg
        n_proj = S["n_projected"]
        if self.log_space:
            alpha = T.exp(hyper)
        else:
            low = T.lt(hyper, self.lr_min)
            n_proj = n_proj + T.cast(T.any(low), "int64")
            hyper = T.maximum(hyper, self.lr_min)
            alpha = hyper
        return hyper, alpha, hg, n_proj

    def build(self, c):
        S = c.S
        hyper, alpha, hg, n_proj = self.lr_update(c, S)
        u, m, v = _direction(self.opt, c.g, S["t"], S.get("m"), S.get("v"), self.mu, self.b1, self.b2, self.eps)
        upd = {"t": S["t"] + 1, "hyper": hyper, "u": u, "hg": hg, "n_projected": n_proj}
        if m is not None:
            upd["m"] = m
        if v is not None:
            upd["v"] = v
        return c.w - self.gr.expand(alpha) * u, upd, {"learning-rate hypergradient": T.sum(hg)}

    def alpha_np(self, a):
        return np.exp(a["hyper"]) if self.log_space else a["hyper"]

    def lr_of(self, a):
        return self.gr.expand_np(self.alpha_np(a))


class Almeida(_FixedL2, Method):
    """Almeida et al. (1998): per-parameter multiplicative rates, normalised by a running g^2."""
    name = "almeida"

    def __init__(self, layout, lr=1e-3, beta=1e-2, gamma=0.99, l2=0.0, clip=None):
        lr = float(_check_positive("initial learning rate", lr))
        beta = _check_meta_step("beta", beta)
        gamma = _check_decay("gamma", gamma)
        clip = _check_clip(clip)
        super().__init__(layout, dict(lr=lr, beta=beta, gamma=gamma, clip=clip))
        self.lr, self.beta, self.gamma, self.clip = lr, beta, gamma, clip
        self._set_l2(l2)

    def init(self, w0):
        z = np.zeros_like(w0)
        return OrderedDict(t=np.int64(0), hyper=np.full(w0.shape, self.lr), u=z.copy(), v=z.copy(), hg=z.copy(),
                           l2=self._l2_state())

    def build(self, c):
        S, g = c.S, c.g
        v = T.switch(T.gt(S["t"], 0), self.gamma * S["v"] + (1.0 - self.gamma) * g * g, g * g)
        hg = _clip(-g * S["u"], self.clip)
        alpha = S["hyper"] * T.maximum(0.5, 1.0 - self.beta * hg / (v + _tiny()))
        upd = {"t": S["t"] + 1, "hyper": alpha, "u": g, "v": v, "hg": hg}
        return c.w - alpha * g, upd, {"learning-rate hypergradient": T.sum(hg)}

    def lr_of(self, a):
        return a["hyper"]


class IDBD(_FixedL2, Method):
    """IDBD (Sutton 1992) with per-parameter log step sizes; ``curvature`` diag or hvp (cpu_ver)."""
    name = "idbd"
    trace = "h"

    def __init__(self, layout, lr=1e-3, theta=1e-2, trace_decay=1.0, curvature="diag", l2=0.0, clip=None):
        lr = _check_positive("initial learning rate", lr)
        theta = _check_meta_step("theta", theta)
        decay = _check_decay("trace_decay", trace_decay)
        clip = _check_clip(clip)
        if curvature not in ("diag", "hvp"):
            raise ConfigError(f"idbd curvature must be 'diag' or 'hvp', got {curvature!r}")
        super().__init__(layout, dict(lr=np.asarray(lr).tolist(), theta=theta, trace_decay=decay,
                                      curvature=curvature, clip=clip))
        self.lr, self.theta, self.decay, self.curvature, self.clip = lr, theta, decay, curvature, clip
        self.hvp_of = "h" if (curvature == "hvp" and decay > 0) else None
        self._set_l2(l2)

    def init(self, w0):
        z = np.zeros_like(w0)
        return OrderedDict(t=np.int64(0), hyper=np.log(np.broadcast_to(np.asarray(self.lr, float), w0.shape)).copy(),
                           h=z.copy(), u=z.copy(), hg=z.copy(), l2=self._l2_state())

    def build(self, c):
        S, g, h = c.S, c.g, c.S["h"]
        hg = _clip(g * h, self.clip)
        b = S["hyper"] - self.theta * hg                  # beta_t
        alpha = T.exp(b)
        step = alpha * g
        if self.hvp_of is not None:
            h_new = self.decay * (h - alpha * c.hv) - step
        else:                                              # diagonal approximation: no curvature term
            h_new = self.decay * h - step
        upd = {"t": S["t"] + 1, "hyper": b, "h": h_new, "u": g, "hg": hg}
        return c.w - step, upd, {"IDBD hypergradient": T.sum(hg)}

    def lr_of(self, a):
        return np.exp(a["hyper"])


class SMD(_FixedL2, Method):
    """Stochastic meta-descent (Schraudolph 1999, 2002) with its Hessian-vector-product trace."""
    name = "smd"
    trace = "v"

    def __init__(self, layout, lr=1e-3, mu=1e-2, lam=0.99, l2=0.0, clip=None):
        lr = _check_positive("initial learning rate", lr)
        mu = _check_meta_step("mu", mu)
        lam = _check_decay("lambda", lam)
        clip = _check_clip(clip)
        super().__init__(layout, dict(lr=np.asarray(lr).tolist(), mu=mu, lam=lam, clip=clip))
        self.lr, self.mu, self.lam, self.clip = lr, mu, lam, clip
        self.hvp_of = "v" if lam > 0 else None
        self._set_l2(l2)

    def init(self, w0):
        z = np.zeros_like(w0)
        return OrderedDict(t=np.int64(0), p=np.broadcast_to(np.asarray(self.lr, float), w0.shape).copy(),
                           v=z.copy(), u=z.copy(), hg=z.copy(), l2=self._l2_state())

    def build(self, c):
        S, g, v = c.S, c.g, c.S["v"]
        hg = _clip(g * v, self.clip)
        p = S["p"] * T.maximum(0.5, 1.0 - self.mu * hg)
        step = p * g
        v_new = self.lam * (v - p * c.hv) - step if self.lam > 0 else -step
        upd = {"t": S["t"] + 1, "p": p, "v": v_new, "u": g, "hg": hg}
        return c.w - step, upd, {"SMD hypergradient": T.sum(hg)}

    def lr_of(self, a):
        return a["p"]


class _Reg:
    """T1-T2 regulariser part (shared by ``t1t2`` and ``combined``); state keys prefixed ``r_``."""

    def __init__(self, layout, l2_init, l2_groups, meta_lr, every, at, clip, meta_opt, b1=0.9, b2=0.999, eps=1e-8,
                 l2_on="all"):
        self.meta_lr = _check_meta_step("meta_lr", meta_lr)
        self.l2_on = check_coverage(l2_on, "l2_on")
        self.mask = coverage_mask(layout, l2_on)      # None: every parameter (shared.coverage)
        if not isinstance(every, (int, np.integer)) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"hyper-step interval must be an integer >= 1, got {every!r}")
        if at not in ("next", "current"):
            raise ConfigError(f"T1-T2: 'at' must be 'next' (exact, w_t+1) or 'current' (w_t), got {at!r}")
        if meta_opt not in ("adam", "sgd"):
            raise ConfigError(f"T1-T2 meta optimiser must be 'adam' or 'sgd', got {meta_opt!r}")
        self.gr = Grouping(layout, l2_groups)
        self.every, self.at, self.clip, self.meta_opt = int(every), at, _check_clip(clip), meta_opt
        self.b1, self.b2, self.eps = b1, b2, eps
        l2_init = np.asarray(l2_init, float)
        _check_positive("initial L2 strength (log space)", l2_init)
        self.l2_init = l2_init

    def init(self):
        s = np.log(np.broadcast_to(self.l2_init, (self.gr.n,))).copy()
        z = np.zeros(self.gr.n)
        return OrderedDict(r_t=np.int64(0), r_s=s, r_hg=z.copy(), r_m=z.copy(), r_v=z.copy(), r_k=np.int64(0))

    def _masked(self, x):
        return x if self.mask is None else x * T.constant(np.asarray(self.mask, _fx()))

    def l2_expr(self, S):
        return self._masked(self.gr.expand(T.exp(S["r_s"])))

    def l2_of(self, a):
        l2 = self.gr.expand_np(np.exp(a["r_s"]))
        return l2 if self.mask is None else l2 * self.mask

    def build(self, c: Ctx, w_new, eta):
        """Updates of the regulariser state after w_{t+1} = w_t - eta g_t."""
        S, w = c.S, c.w
        if c.val_grad is None:
            raise ConfigError("T1-T2 needs a validation batch; the validation split is empty?")

        def hyper_step():
            gv = c.val_grad(w_new if self.at == "next" else w)
            hg = _clip(self.gr.reduce(self._masked(-2.0 * (eta * gv) * w)) * T.exp(S["r_s"]), self.clip)
            m, v, k = S["r_m"], S["r_v"], S["r_k"]
            if self.meta_opt == "adam":
                m = self.b1 * m + (1 - self.b1) * hg
                v = self.b2 * v + (1 - self.b2) * hg * hg
                kp = _tf(k) + 1.0
                step = (m / (1 - self.b1 ** kp)) / (T.sqrt(v / (1 - self.b2 ** kp)) + self.eps)
            else:
                step = hg
            return [S["r_s"] - self.meta_lr * step, hg, m, v, k + 1]

        new = hyper_step()
        if self.every > 1:
            cond = T.eq((S["r_t"] + 1) % self.every, 0)
            new = ifelse(cond, new, [S["r_s"], S["r_hg"], S["r_m"], S["r_v"], S["r_k"]])
        upd = dict(zip(("r_s", "r_hg", "r_m", "r_v", "r_k"), new))
        upd["r_t"] = S["r_t"] + 1
        return upd, {"L2 hypergradient": T.sum(upd["r_hg"]), "log L2 strength": T.sum(upd["r_s"])}


class T1T2(Method):
    """T1-T2 (Luketina et al. 2016): plain SGD on the training loss, per-group log L2 strengths
    from the validation loss through the last update (exact one-step for at='next')."""
    name = "t1t2"
    needs_val = True

    def __init__(self, layout, lr=0.1, l2_init=1e-4, l2_groups="block", meta_lr=1e-2, every=1, at="next",
                 clip=None, meta_opt="adam", l2_on="all"):
        lr = float(_check_positive("learning rate", lr))
        self.reg = _Reg(layout, l2_init, l2_groups, meta_lr, every, at, clip, meta_opt, l2_on=l2_on)
        super().__init__(layout, dict(lr=lr, l2_init=np.asarray(l2_init).tolist(), l2_groups=self.reg.gr.kind,
                                      meta_lr=self.reg.meta_lr, every=self.reg.every, at=at, clip=self.reg.clip,
                                      meta_opt=meta_opt, l2_on=l2_on))
        self.lr = lr

    def init(self, w0):
        return self.reg.init()

    def l2_expr(self, S):
        return self.reg.l2_expr(S)

    def build(self, c):
        w_new = c.w - self.lr * c.g
        upd, mon = self.reg.build(c, w_new, self.lr)
        return w_new, upd, mon

    def lr_of(self, a):
        return self.lr

    def l2_of(self, a):
        return self.reg.l2_of(a)

    def step_of(self, a):
        return int(a["r_t"])


class Combined(Method):
    """Log-space SGD-HD rates and T1-T2 log L2 strengths adapted together (cpu_ver ``combined``)."""
    name = "combined"
    needs_val = True

    def __init__(self, layout, lr=1e-2, beta=1e-2, lr_granularity="param", l2_init=1e-4, l2_groups="param",
                 meta_lr=1e-2, every=1, at="next", clip=None, meta_opt="adam", l2_on="all"):
        self.reg = _Reg(layout, l2_init, l2_groups, meta_lr, every, at, clip, meta_opt, l2_on=l2_on)
        self.hd = HD(layout, "sgd", lr, beta, lr_granularity, log_space=True, clip=clip)
        super().__init__(layout, dict(lr=np.asarray(lr).tolist(), beta=self.hd.beta,
                                      lr_granularity=self.hd.gr.kind, log_space=True,
                                      l2_init=np.asarray(l2_init).tolist(), l2_groups=self.reg.gr.kind,
                                      meta_lr=self.reg.meta_lr, every=self.reg.every, at=at, clip=self.reg.clip,
                                      meta_opt=meta_opt, l2_on=l2_on))

    def init(self, w0):
        s = self.hd.init(w0)
        del s["l2"]
        s.update(self.reg.init())
        return s

    def l2_expr(self, S):
        return self.reg.l2_expr(S)

    def build(self, c):
        S = c.S
        hyper, alpha, hg, n_proj = self.hd.lr_update(c, S)
        eta = self.hd.gr.expand(alpha)
        w_new = c.w - eta * c.g
        upd = {"t": S["t"] + 1, "hyper": hyper, "u": c.g, "hg": hg, "n_projected": n_proj}
        r_upd, mon = self.reg.build(c, w_new, eta)
        upd.update(r_upd)
        mon["learning-rate hypergradient"] = T.sum(hg)
        return w_new, upd, mon

    def lr_of(self, a):
        return self.hd.lr_of(a)

    def l2_of(self, a):
        return self.reg.l2_of(a)


def make_method(name, layout: ParamLayout, **kw) -> Method:
    """Build method ``name`` (``METHOD_NAMES`` or ``PLAIN_NAMES``) with cpu_ver's keyword options."""
    if name in PLAIN_NAMES:
        return Plain(layout, name, **kw)
    if name in ("hd", "sgd-hd"):
        return HD(layout, "sgd", **kw)
    if name == "sgdn-hd":
        return HD(layout, "sgdn", **kw)
    if name == "adam-hd":
        return HD(layout, "adam", **kw)
    builders = {"almeida": Almeida, "idbd": IDBD, "smd": SMD, "t1t2": T1T2, "combined": Combined}
    if name not in builders:
        raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(METHOD_NAMES + PLAIN_NAMES)}")
    return builders[name](layout, **kw)


# ---------------------------------------------------------------------------
# A run: shared state + one compiled step

def _like(v, var):
    """``v`` cast to the dtype and broadcast pattern of shared variable ``var`` (an update's type)."""
    v = T.cast(v, var.dtype)
    axes = [i for i, (a, b) in enumerate(zip(v.broadcastable, var.broadcastable)) if a and not b]
    # the Op itself: T.unbroadcast's lift optimisation crashes on a fresh Elemwise in Theano-PyMC 1.1.2
    return T.Rebroadcast(*[(i, False) for i in axes])(v) if axes else v


_FUNCTIONS = {}


def _model_functions(model) -> "M.Functions":
    """One ``models.Functions`` per model (its compiled evaluation is shared by all runs)."""
    if model not in _FUNCTIONS:
        _FUNCTIONS[model] = M.Functions(model)
    return _FUNCTIONS[model]


def _bn_hw(model):
    return [u[3] for u in model.plan() if u[0] == "bn"] if getattr(model, "n_bn", 0) else []


class OnlineRun:
    """Weights, method state and BN running averages in shared variables; ``step`` compiled once.

    ``step(X, y, Xv=None, yv=None) -> dict(loss, nll, n_err)``: one update
    (loss and CE at the pre-update weights, L2 term included in ``loss``);
    raises NonFiniteError naming the quantity and the step. ``evaluate(X, y)``
    -> (mean CE, error rate) at the current weights with the BN running
    averages (one compiled ``models.Functions.logits`` per model, shared by runs).
    """

    def __init__(self, model, method: Method, w0, bn_momentum=BN_MOMENTUM, name=None, mode=None):
        fx = _fx()
        self.model, self.method, self.fx, self.mode = model, method, fx, mode
        self.w = theano.shared(np.asarray(w0, fx), name="w")
        self._init = method.init(np.asarray(w0, float))
        self.S = OrderedDict()
        for k, v in self._init.items():
            a = np.asarray(v)
            self.S[k] = theano.shared(a if a.dtype.kind == "i" else a.astype(fx), name=k)
        self.bn = [(theano.shared(np.zeros(ch, fx), name=f"bn{i}.mean"),
                    theano.shared(np.ones(ch, fx), name=f"bn{i}.var"))
                   for i, ch in enumerate(getattr(model, "bn_channels", ()))]
        self._warned = False
        self._fn, self._mon_names = self._compile(bn_momentum, name or method.name)

    @property
    def function(self):
        """The compiled Theano function of one step (for ``gpu_ver.hostops``)."""
        return self._fn

    # graph -------------------------------------------------------------------------
    def _compile(self, bn_momentum, name):
        m, meth, S, w = self.model, self.method, self.S, self.w
        X, y = m.input_var("X"), T.lvector("y")
        l2 = meth.l2_expr(S)
        blocks = M.split(w, m.layout)
        logits, stats = m.forward(blocks, X, None)
        nll = M.cross_entropy(logits, y)
        gb = M.grad(nll, blocks)
        g = M.flat(gb) + 2 * l2 * w
        hv = None
        if meth.hvp_of is not None:
            vec = S[meth.hvp_of]
            vb = M.split(vec, m.layout)
            hv = M.flat(M.grad(M.block_dot(gb, vb), blocks)) + 2 * l2 * vec
        ins = [X, y]
        val_grad = None
        if meth.needs_val:
            Xv, yv = m.input_var("Xv"), T.lvector("yv")
            ins += [Xv, yv]

            def val_grad(wv):
                bv = M.split(wv, m.layout)
                lv, _ = m.forward(bv, Xv, None)
                return M.flat(M.grad(M.cross_entropy(lv, yv), bv))
        w_new, upd, mon = meth.build(Ctx(S, w, g, hv, val_grad))
        loss = nll + T.sum(l2 * T.sqr(w))
        n_err = T.neq(T.argmax(logits, axis=1), y).sum()
        updates = [(w, w_new)] + [(S[k], _like(v, S[k])) for k, v in upd.items()]
        for (rm, rv), (mu, var), (H, W) in zip(self.bn, stats, _bn_hw(m)):
            n = X.shape[0] * H * W
            unbiased = var * T.cast(n, var.dtype) / T.cast(n - 1, var.dtype)
            updates += [(rm, (1 - bn_momentum) * rm + bn_momentum * mu),
                        (rv, (1 - bn_momentum) * rv + bn_momentum * unbiased)]
        mon = OrderedDict(mon)
        mon["weights"] = T.sum(w_new)
        outs = [loss, nll, n_err] + list(mon.values())
        if "n_projected" in upd:
            outs.append(upd["n_projected"])
        fn = fncache.function(ins, outs, updates=updates, name=f"{name}_step", mode=self.mode)
        return fn, list(mon)

    # host API ----------------------------------------------------------------------
    def _in(self, X):
        X = np.asarray(X, self.fx)
        return X.reshape(len(X), -1) if getattr(self.model, "n_bn", 0) == 0 and X.ndim > 2 else X

    @property
    def t(self) -> int:
        return self.method.step_of({k: v.get_value() for k, v in self.S.items() if k in ("t", "r_t")})

    def step(self, X, y, Xv=None, yv=None) -> dict:
        t = self.t
        args = [self._in(X), np.asarray(y, np.int64)]
        if self.method.needs_val:
            if Xv is None or len(yv) == 0:
                raise ConfigError(f"{self.method.name}: needs a validation batch (the validation split is empty?)")
            args += [self._in(Xv), np.asarray(yv, np.int64)]
        outs = self._fn(*args)
        loss, nll, n_err = float(outs[0]), float(outs[1]), int(outs[2])
        check_finite("training loss", loss, t)
        for what, s in zip(self._mon_names, outs[3:3 + len(self._mon_names)]):
            if not np.isfinite(s):
                if what == "weights":
                    check_finite("weights", self.w.get_value(borrow=True), t)   # the sum may merely overflow
                else:
                    raise NonFiniteError(what, t)
        if len(outs) > 3 + len(self._mon_names) and int(outs[-1]) > 0 and not self._warned:
            self._warned = True
            warnings.warn(f"{self.method.name}: step {t}: learning rate(s) went below "
                          f"lr_min={self.method.config.get('lr_min', 1e-12):g} and were projected onto it "
                          f"(counted in state n_projected)", RuntimeWarning, stacklevel=2)
        return {"loss": loss, "nll": nll, "n_err": n_err}

    def weights(self) -> np.ndarray:
        return np.asarray(self.w.get_value(), np.float64)

    def state(self) -> dict:
        """The method's state as numpy arrays (float64 for floats)."""
        out = {}
        for k, v in self.S.items():
            a = np.asarray(v.get_value())
            out[k] = a if a.dtype.kind == "i" else a.astype(np.float64)
        return out

    def set_state(self, w=None, **arrays) -> None:
        if w is not None:
            self.w.set_value(np.asarray(w, self.fx))
        for k, a in arrays.items():
            var = self.S[k]
            var.set_value(np.asarray(a, var.dtype))

    def _checkpoint_vars(self) -> dict:
        """Everything ``step`` reads and writes: weights ``w``, method state ``S.<name>``,
        BN running averages ``bn<i>.mean``/``bn<i>.var``."""
        return {"w": self.w, **{f"S.{k}": v for k, v in self.S.items()},
                **{v.name: v for pair in self.bn for v in pair}}

    def get_arrays(self) -> dict:
        """The values of ``_checkpoint_vars`` as stored: a checkpoint."""
        return {k: v.get_value() for k, v in self._checkpoint_vars().items()}

    def set_arrays(self, arrays: dict) -> None:
        """Restore ``get_arrays``'s output (every entry must be present with its shape)."""
        for key, var in self._checkpoint_vars().items():
            if key not in arrays:
                raise ConfigError(f"checkpoint has no array {key!r}")
            a, cur = np.asarray(arrays[key]), var.get_value()
            if a.shape != np.shape(cur):
                raise ConfigError(f"checkpoint array {key!r} has shape {a.shape}, expected {np.shape(cur)}")
            var.set_value(a.astype(np.asarray(cur).dtype))

    def reset(self) -> None:
        """Back to the initial state (weights kept as they are)."""
        self.set_state(**self._init)

    def reset_trace(self) -> None:
        """Zero the IDBD/SMD trace (so the next hypergradient is exactly one-step)."""
        if self.method.trace is not None:
            self.set_state(**{self.method.trace: np.zeros(self.model.layout.size)})

    def lr(self):
        return self.method.lr_of(self.state())

    def l2(self):
        return self.method.l2_of(self.state())

    def bn_values(self) -> list:
        return [(a.get_value(), b.get_value()) for a, b in self.bn]

    def evaluate(self, X, y, batch=500) -> tuple:
        """(mean CE, error rate) at the current weights, BN running averages."""
        n = len(y)
        if n == 0:
            return float("nan"), float("nan")
        fns = _model_functions(self.model)
        w, bn = self.weights(), (self.bn_values() if self.bn else None)
        ce, err = 0.0, 0
        for a in range(0, n, batch):
            z = fns.logits(w, self._in(X[a:a + batch]), bn)
            yb = np.asarray(y[a:a + batch], np.int64)
            zm = z - z.max(axis=1, keepdims=True)
            logp = zm - np.log(np.exp(zm).sum(axis=1, keepdims=True))
            ce -= float(logp[np.arange(len(yb)), yb].sum())
            err += int(np.count_nonzero(np.argmax(z, axis=1) != yb))
        return ce / n, err / n


# ---------------------------------------------------------------------------
# The check problem (mirror of cpu_ver's, numpy only)

def _check_float64():
    if _fx() != "float64":
        raise ConfigError(f"the hypergradient checks need floatX=float64 (Theano was loaded with {_fx()}); "
                          f"use --floatX float64 or HPO_FLOATX=float64")


def _functions(sizes, activation):
    return _model_functions(M.MLP(tuple(sizes), activation))


@functools.lru_cache(maxsize=None)
def _check_run(name, sizes, activation):
    """A compiled OnlineRun for CHECK_CONFIGS[name] (or a trace check) on the check MLP; cached
    so that check_all and crosscheck_adaptive in one process compile each step once."""
    model = M.MLP(sizes, activation)
    n = model.layout.size
    l2 = np.full(n, 1e-2)          # replaced by the problem's l2 before use (shapes only here)
    if name == TRACE_NAMES[0]:
        method = make_method("smd", model.layout, lr=0.2, mu=0.0, lam=1.0, l2=l2)
    elif name == TRACE_NAMES[1]:
        method = make_method("idbd", model.layout, lr=0.2, theta=0.0, trace_decay=1.0, curvature="hvp", l2=l2)
    else:
        method_name, kw = CHECK_CONFIGS[name]
        kw = dict(kw)
        if method_name not in ("t1t2", "combined"):
            kw["l2"] = l2
        method = make_method(method_name, model.layout, **kw)
    return OnlineRun(model, method, model.init(0), name=name.replace("-", "_"))


def _prepared_run(name, p: CheckProblem) -> OnlineRun:
    run = _check_run(name, tuple(p.sizes), p.activation)
    run.set_state(w=p.w0)
    run.reset()
    if "l2" in run.S:
        run.set_state(l2=p.l2)
    return run


def _b(p, t):
    i = p.batches[t]
    return p.X[i], p.y[i]


def _vb(p, t):
    i = p.val_batches[t]
    return p.Xv[i], p.yv[i]


def _lr_view(method: Method, a):
    """(free hyperparameter used by the last step, map free -> per-group rate, grouping)."""
    if isinstance(method, Combined):
        return a["hyper"], np.exp, method.hd.gr
    if isinstance(method, HD):
        return a["hyper"], (np.exp if method.log_space else (lambda h: h)), method.gr
    param = Grouping(method.layout, "param")
    if isinstance(method, IDBD):
        return a["hyper"], np.exp, param
    if isinstance(method, SMD):
        return np.log(a["p"]), np.exp, param
    if isinstance(method, Almeida):
        return a["hyper"], (lambda h: h), param
    raise ConfigError(f"method {method.name!r} has no learning-rate view")


def reference_onestep(name, problem: CheckProblem, with_loss=True) -> dict:
    """This backend's one-step hypergradients ``{part: OneStep}`` of ``CHECK_CONFIGS[name]``:
    ``CHECK_WARMUP`` compiled steps, trace reset, the checked step on batch t (its T1-T2 hyper
    step gives the ``l2`` part), one more step on batch t + 1 (its hypergradient, computed at
    w_{t+1}, gives the ``lr`` part) - all values read from the shared state, as cpu_ver's
    ``reference_onestep`` defines them. ``with_loss``: build the FD closures (compiled
    ``models.Functions``)."""
    p = problem
    run = _prepared_run(name, p)
    method = run.method
    for t in range(CHECK_WARMUP):
        run.step(*_b(p, t), *_vb(p, t))
    run.reset_trace()
    t = CHECK_WARMUP
    w, a0 = run.weights(), run.state()
    run.step(*_b(p, t), *_vb(p, t))
    a1 = run.state()
    fns = _functions(tuple(p.sizes), p.activation) if with_loss else None
    out = {}
    if isinstance(method, (T1T2, Combined)):
        if int(a1["r_k"]) == int(a0["r_k"]):
            raise ConfigError("reference_onestep: the method must take a hyper step every step (every=1)")
        gr = method.reg.gr
        eta = method.lr_of(a1) if isinstance(method, Combined) else method.lr
        Xb, yb = _b(p, t)
        Xv, yv = _vb(p, t)
        use_next = method.reg.at == "next"
        cache = {}

        def l2_loss(s):
            if "g" not in cache:
                cache["g"] = fns.nll_grad(w, Xb, yb)
                cache["gv"] = None if use_next else fns.nll_grad(w, Xv, yv)
            l2 = gr.expand_np(np.exp(s)) * (1.0 if method.reg.mask is None else method.reg.mask)
            wn = w - eta * (cache["g"] + 2.0 * l2 * w)
            return fns.nll(wn, Xv, yv) if use_next else float(np.dot(cache["gv"], wn))
        out["l2"] = OneStep(a1["r_hg"], a0["r_s"].copy(), l2_loss)
        if isinstance(method, T1T2):
            return out
    free, to_lr, gr = _lr_view(method, a1)
    u = a1["u"]
    l2 = method.l2_of(a1)
    Xn, yn = _b(p, t + 1)

    def lr_loss(h):
        return fns.loss(w - gr.expand_np(to_lr(h)) * u, l2, Xn, yn)

    run.step(*_b(p, t + 1), *_vb(p, t))
    a2 = run.state()
    out["lr"] = OneStep(a2["hg"], np.array(free, float).copy(), lr_loss)
    return out


def trace_hypergradient(problem: CheckProblem, horizon=TRACE_HORIZON, method_name="smd") -> OneStep:
    """SMD's (or IDBD-hvp's) Hessian-vector-product trace over ``horizon`` steps with fixed gains
    (mu = theta = 0, no decay): sum(hg) at step horizon + 1 is the derivative of L(w_K; B_K)
    along log p + c 1 (cpu_ver.adaptive.trace_hypergradient). Returns a OneStep over c."""
    if horizon != TRACE_HORIZON:
        raise ConfigError(f"trace check horizon is fixed at {TRACE_HORIZON}")
    p = problem
    name = TRACE_NAMES[0] if method_name == "smd" else TRACE_NAMES[1]
    run = _prepared_run(name, p)
    init = run.state()

    def go(c, k):
        run.set_state(w=p.w0, **init)
        if method_name == "smd":
            run.set_state(p=init["p"] * np.exp(c))
        else:
            run.set_state(hyper=init["hyper"] + c)
        for t in range(k):
            run.step(*_b(p, t))
        return run.weights()

    go(0.0, horizon + 1)
    value = np.array([np.sum(run.state()["hg"])])
    fns = _functions(tuple(p.sizes), p.activation)

    def loss(c):
        w = go(float(c[0]), horizon)
        return fns.loss(w, p.l2, *_b(p, horizon))

    return OneStep(value, np.zeros(1), loss)


def reference_hypergradients(seed=0) -> dict:
    """``name -> {part: hypergradient}`` on ``build_check_problem(seed)`` for every
    ``CHECK_CONFIGS`` entry and the two trace checks (this backend's numbers)."""
    _check_float64()
    problem = build_check_problem(seed)
    out = {name: {k: v.value for k, v in reference_onestep(name, problem, with_loss=False).items()}
           for name in CHECK_CONFIGS}
    out[TRACE_NAMES[0]] = {"lr": trace_hypergradient(problem, method_name="smd").value}
    out[TRACE_NAMES[1]] = {"lr": trace_hypergradient(problem, method_name="idbd").value}
    return out


def check_all(tol=1e-6, seed=0) -> dict:
    """``method -> max relative error`` of this backend's one-step hypergradients against central
    finite differences (float64 check MLP). ``tol`` is not applied here; the caller compares."""
    _check_float64()
    problem = build_check_problem(seed)
    errs = {}
    for name in CHECK_CONFIGS:
        errs[name] = max(fd_check(o, seed) for o in reference_onestep(name, problem).values())
    errs[TRACE_NAMES[0]] = fd_check(trace_hypergradient(problem, method_name="smd"), seed)
    errs[TRACE_NAMES[1]] = fd_check(trace_hypergradient(problem, method_name="idbd"), seed)
    return errs


def unexpected_host_ops(seed=0) -> dict:
    """``method -> sorted host ops`` (``gpu_ver.hostops.unexpected``) of the compiled step of
    every ``CHECK_CONFIGS`` method on the check MLP, for the methods that have any: empty on a
    GPU device when every update stays there (meaningless on the C backend, where all is host)."""
    from gpu_ver import hostops  # noqa: PLC0415

    problem, out = build_check_problem(seed), {}
    for name in CHECK_CONFIGS:
        bad = sorted({h.text for h in hostops.unexpected(_prepared_run(name, problem).function)})
        if bad:
            out[name] = bad
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def crosscheck_adaptive(seed=0) -> dict:
    """``method -> max relative difference`` between this backend's one-step hypergradients and
    cpu_ver's ``reference_hypergradients(seed)`` on the same float64 problem: per part,
    max|gpu - cpu| / max|cpu| (so a near-zero entry does not blow up), maximised over parts.
    Both backends build the problem from ``shared.online``."""
    _check_float64()
    from cpu_ver import adaptive as cad  # noqa: PLC0415 (cpu_ver only here)

    ref = cad.reference_hypergradients(seed)
    mine = reference_hypergradients(seed)
    out = {}
    for name, parts in ref.items():
        if name not in mine:
            continue
        if set(parts) != set(mine[name]):
            out[name] = float("inf")
            continue
        out[name] = max(_rel(mine[name][k], parts[k]) for k in parts)
    return out


# ---------------------------------------------------------------------------
# A training run with curves and hyperparameter trajectories

QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def block_quantiles(layout: ParamLayout, values, quantiles=QUANTILES) -> list:
    """Per block, the quantiles of per-parameter ``values`` (a number: the same row for every block)."""
    if np.ndim(values) == 0:
        return [[float(values)] * len(quantiles) for _ in layout.names]
    v = np.asarray(values)
    return [np.quantile(v[layout.slice(b)], quantiles).tolist() for b in range(layout.n_blocks)]


def train_online(method: Method, model, data, steps, batch_size, seed=0, eval_every=10, eval_train_n=None,
                 record_hypers=True, progress=False, desc=None, eval_batch=500, w0=None,
                 checkpoint=None, checkpoint_every=0, identity=None, resume=None, stop_after=None):
    """Train ``model`` with ``method`` for ``steps`` minibatch steps; return (curves, run).

    ``data = (X, y, Xv, yv)``; batches as cpu_ver (``batch_indices(n, batch, seed, t)``; the
    validation batch of step t with seed + 1). Every ``eval_every`` steps (and at 0 and
    ``steps``): training CE (first ``eval_train_n`` examples), validation CE and error (BN
    running averages), and per-block quantiles of learning rates and L2 strengths. Also
    records the mean training-batch loss per interval (``batch_loss``) and timings.

    Checkpoints: with a ``checkpoint`` path, the run's arrays (``OnlineRun.get_arrays``),
    the curves so far and ``identity`` (a dict naming the run) are written there
    atomically every ``checkpoint_every`` steps (0: never in between), when the loop ends
    and when SIGINT/SIGTERM stops it (``shared.interrupt``: only between two steps, never
    after a compiled step has updated the shared variables but before it was counted). ``resume = (arrays, meta)`` from ``load_checkpoint``
    continues from the step it holds; the curves and the state then equal an
    uninterrupted run's bit for bit (minibatches are a function of (seed, t)).
    ``stop_after``: stop once this many steps are done, as an interruption would.
    The returned curves carry ``steps_done``.
    """
    import time

    from shared.datasets import batch_indices
    from shared.interrupt import check as check_interrupt
    from shared.interrupt import checkpointed
    from shared.records import save_checkpoint

    X, y, Xv, yv = data
    check_validation_split(method.name, method.needs_val, len(yv))
    if batch_size < 1 or batch_size > len(y):
        raise ConfigError(f"batch size must be in 1..{len(y)} (training examples), got {batch_size}")
    if steps < 1 or eval_every < 1:
        raise ConfigError("steps and eval_every must be >= 1")
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    layout = model.layout
    t0, before = time.perf_counter(), spent_before(resume)
    run = OnlineRun(model, method, model.init(seed) if w0 is None else w0)
    compile_s = time.perf_counter() - t0
    Xe, ye = (X, y) if eval_train_n is None else (X[:eval_train_n], y[:eval_train_n])
    vb = min(batch_size, len(yv)) if len(yv) else 0
    curves = {"step": [], "train_loss": [], "val_loss": [], "val_error": [], "batch_loss": []}
    hyp = {"lr_quantiles": [], "l2_quantiles": []}
    acc = []
    start = 0
    if resume is not None:
        start = restore_curves(resume, steps, curves, hyp, record_hypers)
        arrays = resume[0]
        run.set_arrays({k[4:]: v for k, v in arrays.items() if k.startswith("run/")})
        acc = arrays["acc"].tolist()

    def save(step):
        if checkpoint is None:
            return
        arrays = {f"run/{k}": v for k, v in run.get_arrays().items()}
        arrays.update(curve_arrays(curves, hyp, record_hypers), acc=np.asarray(acc, float))
        save_checkpoint(checkpoint, arrays, {**(identity or {}), "step": step,
                                             "spent_s": before + time.perf_counter() - t0})

    def record(t):
        """Evaluate first, then append everything (an interruption leaves no half record)."""
        tl, _ = run.evaluate(Xe, ye, eval_batch)
        check_loss("training loss", tl, t)
        vl, ve = run.evaluate(Xv, yv, eval_batch)
        row = {"step": t, "train_loss": tl, "val_loss": vl, "val_error": ve,
               "batch_loss": float(np.mean(acc)) if acc else float("nan")}
        if record_hypers:
            a = run.state()
            row.update(lr_quantiles=block_quantiles(layout, method.lr_of(a)),
                       l2_quantiles=block_quantiles(layout, method.l2_of(a)))
        for k, v in row.items():
            (curves if k in curves else hyp)[k].append(v)
        acc.clear()

    def due(t):
        return record_due(t, eval_every, steps)

    t_eval = time.perf_counter()
    if due(start) and (not curves["step"] or curves["step"][-1] != start):
        record(start)                    # also a record an interruption fell before
    eval_s = time.perf_counter() - t_eval
    end = steps if stop_after is None else max(start, min(steps, int(stop_after)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc=desc or method.name, leave=False)
    step_s, done = 0.0, start
    try:
        with checkpointed(lambda: save(done)):
            for t in range(start, end):
                check_interrupt()                 # Ctrl-C takes effect here, never inside run.step
                i = batch_indices(len(y), batch_size, seed, t)
                vbatch = ()
                if method.needs_val:
                    j = batch_indices(len(yv), vb, seed + 1, t)
                    vbatch = (Xv[j], yv[j])
                ts = time.perf_counter()
                loss = run.step(X[i], y[i], *vbatch)["loss"]
                done = t + 1
                acc.append(loss)
                step_s += time.perf_counter() - ts
                if due(done):
                    te = time.perf_counter()
                    record(done)
                    eval_s += time.perf_counter() - te
                if bar is not None:
                    bar.update(1)
                if checkpoint_every and done % checkpoint_every == 0 and done < end:
                    save(done)
    finally:
        if bar is not None:
            bar.close()
    save(done)
    out = dict(curves)
    if record_hypers:
        out.update(hyp, blocks=list(layout.names), quantiles=list(QUANTILES))
    out["steps_done"] = done
    out["timings"] = {"compile_s": compile_s, "step_s_mean": step_s / max(done - start, 1), "eval_s": eval_s,
                      "spent_s": before + time.perf_counter() - t0}     # the whole run, also before a resume
    return out, run
