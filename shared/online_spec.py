"""The table of online methods: one backend-neutral specification per method.

A specification (``MethodSpec``) holds what does not depend on the backend: the
method's name, its options with their defaults and validation (a bad value is a
``ConfigError`` naming the option and the value, raised in both backends before any
work starts), and, for a method written against the specification alone
(``cpu_ver.online.rules.from_spec`` / ``gpu_ver.online.rules.from_spec``), its state
fields, a numpy ``init`` and its grouping. The backends supply only the update: on
arrays with autograd in cpu_ver, on symbolic variables in gpu_ver.

``SPECS`` lists the methods of both backends (``METHOD_NAMES`` and the plain
optimisers ``PLAIN_NAMES``); ``make_method`` in each backend resolves its options here
(``resolve_options``), so the two validate the same options the same way. Adding a
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
    naming the option and the value, or returns normally."""
    name: str
    default: object
    check: Optional[Callable] = None


class MethodSpec(NamedTuple):
    """One online method, backend-neutral.

    name: the method's name; options: ``Option`` tuple (constructor keywords and their
    defaults); fixed: keywords the name implies (``optimizer`` of hd/sgdn-hd/adam-hd).
    For a method built from the specification alone: state: the state fields, in order;
    init(opts, n_groups, w0) -> {field: numpy value}; grouping: the option naming the
    learning-rate granularity (None: one rate per parameter); lr_view: (state field of
    the free hyperparameter, "log" or "linear"), what the one-step check differentiates;
    needs_val: learns from held-out data; needs_hvp(opts): needs H v.
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

    @property
    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options}


# ---------------------------------------------------------------------------
# Checks of single options (messages as the backends have always given them)

def _positive(label):
    return lambda v, n: check_positive(label, v)


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


def _one_of(what, choices):
    def check(v, n):
        if v not in choices:
            raise ConfigError(f"{what} must be {' or '.join(repr(c) for c in choices)}, got {v!r}")
    return check


def _at(v, n):
    if v not in ("next", "current"):
        raise ConfigError(f"T1-T2: 'at' must be 'next' (exact, w_t+1) or 'current' (w_t), got {v!r}")


def _l2(v, n):
    check_l2(v, n)


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


def _plain(name):
    return MethodSpec(name, (Option("lr", 1e-3, _positive("learning rate")), L2, *MOMENTS), {"optimizer": name})


def _hd(name, optimizer):
    return MethodSpec(name, (Option("lr", 1e-3, _positive("initial learning rate")),
                             Option("beta", 1e-3, _meta("beta")),
                             Option("granularity", "global", check_granularity), Option("log_space", False), L2,
                             *MOMENTS, CLIP, Option("lr_min", 1e-12, _lr_min)), {"optimizer": optimizer},
                      grouping="granularity")


SPECS = {
    **{name: _plain(name) for name in PLAIN_NAMES},
    "hd": _hd("hd", "sgd"), "sgdn-hd": _hd("sgdn-hd", "sgdn"), "adam-hd": _hd("adam-hd", "adam"),
    "almeida": MethodSpec("almeida", (Option("lr", 1e-3, _positive("initial learning rate")),
                                      Option("beta", 1e-2, _meta("beta")), Option("gamma", 0.99, _decay("gamma")),
                                      L2, CLIP)),
    "idbd": MethodSpec("idbd", (Option("lr", 1e-3, _positive("initial learning rate")),
                                Option("theta", 1e-2, _meta("theta")),
                                Option("trace_decay", 1.0, _decay("trace_decay")),
                                Option("curvature", "diag", _one_of("idbd curvature", ("diag", "hvp"))), L2, CLIP),
                       needs_hvp=lambda o: o["curvature"] == "hvp" and o["trace_decay"] > 0),
    "smd": MethodSpec("smd", (Option("lr", 1e-3, _positive("initial learning rate")), Option("mu", 1e-2, _meta("mu")),
                              Option("lam", 0.99, _decay("lambda")), L2, CLIP),
                      needs_hvp=lambda o: o["lam"] > 0),
    "t1t2": MethodSpec("t1t2", (Option("lr", 0.1, _positive("learning rate")),
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
    defaults filled in (values as given: the backends normalise them)."""
    names = [o.name for o in spec.options]
    unknown = sorted(set(kw) - set(names))
    if unknown:
        raise ConfigError(f"{spec.name}: unknown option {unknown[0]!r}; expected one of {', '.join(names)}")
    opts = {**spec.defaults, **kw}
    for o in spec.options:
        if o.check is not None:
            o.check(opts[o.name], n)
    return opts
