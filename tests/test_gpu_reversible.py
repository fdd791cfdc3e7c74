"""gpu_ver.reversible: exact reversal on the Theano backend (Maclaurin et al. 2015).

(a) exact hypergradients equal cpu_ver's exact ones on the same MLP problem (float64);
(b) DrMAD with K = T equals exact to rounding;
(c) the training gradient is bit-reproducible (20 calls) and the reverse step's graph
    computes the same gradient bit for bit (the condition of exact reversal);
(d) bit-exact reversal of a tiny DenseNet with batch norm, 100 steps, momenta 0.5, 0.9
    and 0.99 (one per block, cycling) in float64 (in the default run in the finite-difference
    test's graph; with per-block schedules slow-marked), and in float32 in a subprocess on
    the MLP; the buffer within 1.05 x the information floor + 16 bits per weight;
(e) a gradient that is not reproduced is caught and the step named;
(f) exact hypergradient on that DenseNet against finite differences (``gpu_ver check``'s part).

The 1,000-step reversals (momentum 0.5, 0.9, 0.99 separately, float64 and float32) are
marked ``slow``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu_ver import config

config.load(device="cpu", floatX="float64")

from cpu_ver import reversible as CR  # noqa: E402  (the reference; tests may import it)
from gpu_ver import fdcheck as GC  # noqa: E402
from gpu_ver import crosscheck as CC  # noqa: E402
from gpu_ver import drmad as D  # noqa: E402
from gpu_ver import reversible as R  # noqa: E402
from shared.errors import ReversalError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T_MLP = 12


@pytest.fixture(scope="module")
def mlp():
    cp, gp, hypers = CC.build(seed=0, T=T_MLP)
    return cp, gp, hypers


def _densenet(T, momenta):
    """The check command's DenseNet (depth 7, growth 4, softplus, 8x8, batch norm), momenta
    cycling over the blocks, per-block L2 and learning rate 0.05."""
    problem, _ = GC.densenet_problem(0, T=T)
    B = problem.layout.n_blocks
    mom = np.asarray(momenta, float)[np.arange(B) % len(momenta)]
    return problem, problem.hypers(lr=0.05, momentum=mom, l2=1e-4, l2_shape="block", momentum_shape="block",
                                   groups=("l2", "lr", "momentum", "init_scale"))


def test_mlp_exact_matches_cpu_exact(mlp):
    cp, gp, hypers = mlp
    rg, rc = R.hypergradient(gp, hypers), CR.hypergradient(cp, hypers)
    assert rg.info["reversal_max_abs_error"] == 0.0
    assert rg.objective == pytest.approx(rc.objective, rel=1e-12)
    assert set(rg.grads) == set(rc.grads) == {"l2", "lr", "momentum", "init_scale"}
    for k, v in rc.grads.items():
        assert rg.grads[k].shape == v.shape
        assert CC.rel_diff(rg.grads[k], v) <= 1e-12, k
    assert CC.rel_diff(rg.grad_w0, rc.grad_w0) <= 1e-12


def test_mlp_exact_with_forward_over_reverse(mlp):
    """hvp="rop": g_t for the exact division comes from the forward gradient function, so the
    reversal stays bit-exact; the hypergradient equals reverse over reverse's to rounding."""
    cp, gp, hypers = mlp
    rop, ror = R.hypergradient(gp, hypers, hvp="rop"), R.hypergradient(gp, hypers)
    assert rop.info["reversal_max_abs_error"] == 0.0
    for k, v in ror.grads.items():
        assert CC.rel_diff(rop.grads[k], v) <= 1e-12, k


@pytest.mark.slow   # a second cold compile of the DenseNet reverse step
def test_densenet_reversal_with_forward_over_reverse_is_bit_exact(dense):
    """The rop reverse graph's own g_t is not the forward one bit for bit on the DenseNet;
    the reversal takes g_t from the forward function and stays exact."""
    problem, hypers, _ = dense
    res = R.hypergradient(problem, hypers, hvp="rop")
    assert res.info["reversal_max_abs_error"] == 0.0


def test_drmad_with_every_step_stored_equals_exact(mlp):
    """K = T: every w_t is a stored point and eq. 25 recovers each velocity to rounding
    (relative error about eps |w| / |alpha v| per step), so every group agrees far below 1e-10."""
    _, gp, hypers = mlp
    ex = R.hypergradient(gp, hypers)
    full = D.DrMAD(gp, hypers, K=T_MLP).hypergradient(hypers)
    for k, v in ex.grads.items():
        assert CC.rel_diff(full.grads[k], v) <= 1e-10, k
    # and DrMAD proper (K = 1) does not: the test can tell the difference
    one = D.DrMAD(gp, hypers, K=1).hypergradient(hypers)
    assert max(CC.rel_diff(one.grads[k], ex.grads[k]) for k in ex.grads) > 1e-6


@pytest.fixture(scope="module")
def dense():
    problem, hypers = _densenet(100, (0.5, 0.9, 0.99))
    return problem, hypers, R.engine(problem, hypers)


@pytest.mark.slow   # cold compile of the DenseNet reverse step / float32 process: minutes on 2 cores (suite < 15 min)
def test_gradient_is_bit_reproducible_and_the_reverse_graph_agrees(dense):
    """With hvp="ror" the reverse step's own g_t is the forward one bit for bit (with "rop"
    it is not, and the reversal takes g_t from the forward function: the reversal test)."""
    problem, hypers, _ = dense
    eng = R.engine(problem, hypers, hvp="ror")
    eng.set_hypers(hypers)
    rng = np.random.default_rng(3)
    w = problem.w0(hypers) + 0.05 * rng.standard_normal(problem.layout.size)
    l2 = hypers.per_param("l2")
    for t in (0, 7):
        X, y = problem.batch(t)
        g = eng.grad(w, l2, X, y)
        assert all(np.array_equal(eng.grad(w, l2, X, y), g) for _ in range(19))      # 20 calls in all
        g_rev = eng.f_reverse(X, y, t, w, rng.standard_normal(w.size))[0]
        assert np.array_equal(np.asarray(g_rev, np.float64), g)                       # bit for bit


