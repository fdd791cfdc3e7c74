"""The table of online methods: one backend-neutral specification per method.

A specification (``MethodSpec``) holds what does not depend on the backend: the
method's name, its options with their defaults, validation and normalisation (a bad
value is a ``ConfigError`` naming the option and the value, raised in both backends
before any work starts), its state fields and their numpy ``init``, and its grouping.
The backends supply only the update: on arrays with autograd in cpu_ver, on symbolic
variables in gpu_ver. Both hold a method's state under the field names of
``spec.state``, initialised by ``spec.init``: cpu_ver as a NamedTuple of those fields,
gpu_ver as an ordered dict of Theano shared variables with those keys (an empty array
marks a field the options leave unused, the moments plain SGD has no use for: cpu_ver
keeps it as that empty array, gpu_ver keeps no variable for it). What a backend stores
beyond ``spec.state`` is its own cache, listed with its rules: gpu_ver's fixed L2
strengths (``l2``, a shared variable the compiled step reads) and IDBD's last
hypergradient ``hg``, which cpu_ver forms on demand from the trace the update used
(``h_prev``, with ``clip``). T1-T2 and ``combined`` share the regulariser's fields
(``REG_STATE``, ``reg_init``); their containers differ (see ``SPECS``).

``SPECS`` lists the methods of both backends (``METHOD_NAMES`` and the plain
optimisers ``PLAIN_NAMES``); ``make_method`` and every builder in each backend resolve
their options here (``resolve_options``, ``checked``), so the two validate and normalise
the same options the same way. Adding a
method: a ``MethodSpec`` with ``init``, ``state``, ``grouping`` and ``lr_view``, plus
one update per backend (``tests/test_online_spec.py`` adds a toy one and cross-checks
it, one-step hypergradient against finite differences and cpu against gpu).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

from shared.coverage import check_coverage
from shared.errors import ConfigError

METHOD_NAMES = ("hd", "sgdn-hd", "adam-hd", "almeida", "idbd", "smd", "t1t2", "combined")
PLAIN_NAMES = ("sgd", "sgdn", "adam")
GRANULARITIES = ("global", "block", "unit", "param")
BASELINE_OF = {"sgdn-hd": "sgdn", "adam-hd": "adam"}   # the plain optimiser each method is compared with
GRANULARITY_ALIASES = {"layer": "block", "per-layer": "block", "per-block": "block",
                        "per-unit": "unit", "per-param": "param", "parameter": "param", "scalar": "global"}


def check_meta_step(name, value):
    if not np.isfinite(value) or value < 0:
        raise ConfigError(f"meta step size {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(name, value):
    if not np.all(np.isfinite(value)) or np.any(np.asarray(value) <= 0):
        raise ConfigError(f"{name} must be finite and > 0, got {value!r}")
    return value


def check_decay(name, value):
    if not np.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"trace decay {name} must be in [0, 1], got {value!r}")
    return float(value)


def check_clip(clip):
    if clip is None:
        return None
    if not np.isfinite(clip) or clip <= 0:
        raise ConfigError(f"hypergradient clip must be > 0 (or None for no clipping), got {clip!r}")
    return float(clip)


def check_l2(l2, n):
    a = np.asarray(l2, dtype=float)
    if a.ndim == 0:
        if not np.isfinite(a) or a < 0:
            raise ConfigError(f"l2 must be finite and >= 0, got {l2!r}")
        return float(a)
    if a.shape != (n,) or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ConfigError(f"l2 must be a number or a per-parameter array of length {n}, finite and >= 0")
    return a


class Option(NamedTuple):
    """One option: ``check(value, n)`` (n: the number of parameters) raises ConfigError
    naming the option and the value, or returns the value as the backends use it
    (``float`` of a meta step size, ...; None: the value as given)."""
    name: str
    default: object
    check: Optional[Callable] = None


class MethodSpec(NamedTuple):
    """One online method, backend-neutral.

    name: the method's name; options: ``Option`` tuple (constructor keywords and their
    defaults); fixed: keywords the name implies (``optimizer`` of hd/sgdn-hd/adam-hd).
    state: the state fields, in order; init(opts, n_groups, w0) -> {field: numpy value}
    (opts: the resolved options, n_groups: the number of groups of the ``grouping``
    option, the number of parameters without one); grouping: the option naming the
    learning-rate granularity (None: one rate per parameter); trace: the state field
    ``reset_trace`` zeroes (IDBD's h, SMD's v); lr_view: for a method built by
    ``from_spec``, (state field of the free hyperparameter, "log" or "linear"), what the
    one-step check differentiates; needs_val: learns from held-out data; needs_hvp(opts):
    needs H v.
    """
    name: str
    options: tuple
    fixed: dict = {}
    state: tuple = ()
    init: Optional[Callable] = None
    grouping: Optional[str] = None
    lr_view: Optional[tuple] = None
    needs_val: bool = False
    needs_hvp: Callable = lambda opts: False
    trace: Optional[str] = None

    @property
    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options}


# ---------------------------------------------------------------------------
# Checks of single options (messages as the backends have always given them)

def _positive(label):
    return lambda v, n: check_positive(label, v)


def _positive_float(label):
    return lambda v, n: float(check_positive(label, v))


def _meta(name):
    return lambda v, n: check_meta_step(name, v)


def _decay(name):
    return lambda v, n: check_decay(name, v)


def _unit_interval(name):
    def check(v, n):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {v!r}")
    return check


def _adam_b(v, n, name):
    if not 0.0 <= v < 1.0:
        raise ConfigError(f"Adam needs b1, b2 in [0, 1) and eps > 0, got {name}={v!r}")


def _eps(v, n):
    if not v > 0:
        raise ConfigError(f"Adam needs b1, b2 in [0, 1) and eps > 0, got eps={v!r}")


def check_granularity(v, n=None):
    """A granularity name or alias (``shared.online.GRANULARITY_ALIASES``)."""
    if GRANULARITY_ALIASES.get(v, v) not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {v!r}")


def _lr_min(v, n):
    if not (np.isfinite(v) and v > 0):
        raise ConfigError(f"lr_min must be finite and > 0, got {v!r}")


def _every(v, n):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"hyper-step interval must be an integer >= 1, got {v!r}")
    return int(v)


def _one_of(what, choices):
    def check(v, n):
        if v not in choices:
            raise ConfigError(f"{what} must be {' or '.join(repr(c) for c in choices)}, got {v!r}")
    return check


def _at(v, n):
    if v not in ("next", "current"):
        raise ConfigError(f"T1-T2: 'at' must be 'next' (exact, w_t+1) or 'current' (w_t), got {v!r}")


def _l2(v, n):
    return check_l2(v, n)


L2 = Option("l2", 0.0, _l2)
CLIP = Option("clip", None, lambda v, n: check_clip(v))
MOMENTS = (Option("momentum", 0.9, _unit_interval("momentum")),
           Option("b1", 0.9, lambda v, n: _adam_b(v, n, "b1")), Option("b2", 0.999, lambda v, n: _adam_b(v, n, "b2")),
           Option("eps", 1e-8, _eps))
L2_FROM_VALIDATION = (Option("l2_init", 1e-4, _positive("initial L2 strength (log space)")),
                      Option("meta_lr", 1e-2, _meta("meta_lr")), Option("every", 1, _every),
                      Option("at", "next", _at),
                      CLIP, Option("meta_opt", "adam", _one_of("T1-T2 meta optimiser", ("adam", "sgd"))),
                      Option("l2_on", "all", lambda v, n: check_coverage(v, "l2_on")))


# ---------------------------------------------------------------------------
# State fields and numpy inits (t and the counters are Python ints, arrays float64;
# the backends convert: gpu_ver to shared variables of floatX / int64)

def _moment(used, z):
    """An optimiser moment: zeros like the weights, or empty when the optimiser has none."""
    return z if used else np.zeros(0)


PLAIN_STATE = ("t", "m", "v")    # m, v: momentum / Adam moments (empty when unused)


def _plain_init(optimizer):
    def init(opts, n_groups, w0):
        return dict(t=0, m=_moment(optimizer != "sgd", np.zeros_like(w0)),
                    v=_moment(optimizer == "adam", np.zeros_like(w0)))
    return init


# hyper: per-group alpha (additive) or log alpha (log space); u: last applied direction
# u_{t-1}; m, v: momentum / Adam moments; hg: last hypergradient wrt hyper; n_projected:
# the steps whose projection onto lr_min bit
HD_STATE = ("t", "hyper", "u", "m", "v", "hg", "n_projected")


def _hd_init(optimizer):
    def init(opts, n_groups, w0):
        lr = opts["lr"]
        h0 = np.full(n_groups, float(lr)) if np.ndim(lr) == 0 else np.asarray(lr, float).copy()
        if h0.shape != (n_groups,):
            raise ConfigError(f"initial learning rate: expected a number or {n_groups} values, got shape {h0.shape}")
        z = np.zeros_like(w0)
        return dict(t=0, hyper=np.log(h0) if opts["log_space"] else h0, u=z, m=_moment(optimizer != "sgd", z),
                    v=_moment(optimizer == "adam", z), hg=np.zeros(n_groups), n_projected=0)
    return init


# hyper: per-parameter alpha; u: g_{t-1}; v: running average of g^2; hg: -g_t g_{t-1}
ALMEIDA_STATE = ("t", "hyper", "u", "v", "hg")


def _almeida_init(opts, n_groups, w0):
    z = np.zeros_like(w0)
    return dict(t=0, hyper=np.full(w0.shape, opts["lr"]), u=z, v=z, hg=z)


# hyper: beta = log alpha per parameter; h: trace ~ dw/dbeta; u: last applied direction (g)
IDBD_STATE = ("t", "hyper", "h", "u")


def _idbd_init(opts, n_groups, w0):
    z = np.zeros_like(w0)
    return dict(t=0, hyper=np.log(np.broadcast_to(np.asarray(opts["lr"], float), w0.shape)).copy(), h=z, u=z)


# p: gains (per-parameter rates); v: trace ~ dw/dlog p; u: last applied direction (g);
# hg: last g * v = dL(w_t)/dlog p (one-step)
SMD_STATE = ("t", "p", "v", "u", "hg")


def _smd_init(opts, n_groups, w0):
    z = np.zeros_like(w0)
    return dict(t=0, p=np.broadcast_to(np.asarray(opts["lr"], float), w0.shape).copy(), v=z, u=z, hg=z)


# The regulariser of t1t2 and combined: s, per-group log L2 strengths; hg, the last dC2/ds;
# m, v, k: the Adam state of the meta optimiser (k meta steps). cpu_ver's T1T2State adds the
# cached per-parameter L2 strengths after s; gpu_ver names the fields r_<field> (combined
# holds them next to the hd fields).
REG_STATE = ("t", "s", "hg", "m", "v", "k")


def reg_init(opts, n_l2_groups) -> dict:
    """The regulariser's initial fields (``REG_STATE``) from the options ``l2_init``."""
    s = np.log(np.broadcast_to(np.asarray(opts["l2_init"], float), (n_l2_groups,))).copy()
    z = np.zeros(n_l2_groups)
    return dict(t=0, s=s, hg=z, m=z, v=z, k=0)


