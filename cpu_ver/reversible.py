"""Exact reverse-mode hypergradients through SGD with momentum.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
through Reversible Learning", ICML 2015, Algorithms 1 and 2 (docs/ALGORITHMS.md s.1,
eqs. 1-3 forward and 4-13 reverse).

Forward, in exact fixed-point arithmetic (``shared.exact_rep``)::

    g_t     = grad_w L(w_t, lambda; batch_t)
    v_{t+1} = gamma_t v_t - (1 - gamma_t) g_t        (multiplication by gamma pushes
    w_{t+1} = w_t + alpha_t v_{t+1}                   the lost bits into the buffer)

Reverse, t = T-1 ... 0, starting from dw = grad f(w_T), dv = 0::

    dalpha_t  = dw * v_{t+1}
    w_t       = w_{t+1} - alpha_t v_{t+1}                         (exact)
    dv       += alpha_t dw
    g_t, H_t u, M_t^T u    = one VJP of grad_w L at w_t, u = (1 - gamma_t) dv  (M = d grad / d lambda)
    v_t       = (v_{t+1} + (1 - gamma_t) g_t) / gamma_t           (exact, pops the buffer)
    dgamma_t  = dv * (v_t + g_t)
    dw       -= H_t ((1 - gamma_t) dv)      (per-parameter gamma: H and diag(gamma)
    dlambda  -= M_t^T ((1 - gamma_t) dv)     do not commute, so the VJP takes (1-gamma) dv)
    dv       *= gamma_t

Products stay per parameter and are reduced to each hyperparameter group's shape
(per block, per iteration, ...) by the container. At the end dw is the gradient
with respect to w0, which chains into the per-block initial scales through
w0 = scale * eps. The reverse pass checks, at every step, a fingerprint of the
exact state against the forward pass, and at the end that w0 and v0 are
recovered bit for bit and the buffer is empty; otherwise ``ReversalError``
names the first step (counting down) where the states differ.

The momentum hypergradient is with respect to the momentum actually applied,
n/2^16 (the quantised value); the container's chain rule treats it as gamma.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from cpu_ver.problem import Problem, schedule
from shared.errors import check_finite
from shared.exact_rep import ExactRep
from shared.reversal import (HypergradResult, Trajectory, check_recovered, check_step, fingerprint,  # noqa: F401
                             fingerprint_keys, information_floor_bits as _floor, reversal_info)


@dataclass
class Adjoint:
    """Reverse-mode state: dw, dv and the per-group hypergradients being accumulated."""
    dw: np.ndarray
    dv: np.ndarray
    grads: dict = field(default_factory=dict)


def adjoint_step(model, hypers, t, step, X, y, w_t, v_next, recover_v, adj: Adjoint):
    """One reverse step of the hypergradient recursion (shared by exact reversal and DrMAD).

    ``recover_v(g_t)`` returns v_t (or None to skip the momentum term) given the
    gradient at w_t; the gradient and both second-order terms come from ONE
    vector-Jacobian product of grad_w L with respect to (w, lambda).
    """
    one_minus = 1.0 - step.gamma
    if v_next is not None:
        hypers.accumulate(adj.grads, "lr", adj.dw * v_next, t)
    dv = adj.dv + step.alpha * adj.dw
    # H and diag(1 - gamma) do not commute when the momentum differs between parameters:
    # the VJP is taken against (1 - gamma) * dv, not scaled afterwards.
    g, hv, mv = model.grad_and_hvp(w_t, step.l2, X, y, one_minus * dv)
    v_t = recover_v(g)
    if v_t is not None:
        hypers.accumulate(adj.grads, "momentum", dv * (v_t + g), t)
    hypers.accumulate(adj.grads, "l2", -mv, t)
    adj.dw = adj.dw - hv
    adj.dv = step.gamma * dv
    check_finite("hypergradient (dw)", adj.dw, t)
    return g


def finish(problem: Problem, hypers, adj: Adjoint):
    """Chain dw0 into the per-block initial scales: d w0 / d scale_b = eps on block b."""
    hypers.accumulate(adj.grads, "init_scale", adj.dw * problem.init_noise())
    return adj.grads


def forward(problem: Problem, hypers, *, buffer: str = "vector", progress: bool = False) -> Trajectory:
    """Exact forward pass (Algorithm 1)."""
    model = problem.model
    W = ExactRep(problem.w0(hypers), "weights", buffer)
    V = ExactRep(np.zeros(model.layout.size), "velocity", buffer)
    w0_fixed = W.c.copy()
    keys = fingerprint_keys(W.c.size)
    prints = []
    for t in tqdm(range(problem.n_iters), desc="exact forward", disable=not progress, leave=False):
        prints.append(fingerprint(W, V, keys))
        s = schedule(hypers, t)
        X, y = problem.batch(t)
        g = model.grad(W.val, s.l2, X, y)
        check_finite("training gradient", g, t)
        V.mul(s.n, t).sub((1.0 - s.gamma) * g, t)
        W.add(s.alpha * V.val, t)
    return Trajectory(W, V, w0_fixed, prints, keys)


def reverse(problem: Problem, hypers, traj: Trajectory, *, progress: bool = False) -> HypergradResult:
    """Exact reverse pass (Algorithm 2); consumes ``traj`` (its state is rewound to step 0)."""
    model = problem.model
    W, V = traj.W, traj.V
    w_T = W.val
    bits = V.buffer.bits()
    adj = Adjoint(problem.objective_grad(w_T), np.zeros_like(w_T), hypers.zero_grads())
    for t in tqdm(reversed(range(problem.n_iters)), total=problem.n_iters, desc="exact reverse",
                  disable=not progress, leave=False):
        s = schedule(hypers, t)
        X, y = problem.batch(t)
        v_next = V.val
        W.sub(s.alpha * v_next, t)

        def recover_v(g, s=s, t=t):
            V.add((1.0 - s.gamma) * g, t).div(s.n, t)
            return V.val

        adjoint_step(model, hypers, t, s, X, y, W.val, v_next, recover_v, adj)
        check_step(W, V, traj, t)
    err = check_recovered(traj)
    grads = finish(problem, hypers, adj)
    info = reversal_info(err, bits, w_T.size, problem.n_iters)
    return HypergradResult(problem.objective(w_T), grads, adj.dw, w_T, info)


def hypergradient(problem: Problem, hypers, *, buffer: str = "vector", progress: bool = False) -> HypergradResult:
    """Exact hypergradient of the meta-objective: forward then reverse."""
    traj = forward(problem, hypers, buffer=buffer, progress=progress)
    return reverse(problem, hypers, traj, progress=progress)


def information_floor_bits(problem: Problem, hypers) -> float:
    """sum_t sum_i log2(d / n_{t,i}): the bits that multiplication by the momenta destroys."""
    return _floor(hypers, problem.model.layout.size, problem.n_iters)
