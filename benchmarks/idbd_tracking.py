"""IDBD on a tracking task whose best step size is known analytically (Sutton 1992, s.4).

A random walk w*_{t+1} = w*_t + N(0, q) observed as y_t = w*_t + N(0, r) is tracked by
LMS with step alpha; its steady-state error is ``tracking_mse`` and the best alpha the
Kalman gain ``kalman_optimal_step``. ``idbd_tracking`` runs cpu_ver's ``idbd`` rule on
many such coordinates and records its step sizes, which should settle at the gain.
"""
from __future__ import annotations

import numpy as np

from cpu_ver.online.rules import GradInfo, idbd
from shared.layout import ParamLayout


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