def _plain(name):
    return MethodSpec(name, (Option("lr", 1e-3, _positive_float("learning rate")), L2, *MOMENTS),
                      {"optimizer": name}, state=PLAIN_STATE, init=_plain_init(name))


def _hd(name, optimizer):
    return MethodSpec(name, (Option("lr", 1e-3, _positive("initial learning rate")),
                             Option("beta", 1e-3, _meta("beta")),
                             Option("granularity", "global", check_granularity), Option("log_space", False), L2,
                             *MOMENTS, CLIP, Option("lr_min", 1e-12, _lr_min)), {"optimizer": optimizer},
                      state=HD_STATE, init=_hd_init(optimizer), grouping="granularity")


SPECS = {
    **{name: _plain(name) for name in PLAIN_NAMES},
    "hd": _hd("hd", "sgd"), "sgdn-hd": _hd("sgdn-hd", "sgdn"), "adam-hd": _hd("adam-hd", "adam"),
    "almeida": MethodSpec("almeida", (Option("lr", 1e-3, _positive_float("initial learning rate")),
                                      Option("beta", 1e-2, _meta("beta")), Option("gamma", 0.99, _decay("gamma")),
                                      L2, CLIP), state=ALMEIDA_STATE, init=_almeida_init),
    "idbd": MethodSpec("idbd", (Option("lr", 1e-3, _positive("initial learning rate")),
                                Option("theta", 1e-2, _meta("theta")),
                                Option("trace_decay", 1.0, _decay("trace_decay")),
                                Option("curvature", "diag", _one_of("idbd curvature", ("diag", "hvp"))), L2, CLIP),
                       state=IDBD_STATE, init=_idbd_init, trace="h",
                       needs_hvp=lambda o: o["curvature"] == "hvp" and o["trace_decay"] > 0),
    "smd": MethodSpec("smd", (Option("lr", 1e-3, _positive("initial learning rate")), Option("mu", 1e-2, _meta("mu")),
                              Option("lam", 0.99, _decay("lambda")), L2, CLIP),
                      state=SMD_STATE, init=_smd_init, trace="v", needs_hvp=lambda o: o["lam"] > 0),
    # t1t2 and combined: the regulariser's fields REG_STATE (reg_init) and, for combined, the
    # hd fields (SPECS["hd"], log space); their containers are the backends' (see REG_STATE)
    "t1t2": MethodSpec("t1t2", (Option("lr", 0.1, _positive_float("learning rate")),
                                Option("l2_groups", "block", check_granularity), *L2_FROM_VALIDATION),
                       needs_val=True),
    "combined": MethodSpec("combined", (Option("lr", 1e-2, _positive("initial learning rate")),
                                        Option("beta", 1e-2, _meta("beta")),
                                        Option("lr_granularity", "param", check_granularity),
                                        Option("l2_groups", "param", check_granularity), *L2_FROM_VALIDATION),
                           grouping="lr_granularity", needs_val=True),
}
ALIASES = {"sgd-hd": "hd"}
assert set(SPECS) == set(METHOD_NAMES + PLAIN_NAMES)


