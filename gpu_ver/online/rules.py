"""Online (adaptive) hyperparameter methods on the Theano backend: the update rules.

The same methods, names, options and formulas as ``cpu_ver.online.rules`` (read its
docstring for the equations and the papers): ``hd``, ``sgdn-hd``, ``adam-hd``
(Baydin et al. 2018; global | block | unit | param rates, additive or log space),
``almeida`` (Almeida et al. 1998), ``idbd`` (Sutton 1992; ``curvature="diag"`` or
``"hvp"``), ``smd`` (Schraudolph 1999), ``t1t2`` (Luketina et al. 2016; per block,
unit or parameter log L2 strengths, validation gradient at ``next`` or ``current``,
every N steps), ``combined``, and the plain optimisers ``sgd``, ``sgdn``, ``adam``
(the baselines). A method's state is the fields of its specification
(``shared.online_spec``: ``spec.state``, initialised by the numpy ``spec.init``; cpu_ver
holds the same fields in a NamedTuple), one shared variable per field, plus this
backend's caches (``Method._cache``: the fixed L2 strengths ``l2``, IDBD's ``hg``);
this module supplies the updates. A method's ``build(ctx)`` writes step t
symbolically: from the training gradient g_t (and H_t v, grad C2 when needed) to
w_{t+1} and the new state.

Safeguards: positive learning rates (log space, the max(1/2, .) multiplicative
guards, or projection onto ``lr_min`` with a warning and a counter), optional
elementwise hypergradient clipping, monitors whose non-finiteness raises
``NonFiniteError`` naming the quantity and the step, ``ConfigError`` for bad
options (negative meta step, trace decay outside [0, 1], ...; every builder checks
them against ``shared.online_spec``, the table cpu_ver reads too).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import numpy as np

from gpu_ver import config
from gpu_ver.online.grouping import Grouping
from shared.coverage import mask as coverage_mask
from shared.errors import ConfigError
from shared.layout import ParamLayout
from shared.online_spec import PLAIN_NAMES, MethodSpec, build_method, checked, reg_init, resolve_options
from shared.online_spec import check_l2 as _check_l2

theano = config.load()
tt = theano.tensor
from theano.ifelse import ifelse  # noqa: E402


def floatx() -> str:
    """Theano's floatX (the dtype of the shared state and the compiled step)."""
    return str(theano.config.floatX)


def _tiny() -> float:
    """The guard added to Almeida's running g^2 (1e-300 in float64, as cpu_ver)."""
    return 1e-300 if floatx() == "float64" else float(np.finfo(np.float32).tiny)


# ---------------------------------------------------------------------------
# Small helpers

def _clip(h, c):
    return h if c is None else tt.clip(h, -c, c)


def _tf(t):
    return tt.cast(t, floatx())


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
    return mhat / (tt.sqrt(vhat) + eps), m_new, v_new


# ---------------------------------------------------------------------------
# Methods: state layout + symbolic update + numpy views for logging

class Method:
    """An online method on this backend.

    ``init(w0)`` -> ordered dict of initial state arrays (becoming shared
    variables): the fields of ``spec.init`` (``spec.state``; an empty array, a moment
    the optimiser has no use for, gets no variable), then ``_cache(w0)``, what this
    backend keeps beyond them; ``build(ctx)`` -> (w_new, {state name: new value}, {monitor
    name: scalar}) where every monitor is a sum whose non-finiteness raises
    NonFiniteError naming it; ``l2_expr(S)``: the symbolic L2 strengths of the
    training gradient; ``lr_of(arrays)`` / ``l2_of(arrays)``: per-parameter (or
    scalar) learning rates and L2 strengths from state arrays, for logging.
    ``hvp_of``: the state vector multiplied by the Hessian (None: no HVP).
    """
    name = "method"
    needs_val = False
    hvp_of: Optional[str] = None
    gr: Optional[Grouping] = None      # the learning-rate groups of ``spec.grouping``

    def __init__(self, layout: ParamLayout, config: dict, spec: Optional[MethodSpec] = None, options=None):
        self.layout, self.config = layout, config
        self.spec, self.options = spec, options     # its specification (shared.online_spec), resolved options

    @property
    def trace(self) -> Optional[str]:
        """The trace reset by ``reset_trace`` (``spec.trace``)."""
        return None if self.spec is None else self.spec.trace

    def init(self, w0) -> "OrderedDict":
        n = self.gr.n if self.spec.grouping else self.layout.size
        s = OrderedDict((k, v) for k, v in self.spec.init(self.options, n, w0).items() if np.size(v))
        s.update(self._cache(w0))
        return s

    def _cache(self, w0) -> dict:
        return {}

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

    def _cache(self, w0):
        """The fixed L2 strengths, per parameter: a shared variable the compiled step reads."""
        return {"l2": np.ascontiguousarray(np.broadcast_to(np.asarray(self.l2, float), (self.layout.size,)))}

    def l2_of(self, a):
        return a["l2"]


