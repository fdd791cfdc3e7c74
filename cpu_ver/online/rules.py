"""Online (adaptive) hyperparameter methods: learning rates and L2 strengths
adapted during ONE training run from a short-horizon hypergradient.

Every method is a pair of pure functions, as in optax::

    method = make_method("hd", lr=1e-3, beta=1e-3, granularity="global")
    state = method.init(w0)
    w, state = method.update(GradInfo(g=grad_w L(w_t, l2(state); batch_t)), state, w)

``state`` is a NamedTuple of arrays (never mutated; ``update`` returns a new
one) whose fields, and their numpy init, are the method's specification's
(``shared.online_spec``: ``spec.state``, ``spec.init``; gpu_ver holds the same
fields as shared variables); this module supplies the updates. ``GradInfo``
carries the training gradient at ``w_t`` and, when a method needs them, a
Hessian-vector-product closure at ``w_t`` on the same batch and a
validation-gradient closure. ``run.step(method, model, w, state,
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
``NonFiniteError`` naming the step; bad options raise ``ConfigError`` (every builder
checks them against ``shared.online_spec``, the table gpu_ver reads too).

Groups are ``cpu_ver.online.grouping``; ``cpu_ver.online.run`` takes a step with the
autograd MLP and trains; ``cpu_ver.online.check`` holds the one-step checks.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional

import numpy as np

from cpu_ver import online_kernels as _kernels
from cpu_ver.online.grouping import Grouping, expand, make_grouping, reduce, reduce_dot
from shared.coverage import mask as coverage_mask
from shared.errors import ConfigError, check_finite
from shared.layout import ParamLayout
from shared.online_spec import PLAIN_NAMES, REG_STATE, SPECS, MethodSpec, build_method, checked, reg_init
from shared.online_spec import check_l2 as _check_l2
from shared.online_spec import resolve_options


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
    gradient must use at this step; ``lr_of(state)`` / ``l2_of(state)``: the
    per-parameter (or scalar) learning rates and L2 strengths, for logging.
    """
    name: str
    config: dict
    init: Callable
    update: Callable
    l2: Callable
    lr_of: Callable
    l2_of: Callable
    needs_hvp: bool = False
    needs_val: bool = False
    spec: Optional[MethodSpec] = None      # its specification (shared.online_spec)


# ---------------------------------------------------------------------------
# Small helpers

def _clip(h, c):
    return h if c is None else np.clip(h, -c, c)


def state_type(name, fields):
    """A NamedTuple class of the state ``fields`` (``spec.state`` and any cache of this backend)."""
    return NamedTuple(name, [(f, object) for f in fields])


def spec_init(spec: MethodSpec, opts: dict, layout: ParamLayout, State, **extra) -> Callable:
    """``init(w0) -> State`` from ``spec.init`` (groups of the option ``spec.grouping``, one
    per parameter without one); ``extra``: field -> f(w0) for this backend's caches."""
    n = make_grouping(layout, opts[spec.grouping]).n if spec.grouping else layout.size

    def init(w0):
        return State(**spec.init(opts, n, w0), **{k: f(w0) for k, f in extra.items()})
    return init


def check_finite_sum(what, x, step):
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

PlainState = state_type("PlainState", SPECS["sgd"].state)


def plain(layout, optimizer="sgd", lr=1e-3, l2=0.0, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8) -> Method:
    """Plain SGD / Nesterov SGD / Adam with a fixed learning rate: w_{t+1} = w_t - lr u_t."""
    spec, o = checked(locals(), *PLAIN_NAMES)
    lr, l2 = o["lr"], o["l2"]
    cfg = dict(optimizer=optimizer, lr=lr, momentum=momentum, b1=b1, b2=b2, eps=eps)

    def update(info, state, w):
        u, m, v = _direction(optimizer, info.g, state.t, state.m, state.v, momentum, b1, b2, eps)
        return w - lr * u, PlainState(t=state.t + 1, m=m, v=v)

    return Method(optimizer, cfg, spec_init(spec, o, layout, PlainState), update, lambda s: l2, lambda s: lr,
                  lambda s: l2, spec=spec)


# ---------------------------------------------------------------------------
# Hypergradient descent: SGD-HD, SGDN-HD, Adam-HD

HDState = state_type("HDState", SPECS["hd"].state)     # fields: shared.online_spec.HD_STATE