def method_spec(name) -> MethodSpec:
    """The specification of method ``name`` (``METHOD_NAMES``, ``PLAIN_NAMES`` or an alias)."""
    spec = SPECS.get(ALIASES.get(name, name))
    if spec is None:
        raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(METHOD_NAMES + PLAIN_NAMES)}")
    return spec


def resolve_options(spec: MethodSpec, kw: dict, n: int) -> dict:
    """``kw`` checked against ``spec``: an unknown option, or a bad value of any option
    (given or default), is a ConfigError naming it; returns the options with the
    defaults filled in, normalised by their checks (``Option``)."""
    names = [o.name for o in spec.options]
    unknown = sorted(set(kw) - set(names))
    if unknown:
        raise ConfigError(f"{spec.name}: unknown option {unknown[0]!r}; expected one of {', '.join(names)}")
    opts = {**spec.defaults, **kw}
    for o in spec.options:
        if o.check is not None:
            value = o.check(opts[o.name], n)
            if value is not None:
                opts[o.name] = value
    return opts


def build_method(builders: dict, name, layout, **kw):
    """Method ``name`` (``METHOD_NAMES``, a plain optimiser ``PLAIN_NAMES`` or an alias) for
    ``layout``, from a backend's ``builders`` (spec name -> builder). Unknown options are a
    ConfigError naming them before the builder runs; the builder resolves and checks the
    values by the same specification (``checked``), which also fills in and normalises them.
    Both backends' ``make_method`` are this with their own builders."""
    spec = method_spec(name)
    resolve_options(spec, kw, layout.size)          # unknown options first (the builder checks the rest)
    return builders[spec.name](layout, **spec.fixed, **kw)


def checked(args: dict, *names) -> tuple:
    """(spec, options) of a builder called with ``args`` (its ``locals()`` on entry: ``layout``,
    the fixed keywords and the options): the specification among ``names`` whose fixed
    keywords ``args`` holds (an unknown optimiser is a ConfigError), and the options
    resolved by it (``resolve_options``). Every builder of both backends starts with it,
    so a direct call checks its options as ``make_method`` does."""
    for spec in (SPECS[name] for name in names):
        if all(args.get(k) == v for k, v in spec.fixed.items()):
            break
    else:
        raise ConfigError(f"optimizer must be one of {', '.join(PLAIN_NAMES)}, got {args.get('optimizer')!r}")
    return spec, resolve_options(spec, {o.name: args[o.name] for o in spec.options}, args["layout"].size)
