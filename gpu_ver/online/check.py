"""One-step hypergradients of the online methods on the Theano backend and their
finite-difference checks.

``build_check_problem`` / ``CHECK_CONFIGS`` / ``CHECK_WARMUP`` are shared with
cpu_ver (``shared.online``). ``reference_onestep`` gives, per configuration, this
backend's one-step hypergradients (what the rule follows, read from the shared state
after the compiled steps) with closures of the loss after the step (compiled
``models.Functions``); ``check_all`` compares them with central finite differences
and ``gpu_ver.online.crosscheck`` with cpu_ver's ``reference_hypergradients``.
"""
from __future__ import annotations

import functools

import numpy as np

from gpu_ver import models as M
from gpu_ver.online.grouping import Grouping
from gpu_ver.online.rules import HD, IDBD, SMD, T1T2, Almeida, Combined, Method, floatx, make_method
from gpu_ver.online.run import OnlineRun, model_functions
from shared.errors import ConfigError
from shared.online import (CHECK_CONFIGS, CHECK_WARMUP, TRACE_HORIZON, TRACE_NAMES, CheckProblem, OneStep,
                           build_check_problem, check_batch, check_val_batch, fd_check)


def check_float64():
    """ConfigError unless Theano runs in float64 (the checks compare to 1e-10)."""
    if floatx() != "float64":
        raise ConfigError(f"the hypergradient checks need floatX=float64 (Theano was loaded with {floatx()}); "
                          f"use --floatX float64 or HPO_FLOATX=float64")


def _functions(sizes, activation):
    return model_functions(M.MLP(tuple(sizes), activation))


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


def prepared_run(name, p: CheckProblem) -> OnlineRun:
    """The cached compiled run of check ``name`` back at ``p``'s start (``prepare``)."""
    return prepare(_check_run(name, tuple(p.sizes), p.activation), p)


def prepare(run: OnlineRun, p: CheckProblem) -> OnlineRun:
    """``run`` at the check problem's start: weights ``p.w0``, the method's initial state, and
    ``p.l2`` as the fixed L2 strengths of the methods that have them."""
    run.set_state(w=p.w0)
    run.reset()
    if "l2" in run.S:
        run.set_state(l2=p.l2)
    return run


def _lr_view(method: Method, a):
    """(free hyperparameter used by the last step, map free -> per-group rate, grouping)."""
    if method.spec is not None and method.spec.lr_view is not None:      # built by rules.from_spec
        field, space = method.spec.lr_view
        return a[field], (np.exp if space == "log" else (lambda h: h)), method.gr
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
    return run_onestep(prepared_run(name, problem), problem, with_loss)


def method_onestep(method: Method, problem: CheckProblem, with_loss=True) -> dict:
    """``reference_onestep`` of any ``method`` (compiled here on the check MLP): the twin of
    cpu_ver's ``method_onestep``."""
    model = M.MLP(tuple(problem.sizes), problem.activation)
    run = OnlineRun(model, method, problem.w0, name=method.name.replace("-", "_"))
    return run_onestep(prepare(run, problem), problem, with_loss)


def run_onestep(run: OnlineRun, problem: CheckProblem, with_loss=True) -> dict:
    """``reference_onestep`` of the method of ``run`` (an ``OnlineRun`` on the check MLP at the
    problem's start, ``prepare``), for any method: the twin of cpu_ver's ``method_onestep``."""
    p = problem
    method = run.method
    for t in range(CHECK_WARMUP):
        run.step(*check_batch(p, t), *check_val_batch(p, t))
    run.reset_trace()
    t = CHECK_WARMUP
    w, a0 = run.weights(), run.state()
    run.step(*check_batch(p, t), *check_val_batch(p, t))
    a1 = run.state()
    fns = _functions(tuple(p.sizes), p.activation) if with_loss else None
    out = {}
    if isinstance(method, (T1T2, Combined)):
        if int(a1["r_k"]) == int(a0["r_k"]):
            raise ConfigError("reference_onestep: the method must take a hyper step every step (every=1)")
        gr = method.reg.gr
        eta = method.lr_of(a1) if isinstance(method, Combined) else method.lr
        Xb, yb = check_batch(p, t)
        Xv, yv = check_val_batch(p, t)
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
    Xn, yn = check_batch(p, t + 1)

    def lr_loss(h):
        return fns.loss(w - gr.expand_np(to_lr(h)) * u, l2, Xn, yn)

    run.step(*check_batch(p, t + 1), *check_val_batch(p, t))
    a2 = run.state()
    out["lr"] = OneStep(a2["hg"], np.array(free, float).copy(), lr_loss)
    return out


def trace_hypergradient(problem: CheckProblem, horizon=TRACE_HORIZON, method_name="smd") -> OneStep:
    """SMD's (or IDBD-hvp's) Hessian-vector-product trace over ``horizon`` steps with fixed gains
    (mu = theta = 0, no decay): sum(hg) at step horizon + 1 is the derivative of L(w_K; B_K)
    along log p + c 1 (cpu_ver.online.check.trace_hypergradient). Returns a OneStep over c."""
    if horizon != TRACE_HORIZON:
        raise ConfigError(f"trace check horizon is fixed at {TRACE_HORIZON}")
    p = problem
    name = TRACE_NAMES[0] if method_name == "smd" else TRACE_NAMES[1]
    run = prepared_run(name, p)
    init = run.state()

    def go(c, k):
        run.set_state(w=p.w0, **init)
        if method_name == "smd":
            run.set_state(p=init["p"] * np.exp(c))
        else:
            run.set_state(hyper=init["hyper"] + c)
        for t in range(k):
            run.step(*check_batch(p, t))
        return run.weights()

    go(0.0, horizon + 1)
    value = np.array([np.sum(run.state()["hg"])])
    fns = _functions(tuple(p.sizes), p.activation)

    def loss(c):
        w = go(float(c[0]), horizon)
        return fns.loss(w, p.l2, *check_batch(p, horizon))

    return OneStep(value, np.zeros(1), loss)


def reference_hypergradients(seed=0) -> dict:
    """``name -> {part: hypergradient}`` on ``build_check_problem(seed)`` for every
    ``CHECK_CONFIGS`` entry and the two trace checks (this backend's numbers)."""
    check_float64()
    problem = build_check_problem(seed)
    out = {name: {k: v.value for k, v in reference_onestep(name, problem, with_loss=False).items()}
           for name in CHECK_CONFIGS}
    out[TRACE_NAMES[0]] = {"lr": trace_hypergradient(problem, method_name="smd").value}
    out[TRACE_NAMES[1]] = {"lr": trace_hypergradient(problem, method_name="idbd").value}
    return out


def check_all(tol=1e-6, seed=0) -> dict:
    """``method -> max relative error`` of this backend's one-step hypergradients against central
    finite differences (float64 check MLP). ``tol`` is not applied here; the caller compares."""
    check_float64()
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
        bad = sorted({h.text for h in hostops.unexpected(prepared_run(name, problem).function)})
        if bad:
            out[name] = bad
    return out