def hypergradient_descent(layout, optimizer="sgd", lr=1e-3, beta=1e-3, granularity="global",
                          log_space=False, l2=0.0, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8,
                          clip=None, lr_min=1e-12) -> Method:
    """SGD-HD / SGDN-HD / Adam-HD (Baydin et al. 2018) with global, per-block, per-unit
    or per-parameter rates, additive or in log space (see the module docstring)."""
    spec, o = checked(locals(), "hd", "sgdn-hd", "adam-hd")
    lr, beta, clip, l2 = o["lr"], o["beta"], o["clip"], o["l2"]
    gr = make_grouping(layout, granularity)
    name = spec.name
    cfg = dict(optimizer=optimizer, lr=lr, beta=beta, granularity=gr.kind, log_space=bool(log_space),
               momentum=momentum, b1=b1, b2=b2, eps=eps, clip=clip, lr_min=lr_min)

    def update(info, state, w):
        g, t = info.g, state.t
        hg = -reduce_dot(gr, g, state.u)               # dL(w_t)/dalpha_{t-1}
        if log_space:
            hg = hg * np.exp(state.hyper)               # dL/dlog alpha
        hg = _clip(hg, clip)
        check_finite_sum("learning-rate hypergradient", hg, t)
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
        return w_new, HDState(t=t + 1, hyper=hyper, u=u, m=m, v=v, hg=hg, n_projected=n_proj)

    def lr_of(state):
        return expand(gr, np.exp(state.hyper) if log_space else state.hyper)

    return Method(name, cfg, spec_init(spec, o, layout, HDState), update, lambda s: l2, lr_of, lambda s: l2,
                  spec=spec)


# ---------------------------------------------------------------------------
# Almeida et al. (1998)

AlmeidaState = state_type("AlmeidaState", SPECS["almeida"].state)


def almeida(layout, lr=1e-3, beta=1e-2, gamma=0.99, l2=0.0, clip=None) -> Method:
    """Per-parameter multiplicative rates (Almeida et al. 1998), normalised by a running g^2."""
    spec, o = checked(locals(), "almeida")
    lr, beta, gamma, clip, l2 = o["lr"], o["beta"], o["gamma"], o["clip"], o["l2"]
    cfg = dict(lr=lr, beta=beta, gamma=gamma, clip=clip)

    def update(info, state, w):
        g, t = info.g, state.t
        v = gamma * state.v + (1.0 - gamma) * g * g if t > 0 else g * g
        hg = _clip(-g * state.u, clip)
        check_finite_sum("learning-rate hypergradient", hg, t)
        alpha = state.hyper * np.maximum(0.5, 1.0 - beta * hg / (v + 1e-300))
        return w - alpha * g, AlmeidaState(t=t + 1, hyper=alpha, u=g, v=v, hg=hg)

    return Method("almeida", cfg, spec_init(spec, o, layout, AlmeidaState), update, lambda s: l2,
                  lambda s: s.hyper, lambda s: l2, spec=spec)


# ---------------------------------------------------------------------------
# IDBD (Sutton 1992)

class IDBDState(state_type("_IDBDFields", SPECS["idbd"].state + ("h_prev", "clip"))):
    """The fields of ``shared.online_spec.IDBD_STATE`` and this backend's cache: h_prev,
    the trace the last update used, and clip, the hypergradient clip (inf: none)."""
    __slots__ = ()

    @property
    def hg(self):
        """The last update's hypergradient clip(g h), formed on demand (the
        update itself never stores it: one array pass less per step)."""
        return np.clip(self.u * self.h_prev, -self.clip, self.clip)


def idbd(layout, lr=1e-3, theta=1e-2, trace_decay=1.0, curvature="diag", l2=0.0, clip=None) -> Method:
    """IDBD with per-parameter log step sizes (see the module docstring for the
    generalisation: ``curvature="diag"`` diagonal approximation, ``"hvp"`` exact)."""
    spec, o = checked(locals(), "idbd")
    lr, theta, decay, clip, l2 = o["lr"], o["theta"], o["trace_decay"], o["clip"], o["l2"]
    cfg = dict(lr=lr, theta=theta, trace_decay=decay, curvature=curvature, clip=clip)

    clip_value = np.inf if clip is None else clip
    init = spec_init(spec, o, layout, IDBDState, h_prev=np.zeros_like, clip=lambda w0: clip_value)

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
            return w_new, IDBDState(t=t + 1, hyper=b, h=h_new, u=g, h_prev=h, clip=clip_value)
        hg = _clip(g * h, clip)
        check_finite_sum("IDBD hypergradient", hg, t)
        b = np.multiply(hg, -theta)
        b += state.hyper                      # beta_t = beta_{t-1} - theta g_t h_t
        step = np.exp(b)                      # alpha_t
        h_new = h - step * info.hvp(h)        # (I - alpha H) h, before alpha is overwritten
        step *= g                             # alpha_t g_t
        w_new = w - step
        if decay != 1.0:
            h_new *= decay
        h_new -= step
        return w_new, IDBDState(t=t + 1, hyper=b, h=h_new, u=g, h_prev=h, clip=clip_value)

    return Method("idbd", cfg, init, update, lambda s: l2, lambda s: np.exp(s.hyper), lambda s: l2,
                  needs_hvp=spec.needs_hvp(o), spec=spec)