class Plain(_FixedL2, Method):
    """Plain SGD / Nesterov SGD / Adam with a fixed learning rate (the baselines)."""

    def __init__(self, layout, optimizer="sgd", lr=1e-3, l2=0.0, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8):
        spec, o = checked(locals(), *PLAIN_NAMES)
        lr = o["lr"]
        super().__init__(layout, dict(optimizer=optimizer, lr=lr, momentum=momentum, b1=b1, b2=b2, eps=eps), spec, o)
        self.name, self.opt, self.lr = optimizer, optimizer, lr
        self.mu, self.b1, self.b2, self.eps = momentum, b1, b2, eps
        self._set_l2(o["l2"])

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
        spec, o = checked(locals(), "hd", "sgdn-hd", "adam-hd")
        beta, clip = o["beta"], o["clip"]
        self.gr = Grouping(layout, granularity)
        super().__init__(layout, dict(optimizer=optimizer, lr=np.asarray(lr).tolist(), beta=beta,
                                      granularity=self.gr.kind, log_space=bool(log_space), momentum=momentum,
                                      b1=b1, b2=b2, eps=eps, clip=clip, lr_min=lr_min), spec, o)
        self.name, self.opt, self.beta, self.log_space = spec.name, optimizer, beta, bool(log_space)
        self.mu, self.b1, self.b2, self.eps, self.clip, self.lr_min = momentum, b1, b2, eps, clip, float(lr_min)
        self._set_l2(o["l2"])

    def lr_update(self, c: Ctx, S):
        """(new hyper, alpha per group, hg, n_projected) of step t (shared with ``combined``)."""
        gr = self.gr
        hg = -gr.reduce(c.g * S["u"])                        # dL(w_t)/dalpha_{t-1}
        if self.log_space:
            hg = hg * tt.exp(S["hyper"])                       # dL/dlog alpha
        hg = _clip(hg, self.clip)
        hyper = S["hyper"] - self.beta * hg
        n_proj = S["n_projected"]
        if self.log_space:
            alpha = tt.exp(hyper)
        else:
            low = tt.lt(hyper, self.lr_min)
            n_proj = n_proj + tt.cast(tt.any(low), "int64")
            hyper = tt.maximum(hyper, self.lr_min)
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
        return c.w - self.gr.expand(alpha) * u, upd, {"learning-rate hypergradient": tt.sum(hg)}

    def alpha_np(self, a):
        return np.exp(a["hyper"]) if self.log_space else a["hyper"]

    def lr_of(self, a):
        return self.gr.expand_np(self.alpha_np(a))


class Almeida(_FixedL2, Method):
    """Almeida et al. (1998): per-parameter multiplicative rates, normalised by a running g^2."""
    name = "almeida"

    def __init__(self, layout, lr=1e-3, beta=1e-2, gamma=0.99, l2=0.0, clip=None):
        spec, o = checked(locals(), "almeida")
        lr, beta, gamma, clip = o["lr"], o["beta"], o["gamma"], o["clip"]
        super().__init__(layout, dict(lr=lr, beta=beta, gamma=gamma, clip=clip), spec, o)
        self.lr, self.beta, self.gamma, self.clip = lr, beta, gamma, clip
        self._set_l2(o["l2"])

    def build(self, c):
        S, g = c.S, c.g
        v = tt.switch(tt.gt(S["t"], 0), self.gamma * S["v"] + (1.0 - self.gamma) * g * g, g * g)
        hg = _clip(-g * S["u"], self.clip)
        alpha = S["hyper"] * tt.maximum(0.5, 1.0 - self.beta * hg / (v + _tiny()))
        upd = {"t": S["t"] + 1, "hyper": alpha, "u": g, "v": v, "hg": hg}
        return c.w - alpha * g, upd, {"learning-rate hypergradient": tt.sum(hg)}

    def lr_of(self, a):
        return a["hyper"]


