"""Plain floating-point SGD with momentum (the forward pass of DrMAD and of the checks).

    v_{t+1} = gamma_t v_t - (1 - gamma_t) g_t,   g_t = grad_w L(w_t, lambda; batch_t)
    w_{t+1} = w_t + alpha_t v_{t+1}

Same update and the same minibatches as ``reversible.forward``, in float64
without the exact storage; ``snapshots`` keeps the weights at chosen steps
(DrMAD's checkpoints).
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from cpu_ver.problem import Problem, schedule
from shared.errors import check_finite


def train(problem: Problem, hypers, *, quantise: bool = True, snapshots=(), progress: bool = False):
    """Run T steps from w0. Returns ``(w_T, v_T, {step: w_step for step in snapshots})``."""
    model = problem.model
    w = problem.w0(hypers)
    v = np.zeros_like(w)
    keep = set(int(s) for s in snapshots)
    saved = {0: w.copy()} if 0 in keep else {}
    for t in tqdm(range(problem.n_iters), desc="sgd", disable=not progress, leave=False):
        s = schedule(hypers, t, quantise)
        X, y = problem.batch(t)
        g = model.grad(w, s.l2, X, y)
        check_finite("training gradient", g, t)
        v = s.gamma * v - (1.0 - s.gamma) * g
        w = w + s.alpha * v
        if t + 1 in keep:
            saved[t + 1] = w.copy()
    check_finite("final weights", w, problem.n_iters)
    return w, v, saved


def objective_after_training(problem: Problem, hypers, quantise: bool = False) -> float:
    """f(w_T(hypers)) by plain float training: the function finite differences differentiate."""
    w, _, _ = train(problem, hypers, quantise=quantise)
    return problem.objective(w)
