"""Tests for cpu_ver.reversible: exact hypergradients (Maclaurin et al. 2015) and exact reversal.

(a) hypergradients vs fourth-order central finite differences of plain float training,
    for every hyperparameter kind and for w0;
(b) bit-exact reversal (w0, v0, empty buffer) for several momenta and schedules;
(c) naive float reversal of the same recursion blows up, exact reversal does not;
(d) stored bits within 1.05 x the information floor + a constant per weight;
(e) a non-reproducible gradient is detected and the step named;
(f) fixed-point overflow and non-finite values are reported with the step.

The T = 10,000 case on the MLP 64-50-50-50-10 is marked ``slow``.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from cpu_ver import reversible, sgd
from cpu_ver.models import MLP
from cpu_ver.problem import Problem, schedule
from shared.datasets import load
from shared.errors import FixedPointOverflow, NonFiniteError, ReversalError
from shared.exact_rep import from_fixed, quantised_momentum, to_fixed
from shared.hyperparams import standard

FD_REL_TOL = 1e-6
FD_EPS = 1e-4


@pytest.fixture(scope="module")
def digits():
    return load("digits", n_train=500, n_val=300, n_test=100)


def _hypers(model, T, *, lr=0.1, momentum=0.9, l2=1e-4, l2_shape="param", init_scales=None):
    return standard(model.layout, T, lr=lr, momentum=momentum, l2=l2, l2_shape=l2_shape,
                    init_scales=model.default_init_scales() if init_scales is None else init_scales)


def _random_hypers(model, T, rng, l2_shape):
    """Per-iteration x per-block lr and momentum, l2 per parameter or per block, random scales."""
    B, P = model.layout.n_blocks, model.layout.size
    l2 = 10.0 ** rng.uniform(-5, -3, P if l2_shape == "param" else B)
    return _hypers(model, T, lr=rng.uniform(0.05, 0.3, (T, B)), momentum=rng.uniform(0.5, 0.95, (T, B)),
                   l2=l2, l2_shape=l2_shape,
                   init_scales=model.default_init_scales() * rng.uniform(0.7, 1.3, B))


def _fd(F, eps=FD_EPS):
    return (8.0 * (F(eps) - F(-eps)) - (F(2 * eps) - F(-2 * eps))) / (12.0 * eps)


def _rel(a, n):
    return abs(a - n) / max(abs(a), abs(n))


@dataclasses.dataclass(frozen=True, eq=False)
class _ShiftedStart(Problem):
    """The same problem started from w0 + shift (for the derivative with respect to w0)."""
    shift: np.ndarray = None

    def w0(self, hypers):
        return super().w0(hypers) + self.shift


def _shifted(problem, shift):
    kw = {f.name: getattr(problem, f.name) for f in dataclasses.fields(Problem)}
    return _ShiftedStart(**kw, shift=shift)


# --- (a) finite differences ------------------------------------------------------------

@pytest.mark.parametrize("l2_shape", ["param", "block"])
def test_hypergradient_matches_finite_differences(digits, l2_shape):
    rng = np.random.default_rng(0 if l2_shape == "param" else 1)
    model = MLP((64, 20, 20, 10), "tanh")
    T = 60
    P = Problem.from_dataset(model, digits, n_iters=T, batch_size=50)
    H = _random_hypers(model, T, rng, l2_shape)
    res = reversible.hypergradient(P, H)
    assert res.info["reversal_max_abs_error"] == 0.0
    # the exact forward pass follows plain float training up to fixed-point rounding
    w_float, _, _ = sgd.train(P, H)
    assert np.max(np.abs(res.w_final - w_float)) < 1e-9
    assert res.objective == pytest.approx(P.objective(w_float), rel=1e-9)

    # FD through plain float training at the QUANTISED momentum (what exact arithmetic applies)
    Hq = H.with_value("momentum", quantised_momentum(H.value("momentum")))
    rows = []
    for name in ("l2", "lr", "momentum", "init_scale"):
        val = Hq.value(name)
        assert res.grads[name].shape == val.shape
        u = rng.standard_normal(val.shape) * val
        analytic = float(np.sum(res.grads[name] * u))

        def F(h, name=name, u=u, val=val):
            return sgd.objective_after_training(P, Hq.with_value(name, val + h * u), quantise=False)
        rows.append((name, analytic, _fd(F)))

    scale = np.abs(model.layout.expand(H.value("init_scale")))
    u = rng.standard_normal(model.layout.size) * scale
    analytic = float(np.dot(res.grad_w0, u))
    rows.append(("w0", analytic,
                 _fd(lambda h: sgd.objective_after_training(_shifted(P, h * u), Hq, quantise=False))))
    for name, a, n in rows:
        assert a != 0.0 and np.isfinite(a), name
        assert _rel(a, n) <= FD_REL_TOL, f"{name}: exact {a!r} vs finite differences {n!r}"


def test_int_buffer_oracle_gives_the_same_hypergradient(digits):
    """The Python-int oracle buffer also reverses exactly; the hypergradients agree closely
    (the two buffers pop different digits, so the trajectories differ in the last bits)."""
    model = MLP((64, 10, 10), "tanh")
    T = 80
    P = Problem.from_dataset(model, digits, n_iters=T, batch_size=20)
    H = _random_hypers(model, T, np.random.default_rng(4), "block")
    a = reversible.hypergradient(P, H, buffer="vector")
    b = reversible.hypergradient(P, H, buffer="int")
    assert b.info["reversal_max_abs_error"] == 0.0
    for name in H.names:
        np.testing.assert_allclose(b.grads[name], a.grads[name], rtol=1e-7, atol=1e-12)


# --- (b) bit-exact reversal and (d) buffer size ----------------------------------------

def _check_exact_reversal(P, H):
    """Forward, reverse, and check w0, v0 and the buffers bit for bit. Returns (result, floor)."""
    size = P.model.layout.size
    traj = reversible.forward(P, H)
    w0_fixed = traj.w0_fixed.copy()
    assert np.array_equal(w0_fixed, to_fixed(P.w0(H)))
    assert traj.V.c.any() and not traj.V.buffer.is_empty()
    res = reversible.reverse(P, H, traj)
    assert np.array_equal(traj.W.c, w0_fixed)                      # w0 bit for bit
    assert np.array_equal(traj.W.val.view(np.int64), from_fixed(w0_fixed).view(np.int64))
    assert not traj.V.c.any()                                      # v0 = 0 bit for bit
    assert traj.V.buffer.is_empty() and traj.W.buffer.is_empty()
    assert res.info["reversal_max_abs_error"] == 0.0
    floor = reversible.information_floor_bits(P, H)
    bits = res.info["buffer_bits"]
    assert bits <= 1.05 * floor + 2.0 * size, (bits, floor)      # (d)
    assert bits >= 0.95 * floor - 2.0 * size, (bits, floor)
    assert res.info["buffer_bits_per_weight_step"] == pytest.approx(bits / (size * P.n_iters))
    return res, floor


@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.99, "schedule"])
def test_bit_exact_reversal_T1000(digits, momentum):
    model = MLP((64, 10, 10), "tanh")
    T = 1000
    P = Problem.from_dataset(model, digits, n_iters=T, batch_size=20)
    if momentum == "schedule":
        rng = np.random.default_rng(7)
        B = model.layout.n_blocks
        H = _hypers(model, T, lr=rng.uniform(0.02, 0.2, (T, B)), momentum=rng.uniform(0.5, 0.99, (T, B)))
    else:
        H = _hypers(model, T, lr=0.1, momentum=momentum)
    _check_exact_reversal(P, H)


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.99])
def test_bit_exact_reversal_T10000_deep(momentum):
    data = load("digits")
    model = MLP((64, 50, 50, 50, 10), "tanh")
    T = 10_000
    P = Problem.from_dataset(model, data, n_iters=T, batch_size=50)
    H = _hypers(model, T, lr=0.05, momentum=momentum)
    t0 = time.perf_counter()
    res, floor = _check_exact_reversal(P, H)
    print(f"T=10000 momentum {momentum}: {time.perf_counter() - t0:.1f} s, "
          f"bits/floor {res.info['buffer_bits'] / floor:.6f}")


# --- (c) naive float reversal ------------------------------------------------------------

def _naive_float_reversal(P, H, w_T, v_T):
    """w_t = w_{t+1} - alpha v_{t+1}; v_t = (v_{t+1} + (1 - gamma) g_t) / gamma in float64."""
    w, v = w_T.copy(), v_T.copy()
    with np.errstate(all="ignore"):
        for t in reversed(range(P.n_iters)):
            s = schedule(H, t)
            X, y = P.batch(t)
            w = w - s.alpha * v
            g = P.model.grad(w, s.l2, X, y)
            v = (v + (1.0 - s.gamma) * g) / s.gamma
            if not np.all(np.isfinite(w)):
                break
    return w, v


def test_naive_float_reversal_fails_exact_does_not(digits):
    model = MLP((64, 10, 10), "tanh")
    T = 200
    P = Problem.from_dataset(model, digits, n_iters=T, batch_size=20)
    H = _hypers(model, T, lr=0.1, momentum=0.5)
    w_T, v_T, _ = sgd.train(P, H)                   # quantised momentum, as the exact pass
    w_rec, _ = _naive_float_reversal(P, H, w_T, v_T)
    with np.errstate(invalid="ignore"):
        err = np.max(np.abs(w_rec - P.w0(H)))
    # eps * gamma^-T ~ 1e-16 * 2^200: the recovered w0 is garbage (or not even finite)
    assert not err <= 1.0, err
    res = reversible.hypergradient(P, H)
    assert res.info["reversal_max_abs_error"] == 0.0


# --- (e) non-reproducible gradients ------------------------------------------------------

def test_non_reproducible_gradient_is_detected(digits, monkeypatch):
    model = MLP((64, 10, 10), "tanh")
    T, t_bad = 60, 30
    P = Problem.from_dataset(model, digits, n_iters=T, batch_size=20)
    H = _hypers(model, T, lr=0.1, momentum=0.5)
    traj = reversible.forward(P, H)
    original = MLP.grad_and_hvp
    state = {"call": 0, "perturbed_step": None}

    def perturbed(self, w, l2, X, y, v):
        g, hv, mv = original(self, w, l2, X, y, v)
        t = T - 1 - state["call"]                     # reverse visits t = T-1, ..., 0
        state["call"] += 1
        if t <= t_bad and state["perturbed_step"] is None:
            gamma = schedule(H, t).gamma
            before = to_fixed((1.0 - gamma) * g)
            for i in np.argsort(-np.abs(g)):          # one ulp on one entry, chosen so that it
                g2 = g.copy()                          # changes the fixed-point increment
                g2[i] = np.nextafter(g[i], np.inf)
                if not np.array_equal(to_fixed((1.0 - gamma) * g2), before):
                    state["perturbed_step"] = t
                    return g2, hv, mv
        return g, hv, mv

    monkeypatch.setattr(MLP, "grad_and_hvp", perturbed)
    with pytest.raises(ReversalError, match=r"step \d+") as info:
        reversible.reverse(P, H, traj)
    t = state["perturbed_step"]
    assert t is not None and t > 0
    assert f"step {t}" in str(info.value)


# --- (f) overflow and non-finite values ---------------------------------------------------

def test_learning_rate_overflow_names_the_step(digits):
    model = MLP((64, 10, 10), "tanh")
    T = 20
    P = Problem.from_dataset(model, digits, n_iters=T, batch_size=20)
    lr = np.full((T, model.layout.n_blocks), 0.1)
    lr[7] = 1e9                                           # a spike at step 7
    with pytest.raises(FixedPointOverflow, match=r"weights.*step 7") as info:
        reversible.forward(P, _hypers(model, T, lr=lr))
    assert "step 7" in str(info.value)
    # steadily too large: the weights leave the range of the fixed point at some step
    with pytest.raises(FixedPointOverflow, match=r"weights.*step \d+"):
        reversible.hypergradient(P, _hypers(model, T, lr=3e4, momentum=0.5))


def test_non_finite_gradient_names_the_step(digits, monkeypatch):
    model = MLP((64, 10, 10), "tanh")
    T = 20
    P = Problem.from_dataset(model, digits, n_iters=T, batch_size=20)
    H = _hypers(model, T)
    # a NaN in every minibatch: step 0
    X = digits.train.X.copy()
    X[:, 5] = np.nan
    bad = dataclasses.replace(P, X_train=X, batch_size=len(digits.train.y))
    with pytest.raises(NonFiniteError, match="step 0") as info:
        reversible.hypergradient(bad, H)
    assert info.value.step == 0

    original = MLP.grad
    calls = {"n": 0}

    def nan_at_5(self, w, l2, X, y):
        g = original(self, w, l2, X, y)
        calls["n"] += 1
        if calls["n"] == 6:
            g = g.copy()
            g[3] = np.inf
        return g
    monkeypatch.setattr(MLP, "grad", nan_at_5)
    with pytest.raises(NonFiniteError, match="step 5") as info:
        reversible.forward(P, H)
    assert info.value.step == 5
    monkeypatch.undo()

    # in the reverse pass: a non-finite Hessian-vector product at step 12
    traj = reversible.forward(P, H)
    original_hvp = MLP.grad_and_hvp
    rcalls = {"n": 0}

    def inf_hv(self, w, l2, X, y, v):
        g, hv, mv = original_hvp(self, w, l2, X, y, v)
        t = T - 1 - rcalls["n"]
        rcalls["n"] += 1
        if t == 12:
            hv = hv.copy()
            hv[0] = np.nan
        return g, hv, mv
    monkeypatch.setattr(MLP, "grad_and_hvp", inf_hv)
    with pytest.raises(NonFiniteError, match="step 12") as info:
        reversible.reverse(P, H, traj)
    assert info.value.step == 12