# ---------------------------------------------------------------------------
# SMD (Schraudolph 1999, 2002)

SMDState = state_type("SMDState", SPECS["smd"].state)


def smd(layout, lr=1e-3, mu=1e-2, lam=0.99, l2=0.0, clip=None) -> Method:
    """Stochastic meta-descent with its Hessian-vector-product trace (module docstring)."""
    spec, o = checked(locals(), "smd")
    lr, mu, lam, clip, l2 = o["lr"], o["mu"], o["lam"], o["clip"], o["l2"]
    cfg = dict(lr=lr, mu=mu, lam=lam, clip=clip)

    def update(info, state, w):
        g, t, v = info.g, state.t, state.v
        hg = _clip(g * v, clip)
        check_finite_sum("SMD hypergradient", hg, t)
        p = state.p * np.maximum(0.5, 1.0 - mu * hg)
        step = p * g
        w_new = w - step
        v_new = lam * (v - p * info.hvp(v)) - step if lam > 0 else -step
        return w_new, SMDState(t=t + 1, p=p, v=v_new, u=g, hg=hg)

    return Method("smd", cfg, spec_init(spec, o, layout, SMDState), update, lambda s: l2, lambda s: s.p,
                  lambda s: l2, needs_hvp=spec.needs_hvp(o), spec=spec)


# ---------------------------------------------------------------------------
# T1-T2 (Luketina et al. 2016) and the combined method

# the regulariser's fields (shared.online_spec.REG_STATE) and this backend's cache, after s: l2 =
# the per-parameter strengths m * expand(exp(s)) the training gradient uses
T1T2State = state_type("T1T2State", REG_STATE[:2] + ("l2",) + REG_STATE[2:])


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


def _t1t2_config(layout, o):
    """The regulariser's constants from the resolved options ``o`` of t1t2 or combined."""
    return _T1T2Config(make_grouping(layout, o["l2_groups"]), o["meta_lr"], o["every"], o["at"], o["clip"],
                       o["meta_opt"], coverage_mask(layout, o["l2_on"]))


def _t1t2_l2(c: _T1T2Config, s) -> np.ndarray:
    """Per-parameter L2 strengths m * expand(exp(s)) (m: the --l2-on mask, 1 without one)."""
    l2 = np.broadcast_to(expand(c.gr, np.exp(s)), (c.gr.layout.size,))
    return l2.copy() if c.mask is None else l2 * c.mask


def _t1t2_init(c: _T1T2Config, o):
    r = reg_init(o, c.gr.n)
    return T1T2State(**r, l2=_t1t2_l2(c, r["s"]))


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
    check_finite_sum("L2 hypergradient", hg, t)
    m, v, k = st.m, st.v, st.k
    if c.meta_opt == "adam":
        m = c.b1 * m + (1 - c.b1) * hg
        v = c.b2 * v + (1 - c.b2) * hg * hg
        step = (m / (1 - c.b1 ** (k + 1))) / (np.sqrt(v / (1 - c.b2 ** (k + 1))) + c.eps)
    else:
        step = hg
    s = st.s - c.meta_lr * step
    check_finite_sum("log L2 strength", s, t)
    return T1T2State(t=t + 1, s=s, l2=_t1t2_l2(c, s), hg=hg, m=m, v=v, k=k + 1)


def t1t2(layout, lr=0.1, l2_init=1e-4, l2_groups="block", meta_lr=1e-2, every=1, at="next",
         clip=None, meta_opt="adam", l2_on="all") -> Method:
    """T1-T2: plain SGD on the training loss, per-group log L2 from the validation loss
    (on the parameters ``l2_on`` covers; the others keep L2 = 0)."""
    spec, o = checked(locals(), "t1t2")
    lr, c = o["lr"], _t1t2_config(layout, o)
    cfg = dict(lr=lr, l2_init=np.asarray(l2_init).tolist(), l2_groups=c.gr.kind, meta_lr=c.meta_lr,
               every=c.every, at=at, clip=c.clip, meta_opt=meta_opt, l2_on=l2_on)

    def init(w0):
        return _t1t2_init(c, o)

    def update(info, state, w):
        w_new = w - lr * info.g
        return w_new, _t1t2_after_step(c, state, w, w_new, lr, info)

    return Method("t1t2", cfg, init, update, lambda s: s.l2, lambda s: lr, lambda s: s.l2, needs_val=True,
                  spec=spec)