@pytest.mark.slow   # cold compile of the DenseNet reverse step / float32 process: minutes on 2 cores (suite < 15 min)
def test_densenet_reversal_is_bit_exact(dense):
    """100 steps with momenta 0.5, 0.9 and 0.99 (cycling over the blocks, BN blocks included):
    w0, v0 and the empty buffer recovered (``reverse`` raises otherwise); the buffer holds
    the information floor (eq. 19) plus at most 16 bits per weight (the coder's constant)."""
    problem, hypers, eng = dense
    res = eng.hypergradient(hypers)
    assert res.info["reversal_max_abs_error"] == 0.0
    floor, bits, P = res.info["information_floor_bits"], res.info["buffer_bits"], problem.layout.size
    assert floor <= bits <= 1.05 * floor + 16 * P
    assert all(np.all(np.isfinite(v)) and np.any(v != 0) for v in res.grads.values())


def test_a_gradient_that_is_not_reproduced_names_the_step(mlp, monkeypatch):
    _, gp, hypers = mlp
    eng = R.engine(gp, hypers)
    traj = eng.forward(hypers)
    f = eng.f_reverse
    bad = 5

    def perturbed(X, y, t, w, v):
        g, nll, chk = f(X, y, t, w, v)
        if t == bad:
            g = g.copy()
            g[17] += 1e-12 + 1e-9 * abs(g[17])   # one entry, far above the 2^-52 resolution
        return g, nll, chk

    monkeypatch.setattr(eng, "f_reverse", perturbed)
    with pytest.raises(ReversalError, match=f"at step {bad} "):
        eng.reverse(hypers, traj)


@pytest.mark.slow   # cold compile of the DenseNet reverse step / float32 process: minutes on 2 cores (suite < 15 min)
def test_float32_mlp_reversal_is_bit_exact():
    """floatX float32 (device arithmetic in float32, fixed-point state as always): a
    subprocess, since Theano's flags are fixed per process."""
    code = ("from gpu_ver import config; config.load(device='cpu', floatX='float32')\n"
            "from gpu_ver import crosscheck as CC, reversible as R\n"
            "_, gp, h = CC.build(seed=1, T=40)\n"
            "r = R.hypergradient(gp, h)\n"
            "assert r.info['floatX'] == 'float32' and r.info['reversal_max_abs_error'] == 0.0\n"
            "print('OK', r.info['buffer_bits'])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_densenet_exact_matches_finite_differences():
    """``python -m gpu_ver check --parts exact``: exact hypergradient of the check DenseNet
    (batch norm, every group per iteration x block) against 4th-order central differences."""
    rows = GC.check_exact(*GC.densenet_problem(0, T=6))
    assert {r[0] for r in rows} == {"l2", "lr", "momentum", "init_scale"}
    for g, a, n, e in rows:
        assert e <= 1e-6, (g, a, n, e)


def test_densenet_100_step_reversal_in_the_check_graph():
    """The default run's DenseNet reversal: 100 steps of the check DenseNet (batch norm) with
    per-step x per-block schedules, momenta 0.5, 0.9 and 0.99 cycling over the blocks, so the
    compiled graphs are the finite-difference test's (no second cold compile): w0, v0 and the
    empty buffer recovered bit for bit (``reverse`` raises otherwise), the buffer within the
    information floor + 16 bits per weight."""
    problem, _ = GC.densenet_problem(0, T=100)
    T, B = problem.n_iters, problem.layout.n_blocks
    mom = np.tile(np.array([0.5, 0.9, 0.99])[np.arange(B) % 3], (T, 1))
    hypers = problem.hypers(lr=np.full((T, B), 0.05), momentum=mom, l2=1e-4, l2_shape="unit",
                            lr_shape="iter_block", momentum_shape="iter_block",
                            groups=("l2", "lr", "momentum", "init_scale"))
    res = R.engine(problem, hypers).hypergradient(hypers)
    assert res.info["reversal_max_abs_error"] == 0.0
    floor, bits, P = res.info["information_floor_bits"], res.info["buffer_bits"], problem.layout.size
    assert floor <= bits <= 1.05 * floor + 16 * P
    assert all(np.all(np.isfinite(v)) and np.any(v != 0) for v in res.grads.values())


# --------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("floatX", ["float64", "float32"])
@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.99])
def test_densenet_1000_step_reversal(floatX, momentum):
    code = ("import sys\nfrom gpu_ver import config; config.load(device='cpu', floatX=sys.argv[1])\n"
            "from gpu_ver import fdcheck as GC, reversible as R\n"
            "p, _ = GC.densenet_problem(0, T=1000)\n"
            "h = p.hypers(lr=0.05, momentum=[float(sys.argv[2])] * p.layout.n_blocks, l2=1e-4,"
            " l2_shape='block', momentum_shape='block', groups=('l2', 'lr', 'momentum', 'init_scale'))\n"
            "r = R.hypergradient(p, h)\n"
            "assert r.info['reversal_max_abs_error'] == 0.0 and r.info['floatX'] == sys.argv[1]\n"
            "print('OK', r.info['buffer_bits'], r.info['information_floor_bits'])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code, floatX, str(momentum)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=3600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
