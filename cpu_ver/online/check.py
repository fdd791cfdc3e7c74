"""One-step hypergradients of the online methods and their finite-difference checks (cpu_ver).

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

import numpy as np

from cpu_ver import models as _models
from cpu_ver.online.grouping import expand, make_grouping
from cpu_ver.online.rules import IDBDState, Method, SMDState, make_method
from cpu_ver.online.run import step
from shared.coverage import mask as coverage_mask
from shared.errors import ConfigError
from shared.online import (CHECK_CONFIGS, CHECK_WARMUP, TRACE_HORIZON, CheckProblem, OneStep, build_check_problem,
                           check_batch, check_val_batch, fd_check)


def _lr_view(method: Method, state):
    """(free hyperparameter used by the last step, map free -> per-group learning rate, grouping)."""
    name, cfg = method.name, method.config
    if method.spec is not None and method.spec.lr_view is not None:      # built by rules.from_spec
        field, space = method.spec.lr_view
        kind = cfg[method.spec.grouping] if method.spec.grouping else "param"
        return getattr(state, field), (np.exp if space == "log" else (lambda h: h)), kind
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
        eta = method.lr_of(s1) if name == "combined" else c["lr"]
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




def _check_model(p: CheckProblem):
    return _models.MLP(p.sizes, p.activation)


def check_method_config(name):
    """(method name, options) of a ``CHECK_CONFIGS`` entry, with the problem's fixed L2 for
    the learning-rate methods."""
    method, kw = CHECK_CONFIGS[name]
    return method, dict(kw)


def reference_onestep(name, problem: CheckProblem) -> dict:
    """One-step hypergradients (dict part -> OneStep) of ``CHECK_CONFIGS[name]`` on ``problem``:
    ``CHECK_WARMUP`` steps of the method, then the checked step (trace reset for idbd/smd)."""
    method_name, kw = check_method_config(name)
    if method_name not in ("t1t2", "combined"):
        kw["l2"] = problem.l2
    return method_onestep(make_method(method_name, _check_model(problem).layout, **kw), problem)


def method_onestep(method: Method, problem: CheckProblem) -> dict:
    """``one_step_hypergradient`` of ``method`` on ``problem`` after ``CHECK_WARMUP`` steps from
    ``problem.w0`` (trace reset for idbd/smd): what ``reference_onestep`` checks, for any method."""
    p, model = problem, _check_model(problem)
    w, state = p.w0, method.init(p.w0)
    for t in range(CHECK_WARMUP):
        w, state = step(method, model, w, state, check_batch(p, t), check_val_batch(p, t))
    state = reset_trace(state)
    t = CHECK_WARMUP
    return one_step_hypergradient(method, model, w, state, check_batch(p, t), check_batch(p, t + 1),
                                  check_val_batch(p, t))


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
            w, st = step(method, model, w, st, check_batch(p, t))
        return w, st

    _, st = run(0.0, horizon + 1)
    value = np.array([np.sum(st.hg)])

    def loss(c):
        w, _ = run(float(c[0]), horizon)
        return model.loss(w, p.l2, *check_batch(p, horizon))

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