class CombinedState(NamedTuple):
    lr: HDState
    reg: T1T2State


def combined(layout, lr=1e-2, beta=1e-2, lr_granularity="param", l2_init=1e-4, l2_groups="param",
             meta_lr=1e-2, every=1, at="next", clip=None, meta_opt="adam", l2_on="all") -> Method:
    """Per-parameter log-space SGD-HD rates and T1-T2 log L2 strengths in one run.

    Step t: g_t = grad C1(w_t, lambda_t); s_t = s_{t-1} - beta alpha_{t-1} (-g_t u_{t-1});
    w_{t+1} = w_t - alpha_t g_t; every ``every`` steps a T1-T2 step with eta = alpha_t.
    """
    spec, o = checked(locals(), "combined")
    c = _t1t2_config(layout, o)
    hd = hypergradient_descent(layout, "sgd", lr, beta, lr_granularity, log_space=True, clip=clip)
    gr_lr = make_grouping(layout, lr_granularity)
    cfg = dict(lr=np.asarray(lr).tolist(), beta=beta, lr_granularity=gr_lr.kind, log_space=True,
               l2_init=np.asarray(l2_init).tolist(), l2_groups=c.gr.kind, meta_lr=c.meta_lr,
               every=c.every, at=at, clip=c.clip, meta_opt=meta_opt, l2_on=l2_on)

    def init(w0):
        return CombinedState(hd.init(w0), _t1t2_init(c, o))

    def update(info, state, w):
        w_new, lr_state = hd.update(info, state.lr, w)
        eta = expand(gr_lr, np.exp(lr_state.hyper))
        return w_new, CombinedState(lr_state, _t1t2_after_step(c, state.reg, w, w_new, eta, info))

    return Method("combined", cfg, init, update, lambda s: s.reg.l2, lambda s: hd.lr_of(s.lr),
                  lambda s: s.reg.l2, needs_val=True, spec=spec)


# ---------------------------------------------------------------------------
# Front door

BUILDERS = {**dict.fromkeys(PLAIN_NAMES, plain), **dict.fromkeys(("hd", "sgdn-hd", "adam-hd"), hypergradient_descent),
            "almeida": almeida, "idbd": idbd, "smd": smd, "t1t2": t1t2, "combined": combined}


def make_method(name, layout: ParamLayout, **kw) -> Method:
    """Build method ``name`` for ``layout`` with this backend's ``BUILDERS``, options checked
    against the method's specification (``shared.online_spec.build_method``, which gpu_ver
    calls with its own builders)."""
    return build_method(BUILDERS, name, layout, **kw)


def from_spec(spec: MethodSpec, update: Callable, layout: ParamLayout, **kw) -> Method:
    """A method from its backend-neutral specification (``shared.online_spec``) and this
    backend's update ``update(opts, grouping, info, state, w) -> (w_new, {field: value})``.

    The options are resolved and checked by the specification; the state is a NamedTuple
    of ``spec.state`` fields, initialised by ``spec.init(opts, n_groups, w0)``; the
    learning-rate groups follow the option ``spec.grouping`` (one per parameter without
    one) and the fixed L2 strengths the option ``l2`` (0 without one).
    """
    opts = resolve_options(spec, kw, layout.size)
    gr = make_grouping(layout, opts[spec.grouping] if spec.grouping else "param")
    l2 = _check_l2(opts.get("l2", 0.0), layout.size)
    State = state_type(f"{spec.name.title().replace('-', '')}State", spec.state)
    field, space = spec.lr_view
    init = spec_init(spec, opts, layout, State)

    def step(info, state, w):
        w_new, fields = update(opts, gr, info, state, w)
        return w_new, State(**fields)

    def lr_of(state):
        h = getattr(state, field)
        return expand(gr, np.exp(h) if space == "log" else h)

    return Method(spec.name, opts, init, step, lambda s: l2, lr_of, lambda s: l2,
                  needs_hvp=spec.needs_hvp(opts), needs_val=spec.needs_val, spec=spec)
