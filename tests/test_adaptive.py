"""Online methods (cpu_ver/online/): one-step hypergradients against central
finite differences, IDBD's analytic optimum, the HD direction on real digits,
safeguards and bad input, and the ``adaptive`` command."""
from __future__ import annotations

import argparse
import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest

from benchmarks import idbd_tracking as tracking
from cpu_ver import online as ad
from cpu_ver.online import run as online_run
from cpu_ver.cli.adaptive import add_adaptive_arguments, run_adaptive
from cpu_ver.models import MLP
from shared.errors import ConfigError, NonFiniteError
from shared.interrupt import StopRequested

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
TOL = 1e-6


@pytest.fixture(scope="module")
def problem():
    return ad.build_check_problem(0)


# ---------------------------------------------------------------------------
# Hypergradients against finite differences

@pytest.mark.parametrize("name", list(ad.CHECK_CONFIGS))
def test_one_step_hypergradient_matches_fd(problem, name):
    parts = ad.reference_onestep(name, problem)
    assert parts, name
    for part, o in parts.items():
        assert np.all(np.isfinite(o.value)) and np.linalg.norm(o.value) > 1e-8, (name, part)
        err = ad.fd_check(o)
        assert err < TOL, f"{name}/{part}: max relative error {err:.2e} against central FD"


@pytest.mark.parametrize("method", ["smd", "idbd"])
def test_hvp_trace_over_three_steps_matches_fd(problem, method):
    o = ad.trace_hypergradient(problem, method_name=method)
    assert abs(o.value[0]) > 1e-8
    assert ad.fd_check(o) < TOL


def test_fd_check_can_fail(problem):
    """A hypergradient that is 1% off, or has the wrong sign of its mixed term, is caught."""
    o = ad.reference_onestep("t1t2-block", problem)["l2"]
    assert ad.fd_check(o._replace(value=o.value * 1.01)) > 1e-3
    o = ad.reference_onestep("hd", problem)["lr"]
    assert ad.fd_check(o._replace(value=-o.value)) > 1.0


def test_one_step_value_is_what_the_rule_follows(problem):
    """SGD-HD's update moves alpha by exactly -beta times the checked hypergradient."""
    model = MLP(problem.sizes, problem.activation)
    m = ad.make_method("hd", model.layout, lr=0.2, beta=0.05, l2=problem.l2)
    w, s = problem.w0, m.init(problem.w0)
    w1, s1 = ad.step(m, model, w, s, ad.check_batch(problem, 0))
    o = ad.one_step_hypergradient(m, model, w, s, ad.check_batch(problem, 0), ad.check_batch(problem, 1), None)["lr"]
    _, s2 = ad.step(m, model, w1, s1, ad.check_batch(problem, 1))
    assert np.allclose(s2.hyper, s1.hyper - 0.05 * o.value, rtol=0, atol=1e-15)
    assert np.isclose(o.loss(o.hyper), model.loss(w1, problem.l2, *ad.check_batch(problem, 1)), rtol=1e-14)


def test_check_all_and_reference_are_deterministic():
    errs = ad.check_all()
    assert set(errs) >= set(ad.CHECK_CONFIGS) and max(errs.values()) < TOL
    a, b = ad.reference_hypergradients(0), ad.reference_hypergradients(0)
    for k in a:
        for part in a[k]:
            assert np.array_equal(a[k][part], b[k][part])
    p1, p2 = ad.build_check_problem(3), ad.build_check_problem(3)
    assert np.array_equal(p1.w0, p2.w0) and np.array_equal(p1.X, p2.X)
    assert all(np.array_equal(i, j) for i, j in zip(p1.batches, p2.batches))


