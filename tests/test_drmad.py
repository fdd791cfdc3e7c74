"""Tests for cpu_ver.drmad: DrMAD hypergradients against the exact reversible ones.

(a) K = T checkpoints with the velocity reconstructed is the exact recursion:
    equal to reversible.hypergradient to rounding, every group, MLP on digits.
(b) On a quadratic loss (constant Hessian A, constant mixed term d grad / d l2 = I)
    the reverse recursion for dw, dv and d l2 does not depend on where w_t is, so
    DrMAD with ONE segment (one reverse point per step, the batch of step t with
    point t) equals the exact L2 and initial-scale hypergradients to rounding
    (docs/ALGORITHMS.md s.2). On the MLP it does not (so that check can fail).
(c) Memory: K = 1 stores two weight vectors whatever T.
(d) Agreement with the exact hypergradient rises with K (fixed seed).
(e) Bad options raise ConfigError.
"""
from __future__ import annotations

import numpy as np
import pytest

from cpu_ver import drmad, reversible, sgd
from cpu_ver.models import MLP
from cpu_ver.problem import Problem, schedule
from shared.datasets import load
from shared.errors import ConfigError
from shared.hyperparams import standard
from shared.layout import ParamLayout

T_MLP = 40


def rel_err(a, b):
    """max |a - b| / max |b| (b the reference)."""
    a, b = np.ravel(a), np.ravel(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------
# MLP on digits


@pytest.fixture(scope="module")
def mlp_setup():
    data = load("digits", n_train=400, n_val=200, n_test=50)
    model = MLP((64, 20, 10), "tanh")
    problem = Problem.from_dataset(model, data, n_iters=T_MLP, batch_size=50)
    hypers = standard(model.layout, T_MLP, lr=0.3, momentum=0.9, l2=1e-3,
                      init_scales=model.default_init_scales())
    exact = reversible.hypergradient(problem, hypers)
    return problem, hypers, exact


@pytest.mark.parametrize("grid", drmad.GRIDS)
def test_full_checkpoints_equal_exact(mlp_setup, grid):
    problem, hypers, exact = mlp_setup
    d = drmad.hypergradient(problem, hypers, K=T_MLP, grid=grid, velocity="reconstruct")
    assert d.info["K"] == T_MLP and d.info["stored_vectors"] == T_MLP + 1
    assert set(d.grads) == set(exact.grads) == {"l2", "lr", "momentum", "init_scale"}
    for name in exact.grads:
        assert d.grads[name].shape == exact.grads[name].shape
        assert rel_err(d.grads[name], exact.grads[name]) <= 1e-9, name
    assert rel_err(d.grad_w0, exact.grad_w0) <= 1e-9
    assert d.objective == pytest.approx(exact.objective, rel=1e-12)


def test_k_larger_than_T_is_clipped(mlp_setup):
    problem, hypers, exact = mlp_setup
    d = drmad.hypergradient(problem, hypers, K=10 * T_MLP)
    assert d.info["K"] == T_MLP
    assert rel_err(d.grads["lr"], exact.grads["lr"]) <= 1e-9


def test_one_segment_differs_on_mlp(mlp_setup):
    """The quadratic identity below is not vacuous: on the MLP one segment is an approximation."""
    problem, hypers, exact = mlp_setup
    d = drmad.hypergradient(problem, hypers, K=1, velocity="ignore")
    assert set(d.grads) == {"l2", "init_scale"}
    assert rel_err(d.grads["l2"], exact.grads["l2"]) > 1e-3
    assert rel_err(d.grads["init_scale"], exact.grads["init_scale"]) > 1e-4


def test_velocity_ignore_keeps_l2_and_init_scale(mlp_setup):
    """Dropping the velocity only drops the lr/momentum terms: dw, dv, d l2 are unchanged."""
    problem, hypers, _ = mlp_setup
    a = drmad.hypergradient(problem, hypers, K=1, velocity="ignore")
    b = drmad.hypergradient(problem, hypers, K=1, velocity="reconstruct")
    for name in ("l2", "init_scale"):
        np.testing.assert_array_equal(a.grads[name], b.grads[name])


def test_agreement_rises_with_K(mlp_setup):
    problem, hypers, exact = mlp_setup
    cos = {}
    for K in (1, 10, T_MLP):
        d = drmad.hypergradient(problem, hypers, K=K)
        cos[K] = {n: cosine(d.grads[n], exact.grads[n]) for n in exact.grads}
    for name in exact.grads:
        assert cos[1][name] < cos[10][name] < cos[T_MLP][name], (name, cos)
        assert cos[T_MLP][name] > 1 - 1e-12
    # and not a rounding-level effect: one segment is visibly worse for the schedule groups
    assert cos[1]["lr"] < 0.99 and cos[1]["momentum"] < 0.99


# ---------------------------------------------------------------------------
# Quadratic model: constant Hessian and constant mixed term


class Quadratic:
    """L(w, l2) = 0.5 w^T A w - c^T w + l2 . w   (batches ignored); f(w) = 0.5 ||w - w*||^2.

    grad_w L = A w - c + l2, so H = A and d grad / d l2 = I (M^T v = v) are constant:
    'l2' is a linear-term hyperparameter here, which the machinery treats like the
    MLP's L2 strength.
    """

    def __init__(self, seed=0, shapes=((6,), (2, 2))):
        self.layout = ParamLayout(tuple(f"p{i}" for i in range(len(shapes))), shapes)
        P = self.layout.size
        r = np.random.default_rng(seed)
        Q, _ = np.linalg.qr(r.standard_normal((P, P)))
        self.A = (Q * r.uniform(0.2, 2.0, P)) @ Q.T
        self.A = 0.5 * (self.A + self.A.T)
        self.c = r.standard_normal(P)
        self.w_star = r.standard_normal(P)

    def default_init_scales(self):
        return np.full(self.layout.n_blocks, 0.5)

    def init_noise(self, seed):
        return np.random.default_rng(seed).standard_normal(self.layout.size)

    def check_data(self, X, y, what="data"):
        if len(X) != len(y):
            raise ConfigError(f"{what}: {len(X)} inputs but {len(y)} labels")

    def grad(self, w, l2, X, y):
        return self.A @ w - self.c + l2

    def grad_and_hvp(self, w, l2, X, y, v):
        return self.A @ w - self.c + l2, self.A @ v + 0.0, v

    def nll(self, w, X, y):
        d = w - self.w_star
        return float(0.5 * d @ d)

    def nll_grad(self, w, X, y):
        return w - self.w_star


def quad_problem(T, momentum=0.9, lr=0.15, seed=0):
    model = Quadratic(seed)
    X, y = np.zeros((20, 1)), np.zeros(20, dtype=int)
    problem = Problem(model, X, y, X[:5], y[:5], n_iters=T, batch_size=5)
    r = np.random.default_rng(seed + 1)
    P, B = model.layout.size, model.layout.n_blocks
    # non-uniform schedules: per-iteration-and-block learning rates and momenta, per-parameter l2
    hypers = standard(model.layout, T, lr=lr * r.uniform(0.5, 1.5, (T, B)),
                      momentum=np.clip(momentum + r.uniform(-0.05, 0.05, (T, B)), 0.05, 0.99),
                      l2=r.uniform(0.01, 0.3, P), init_scales=model.default_init_scales())
    return problem, hypers


@pytest.mark.parametrize("T,momentum", [(30, 0.9), (60, 0.5), (25, 0.95)])
def test_quadratic_one_segment_equals_exact(T, momentum):
    problem, hypers = quad_problem(T, momentum)
    exact = reversible.hypergradient(problem, hypers)
    d = drmad.hypergradient(problem, hypers, K=1, velocity="ignore")
    assert d.info["K"] == 1 and d.info["stored_vectors"] == 2
    for name in ("l2", "init_scale"):
        assert np.max(np.abs(exact.grads[name])) > 1e-3, name   # not trivially zero
        assert rel_err(d.grads[name], exact.grads[name]) <= 1e-9, (name, rel_err(d.grads[name], exact.grads[name]))
    assert rel_err(d.grad_w0, exact.grad_w0) <= 1e-9
    # the forward passes agree too (DrMAD's float SGD uses the same quantised momentum)
    assert rel_err(d.w_final, exact.w_final) <= 1e-12


def test_quadratic_uses_quantised_momentum():
    """DrMAD's forward (sgd.train default) applies n/2^16 like the exact forward; with
    unquantised momentum the final weights differ from the exact ones by far more than rounding."""
    problem, hypers = quad_problem(30, 0.9)
    exact = reversible.hypergradient(problem, hypers)
    w_q, _, _ = sgd.train(problem, hypers)
    w_f, _, _ = sgd.train(problem, hypers, quantise=False)
    assert rel_err(w_q, exact.w_final) <= 1e-12
    assert rel_err(w_f, exact.w_final) > 1e-7
    s = schedule(hypers, 3)
    assert np.all(s.gamma * 65536.0 == np.round(s.gamma * 65536.0))


def test_quadratic_one_segment_schedule_groups_are_approximate():
    """lr and momentum hypergradients use the velocity, which a straight line gets wrong."""
    problem, hypers = quad_problem(30, 0.9)
    exact = reversible.hypergradient(problem, hypers)
    d1 = drmad.hypergradient(problem, hypers, K=1)
    dT = drmad.hypergradient(problem, hypers, K=30)
    assert rel_err(d1.grads["lr"], exact.grads["lr"]) > 1e-3
    for name in exact.grads:
        assert rel_err(dT.grads[name], exact.grads[name]) <= 1e-9, name


# ---------------------------------------------------------------------------
# Memory and options


@pytest.mark.parametrize("T", [1, 7, 300])
def test_one_segment_stores_two_vectors(T):
    problem, hypers = quad_problem(T)
    d = drmad.hypergradient(problem, hypers, K=1)
    assert d.info["stored_vectors"] == 2 and d.info["K"] == 1


@pytest.mark.parametrize("T,K", [(10, 3), (100, 4), (7, 7), (5, 9)])
def test_checkpoint_steps(T, K):
    s = drmad.checkpoint_steps(T, K)
    assert s[0] == 0 and s[-1] == T and len(s) == min(K, T) + 1
    assert np.all(np.diff(s) > 0)


@pytest.mark.parametrize("kw", [dict(grid="T/t"), dict(grid=None), dict(velocity="exact"),
                                dict(velocity=""), dict(K=0), dict(K=-3)])
def test_bad_options(kw):
    problem, hypers = quad_problem(5)
    with pytest.raises(ConfigError):
        drmad.hypergradient(problem, hypers, **kw)


def test_checkpoint_steps_rejects_zero():
    with pytest.raises(ConfigError):
        drmad.checkpoint_steps(10, 0)