class IDBD(_FixedL2, Method):
    """IDBD (Sutton 1992) with per-parameter log step sizes; ``curvature`` diag or hvp (cpu_ver)."""
    name = "idbd"

    def __init__(self, layout, lr=1e-3, theta=1e-2, trace_decay=1.0, curvature="diag", l2=0.0, clip=None):
        spec, o = checked(locals(), "idbd")
        lr, theta, decay, clip = o["lr"], o["theta"], o["trace_decay"], o["clip"]
        super().__init__(layout, dict(lr=np.asarray(lr).tolist(), theta=theta, trace_decay=decay,
                                      curvature=curvature, clip=clip), spec, o)
        self.lr, self.theta, self.decay, self.curvature, self.clip = lr, theta, decay, curvature, clip
        self.hvp_of = spec.trace if spec.needs_hvp(o) else None
        self._set_l2(o["l2"])

    def _cache(self, w0):
        """The last hypergradient clip(g h) (cpu_ver forms it on demand), then the fixed L2."""
        return {"hg": np.zeros_like(w0), **super()._cache(w0)}

    def build(self, c):
        S, g, h = c.S, c.g, c.S["h"]
        hg = _clip(g * h, self.clip)
        b = S["hyper"] - self.theta * hg                  # beta_t
        alpha = tt.exp(b)
        step = alpha * g
        if self.hvp_of is not None:
            h_new = self.decay * (h - alpha * c.hv) - step
        else:                                              # diagonal approximation: no curvature term
            h_new = self.decay * h - step
        upd = {"t": S["t"] + 1, "hyper": b, "h": h_new, "u": g, "hg": hg}
        return c.w - step, upd, {"IDBD hypergradient": tt.sum(hg)}

    def lr_of(self, a):
        return np.exp(a["hyper"])


class SMD(_FixedL2, Method):
    """Stochastic meta-descent (Schraudolph 1999, 2002) with its Hessian-vector-product trace."""
    name = "smd"

    def __init__(self, layout, lr=1e-3, mu=1e-2, lam=0.99, l2=0.0, clip=None):
        spec, o = checked(locals(), "smd")
        lr, mu, lam, clip = o["lr"], o["mu"], o["lam"], o["clip"]
        super().__init__(layout, dict(lr=np.asarray(lr).tolist(), mu=mu, lam=lam, clip=clip), spec, o)
        self.lr, self.mu, self.lam, self.clip = lr, mu, lam, clip
        self.hvp_of = spec.trace if spec.needs_hvp(o) else None
        self._set_l2(o["l2"])

    def build(self, c):
        S, g, v = c.S, c.g, c.S["v"]
        hg = _clip(g * v, self.clip)
        p = S["p"] * tt.maximum(0.5, 1.0 - self.mu * hg)
        step = p * g
        v_new = self.lam * (v - p * c.hv) - step if self.lam > 0 else -step
        upd = {"t": S["t"] + 1, "p": p, "v": v_new, "u": g, "hg": hg}
        return c.w - step, upd, {"SMD hypergradient": tt.sum(hg)}

    def lr_of(self, a):
        return a["p"]


class _Reg:
    """T1-T2 regulariser part (shared by ``t1t2`` and ``combined``), from their resolved options
    ``o``; its state is ``shared.online_spec.REG_STATE`` (``reg_init``), keys prefixed ``r_``."""

    def __init__(self, layout, o, b1=0.9, b2=0.999, eps=1e-8):
        self.o, self.meta_lr = o, o["meta_lr"]
        self.mask = coverage_mask(layout, o["l2_on"])      # None: every parameter (shared.coverage)
        self.gr = Grouping(layout, o["l2_groups"])
        self.every, self.at, self.clip, self.meta_opt = o["every"], o["at"], o["clip"], o["meta_opt"]
        self.b1, self.b2, self.eps = b1, b2, eps

    def init(self):
        return OrderedDict((f"r_{k}", v) for k, v in reg_init(self.o, self.gr.n).items())

    def _masked(self, x):
        return x if self.mask is None else x * tt.constant(np.asarray(self.mask, floatx()))

    def l2_expr(self, S):
        return self._masked(self.gr.expand(tt.exp(S["r_s"])))

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
            hg = _clip(self.gr.reduce(self._masked(-2.0 * (eta * gv) * w)) * tt.exp(S["r_s"]), self.clip)
            m, v, k = S["r_m"], S["r_v"], S["r_k"]
            if self.meta_opt == "adam":
                m = self.b1 * m + (1 - self.b1) * hg
                v = self.b2 * v + (1 - self.b2) * hg * hg
                kp = _tf(k) + 1.0
                step = (m / (1 - self.b1 ** kp)) / (tt.sqrt(v / (1 - self.b2 ** kp)) + self.eps)
            else:
                step = hg
            return [S["r_s"] - self.meta_lr * step, hg, m, v, k + 1]

        new = hyper_step()
        if self.every > 1:
            cond = tt.eq((S["r_t"] + 1) % self.every, 0)
            new = ifelse(cond, new, [S["r_s"], S["r_hg"], S["r_m"], S["r_v"], S["r_k"]])
        upd = dict(zip(("r_s", "r_hg", "r_m", "r_v", "r_k"), new))
        upd["r_t"] = S["r_t"] + 1
        return upd, {"L2 hypergradient": tt.sum(upd["r_hg"]), "log L2 strength": tt.sum(upd["r_s"])}