def test_smd_lambda0_is_the_one_step_rule(problem):
    """lambda = 0: the trace is -p g, so the next hypergradient is -p g_{t-1} g_t."""
    model = MLP(problem.sizes, problem.activation)
    m = ad.make_method("smd", model.layout, lr=0.1, mu=0.0, lam=0.0, l2=problem.l2)
    assert not m.needs_hvp
    w, s = problem.w0, m.init(problem.w0)
    w1, s1 = ad.step(m, model, w, s, ad.check_batch(problem, 0))
    _, s2 = ad.step(m, model, w1, s1, ad.check_batch(problem, 1))
    g0 = model.grad(w, problem.l2, *ad.check_batch(problem, 0))
    g1 = model.grad(w1, problem.l2, *ad.check_batch(problem, 1))
    assert np.allclose(s2.hg, -0.1 * g0 * g1, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------
# IDBD recovers the analytic optimum

def test_kalman_gain_minimises_tracking_mse():
    q = np.array([1e-3, 1e-2, 1e-1])
    a = np.linspace(1e-3, 0.9, 50001)
    best = np.array([a[np.argmin(tracking.tracking_mse(a, qq, 1.0))] for qq in q])
    assert np.allclose(best, tracking.kalman_optimal_step(q, 1.0), rtol=1e-3)


@pytest.mark.parametrize("alpha0", [0.5, 0.005])
def test_idbd_recovers_optimal_step_size(alpha0):
    """From far above and far below, IDBD's step sizes settle within 10% of the optimum."""
    q = np.array([1e-3, 1e-2, 1e-1])
    K = tracking.kalman_optimal_step(q, 1.0)
    _, A = tracking.idbd_tracking(q, 1.0, theta=2e-2, steps=30000, n_rep=10, alpha0=alpha0, seed=1)
    late = np.exp(np.log(A[len(A) // 2:]).mean(axis=(0, 2)))
    assert np.all(np.abs(late / K - 1) < 0.10), (late, K)


# ---------------------------------------------------------------------------
# HD direction on real digits (Baydin et al. 2018)

def _hd_fraction(ds, steps, seed):
    X, y = ds.train.X.reshape(len(ds.train), -1), ds.train.y
    model = MLP((X.shape[1], ds.n_classes), "tanh")
    data = (X, y, ds.val.X[:0].reshape(0, X.shape[1]), ds.val.y[:0])
    res = {}
    for name, kw in (("sgd", dict(lr=1e-3)), ("hd", dict(lr=1e-3, beta=1e-3))):
        m = ad.make_method(name, model.layout, **kw)
        res[name], _, _ = ad.train_online(m, model, data, steps, 128, seed, eval_every=20, record_hypers=False)
    target = res["sgd"]["train_loss"][-1]
    hit = np.nonzero(np.array(res["hd"]["train_loss"]) <= target)[0]
    return res["hd"]["step"][hit[0]] / steps if len(hit) else np.inf


def _real_digits(seed, n_train):
    from shared.datasets import load
    if (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        return load("mnist-t10k", data_dir=str(MNIST_DIR), n_train=n_train, seed=seed)
    return load("digits", seed=seed)


def test_hd_reaches_sgd_final_loss_in_a_third_of_the_steps_fast():
    assert _hd_fraction(_real_digits(0, 2000), 400, 0) <= 1 / 3


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd_mnist_published_direction(seed):
    assert _hd_fraction(_real_digits(seed, None), 4690, seed) <= 1 / 3


# ---------------------------------------------------------------------------
# Safeguards and bad input

def _model():
    return MLP((5, 4, 3), "tanh")


@pytest.mark.parametrize("name,kw,match", [
    ("hd", dict(beta=-1e-3), "meta step size beta"),
    ("idbd", dict(theta=-1.0), "meta step size theta"),
    ("smd", dict(mu=-0.1), "meta step size mu"),
    ("t1t2", dict(meta_lr=-0.1), "meta step size meta_lr"),
    ("idbd", dict(trace_decay=1.5), r"trace decay .* \[0, 1\]"),
    ("smd", dict(lam=-0.1), r"trace decay .* \[0, 1\]"),
    ("hd", dict(lr=0.0), "initial learning rate"),
    ("hd", dict(granularity="row"), "granularity"),
    ("t1t2", dict(every=0), "hyper-step interval"),
    ("hd", dict(clip=0.0), "clip"),
    ("nope", {}, "unknown method"),
])
def test_bad_options_raise_config_error(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        ad.make_method(name, _model().layout, **kw)


def test_empty_validation_split_is_a_config_error():
    model = _model()
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 5)), rng.integers(0, 3, 20)
    m = ad.make_method("t1t2", model.layout)
    with pytest.raises(ConfigError, match="validation split is empty"):
        ad.train_online(m, model, (X, y, X[:0], y[:0]), 5, 4)


def test_command_with_an_empty_validation_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="validation split is empty"):
        run_adaptive(_args(tmp_path / "run", "--method", "t1t2", "--n-val", "0"))


def test_non_finite_raises_naming_the_step():
    model = _model()
    p = ad.build_check_problem(0)
    m = ad.make_method("hd", model.layout, lr=0.1, beta=0.01)
    w, s = p.w0, m.init(p.w0)
    w, s = ad.step(m, model, w, s, ad.check_batch(p, 0))
    g = np.full_like(w, np.nan)
    with pytest.raises(NonFiniteError, match="step 1"):
        m.update(ad.GradInfo(g), s, w)
    for name in ("idbd", "smd"):
        m = ad.make_method(name, model.layout, lr=0.1)
        s = m.init(p.w0)._replace(**({"h": np.ones_like(w)} if name == "idbd" else {"v": np.ones_like(w)}))
        with pytest.raises(NonFiniteError, match="step 0"):
            m.update(ad.GradInfo(g, hvp=lambda v: v), s, w)


def test_additive_hd_projects_with_a_warning_and_log_space_stays_positive(problem):
    model = MLP(problem.sizes, problem.activation)
    m = ad.make_method("hd", model.layout, lr=1e-3, beta=1e3, granularity="block")
    w, s = problem.w0, m.init(problem.w0)
    with pytest.warns(RuntimeWarning, match="projected"):
        for t in range(6):
            w, s = ad.step(m, model, w, s, ad.check_batch(problem, t))
    assert s.n_projected > 0 and np.all(s.hyper >= 1e-12)
    m = ad.make_method("hd", model.layout, lr=1e-3, beta=1e3, granularity="block", log_space=True, clip=1.0)
    w, s = problem.w0, m.init(problem.w0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(6):
            w, s = ad.step(m, model, w, s, ad.check_batch(problem, t))
    assert np.all(np.exp(s.hyper) > 0) and np.all(np.abs(s.hg) <= 1.0)


def test_unit_grouping_covers_weights_and_bias_of_each_unit():
    layout = MLP((3, 2, 4)).layout
    gr = ad.make_grouping(layout, "unit")
    assert gr.n == 6
    idx = layout.unflatten(gr.index.astype(float))
    assert np.array_equal(idx[0], [[0, 1]] * 3) and np.array_equal(idx[1], [0, 1])
    assert np.array_equal(idx[3], [2, 3, 4, 5])
    x = np.arange(layout.size, dtype=float)
    assert np.allclose(ad.reduce(gr, x) @ np.ones(6), x.sum())


def test_update_is_pure(problem):
    model = MLP(problem.sizes, problem.activation)
    for name, (method, kw) in ad.CHECK_CONFIGS.items():
        m = ad.make_method(method, model.layout, **kw)
        s0 = m.init(problem.w0)
        w1, s1 = ad.step(m, model, problem.w0, s0, ad.check_batch(problem, 0), ad.check_val_batch(problem, 0))
        w1b, s1b = ad.step(m, model, problem.w0, s0, ad.check_batch(problem, 0), ad.check_val_batch(problem, 0))
        assert np.array_equal(w1, w1b), name
        _, s2 = ad.step(m, model, w1, s1, ad.check_batch(problem, 1), ad.check_val_batch(problem, 1))
        _, s2b = ad.step(m, model, w1b, s1b, ad.check_batch(problem, 1), ad.check_val_batch(problem, 1))
        flat = lambda s: np.concatenate([np.ravel(a) for a in (s if isinstance(s, tuple) else [s])  # noqa: E731
                                         for a in (a if isinstance(a, tuple) else [a])])
        assert np.array_equal(flat(s2), flat(s2b)), name


# ---------------------------------------------------------------------------
# The command

def _args(tmp_path, *argv):
    p = add_adaptive_arguments(argparse.ArgumentParser())
    return p.parse_args(["--out", str(tmp_path), "--steps", "30", "--batch", "32", "--eval-every", "10",
                         "--no-progress", *argv])


@pytest.mark.parametrize("method", ["combined"])
def test_run_adaptive_writes_results_and_is_reproducible(tmp_path, method):
    out = run_adaptive(_args(tmp_path / "a", "--method", method))
    again = run_adaptive(_args(tmp_path / "b", "--method", method))
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(r) >= {"command", "versions", "config", "metrics", "timings"}
    m = r["metrics"]
    assert m["step"] == [0, 10, 20, 30] and len(m["lr_quantiles"]) == 4
    assert len(m["lr_quantiles"][0]) == len(m["blocks"]) and len(m["baseline"]["train_loss"]) == 4
    assert (tmp_path / "a" / "curves.png").exists() and (tmp_path / "a" / "hyperparameters.png").exists()
    assert out["metrics"]["train_loss"] == again["metrics"]["train_loss"]


@pytest.mark.parametrize("method", ["combined", "idbd"])
def test_run_adaptive_resumes_to_the_same_results(tmp_path, monkeypatch, method):
    from shared.online_cli import CHECKPOINTS  # noqa: PLC0415
    from shared.records import load_checkpoint  # noqa: PLC0415

    def metrics(d):
        return json.loads((d / "results.json").read_text())["metrics"]

    run_adaptive(_args(tmp_path / "full", "--method", method))
    want = metrics(tmp_path / "full")
    cut = tmp_path / "cut"
    r = run_adaptive(_args(cut, "--method", method, "--checkpoint-every", "7", "--stop-after", "15"))
    assert (r["completed"], r["phase"], r["steps_done"]) == (False, "adaptive", 15)
    assert not (cut / "results.json").exists()
    r = run_adaptive(_args(cut, "--method", method, "--resume", str(cut), "--stop-after", "41"))
    assert (r["phase"], r["steps_done"]) == ("baseline", 11)
    run_adaptive(_args(cut, "--method", method, "--resume"))      # the folder from --out
    assert metrics(cut) == want
    assert json.dumps(metrics(cut)) == json.dumps(want)            # same types too (step 10, not 10.0)

    # Ctrl-C during the record after step 20: the record is finished, the run stops before
    # step 21 (shared.interrupt), the checkpoint holds step 20 with its record
    real = ad.block_quantiles
    calls = {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:              # records at 0 and 10 take two calls each; the one at 20 is hit
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(online_run, "block_quantiles", interrupt)
    with pytest.raises(StopRequested):
        run_adaptive(_args(tmp_path / "c", "--method", method))
    monkeypatch.setattr(online_run, "block_quantiles", real)
    arrays, meta = load_checkpoint(tmp_path / "c" / CHECKPOINTS["adaptive"])
    assert meta["step"] == 20 and arrays["curve/step"].tolist() == [0, 10, 20]
    run_adaptive(_args(tmp_path / "c", "--method", method, "--resume", str(tmp_path / "c")))
    assert metrics(tmp_path / "c") == want

    with pytest.raises(ConfigError, match="option.lr"):
        run_adaptive(_args(cut, "--method", method, "--resume", str(cut), "--lr", "0.5"))
    with pytest.raises(ConfigError, match="already holds"):
        run_adaptive(_args(cut, "--method", method))


def test_every_method_state_round_trips_through_checkpoint_arrays(tmp_path):
    from shared.records import load_checkpoint, save_checkpoint  # noqa: PLC0415

    problem = ad.build_check_problem(0)
    model = MLP(problem.sizes, problem.activation)
    configs = dict(ad.CHECK_CONFIGS, sgd=("sgd", {}), sgdn=("sgdn", {}), adam=("adam", {}))
    for name, (method, kw) in configs.items():
        m = ad.make_method(method, model.layout, **kw)
        w, s = problem.w0, m.init(problem.w0)
        for t in range(2):
            w, s = ad.step(m, model, w, s, ad.check_batch(problem, t), ad.check_val_batch(problem, t))
        arrays, structure = ad.state_arrays(s)
        save_checkpoint(tmp_path / "s.npz", arrays, {"state": structure})
        loaded, meta = load_checkpoint(tmp_path / "s.npz")
        back = ad.state_from_arrays(loaded, meta["state"])
        assert type(back) is type(s), name
        w1, s1 = ad.step(m, model, w, s, ad.check_batch(problem, 2), ad.check_val_batch(problem, 2))
        w2, s2 = ad.step(m, model, w, back, ad.check_batch(problem, 2), ad.check_val_batch(problem, 2))
        assert np.array_equal(w1, w2), name
        a1, a2 = ad.state_arrays(s1)[0], ad.state_arrays(s2)[0]
        assert a1.keys() == a2.keys() and all(np.array_equal(a1[k], a2[k]) for k in a1), name