class T1T2(Method):
    """T1-T2 (Luketina et al. 2016): plain SGD on the training loss, per-group log L2 strengths
    from the validation loss through the last update (exact one-step for at='next')."""
    name = "t1t2"
    needs_val = True

    def __init__(self, layout, lr=0.1, l2_init=1e-4, l2_groups="block", meta_lr=1e-2, every=1, at="next",
                 clip=None, meta_opt="adam", l2_on="all"):
        spec, o = checked(locals(), "t1t2")
        lr, self.reg = o["lr"], _Reg(layout, o)
        super().__init__(layout, dict(lr=lr, l2_init=np.asarray(l2_init).tolist(), l2_groups=self.reg.gr.kind,
                                      meta_lr=self.reg.meta_lr, every=self.reg.every, at=at, clip=self.reg.clip,
                                      meta_opt=meta_opt, l2_on=l2_on), spec, o)
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
        spec, o = checked(locals(), "combined")
        self.reg = _Reg(layout, o)
        self.hd = HD(layout, "sgd", lr, beta, lr_granularity, log_space=True, clip=clip)
        super().__init__(layout, dict(lr=np.asarray(lr).tolist(), beta=self.hd.beta,
                                      lr_granularity=self.hd.gr.kind, log_space=True,
                                      l2_init=np.asarray(l2_init).tolist(), l2_groups=self.reg.gr.kind,
                                      meta_lr=self.reg.meta_lr, every=self.reg.every, at=at, clip=self.reg.clip,
                                      meta_opt=meta_opt, l2_on=l2_on), spec, o)

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
        mon["learning-rate hypergradient"] = tt.sum(hg)
        return w_new, upd, mon

    def lr_of(self, a):
        return self.hd.lr_of(a)

    def l2_of(self, a):
        return self.reg.l2_of(a)


BUILDERS = {**dict.fromkeys(PLAIN_NAMES, Plain), **dict.fromkeys(("hd", "sgdn-hd", "adam-hd"), HD),
            "almeida": Almeida, "idbd": IDBD, "smd": SMD, "t1t2": T1T2, "combined": Combined}


def make_method(name, layout: ParamLayout, **kw) -> Method:
    """Build method ``name`` for ``layout`` with this backend's ``BUILDERS``, options checked
    against the method's specification (``shared.online_spec.build_method``, which cpu_ver
    calls with its own builders)."""
    return build_method(BUILDERS, name, layout, **kw)


class SpecMethod(_FixedL2, Method):
    """A method from its specification (``from_spec``); ``update(opts, grouping, ctx) ->
    (w_new, {field: new value}, {monitor: scalar sum})`` is this backend's rule."""

    def __init__(self, spec: MethodSpec, update: Callable, layout: ParamLayout, **kw):
        opts = resolve_options(spec, kw, layout.size)
        super().__init__(layout, opts, spec, opts)
        self.name, self.update, self.needs_val = spec.name, update, spec.needs_val
        self.gr = Grouping(layout, opts[spec.grouping] if spec.grouping else "param")
        self._set_l2(opts.get("l2", 0.0))

    def build(self, c):
        return self.update(self.config, self.gr, c)

    def lr_of(self, a):
        field, space = self.spec.lr_view
        return self.gr.expand_np(np.exp(a[field]) if space == "log" else a[field])


def from_spec(spec: MethodSpec, update: Callable, layout: ParamLayout, **kw) -> Method:
    """A method from its backend-neutral specification (``shared.online_spec``) and this
    backend's symbolic update (``SpecMethod``): the twin of ``cpu_ver.online.rules.from_spec``."""
    return SpecMethod(spec, update, layout, **kw)
