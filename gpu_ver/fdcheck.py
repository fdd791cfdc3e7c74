"""Finite-difference checks of this backend's hypergradients (the stencil and the
comparison are ``shared.fdcheck``; ``python -m gpu_ver check`` runs them,
``gpu_ver.cli.check``).

Parts (``--parts``, default all):

``mlp``       DrMAD with K = T (every weight vector stored, velocities
              reconstructed: the exact recursion up to rounding) on an MLP
              64-20-10 (tanh) on scikit-learn's digits, per-unit L2,
              per-iteration x per-block learning rates and momenta, per-block
              initial scales, float64. One random direction per group.
``hvp``       Hessian-vector product of a small DenseNet (depth 7, growth 4,
              8x8 inputs, softplus, batch norm with batch statistics) against
              the 4-point central difference of its gradient.
``densenet``  DrMAD with K = T on that DenseNet (a few steps on synthetic
              8x8 images), same hyperparameter groups as ``mlp``; the
              validation loss uses the batch statistics of each validation
              chunk (``gpu_ver.drmad`` docstring).
``exact``     the exact hypergradient (``gpu_ver.reversible``: exact
              reversal, bit-exact) on that DenseNet and problem.

A hypergradient ``g`` of ``F(h)`` is checked along a direction ``u`` (scaled by
the values, so the step is relative) with the fourth-order stencil
``D_u F = [8 (F(+e) - F(-e)) - (F(+2e) - F(-2e))] / (12 e)``; momentum is
perturbed around the quantised value that training applies, and the FD
objective trains with the unquantised perturbed momentum (as
``cpu_ver.fdcheck``). Relative error ``|a - n| / max(|a|, |n|)``; for the HVP
``max |Hv - FD| / max |FD|``. metrics: ``max_rel_err`` (method -> number), and
the command's exit status is 1 if one is above ``--tol`` (default 1e-6). Needs float64.

Theano is imported lazily (inside the functions), so the parser can be built
before ``gpu_ver.config.load`` runs.
"""
from __future__ import annotations

import time

import numpy as np

from shared.errors import ConfigError
from shared.fdcheck import check_groups

PARTS = ("mlp", "hvp", "densenet", "exact", "adaptive")


def fd_rows(engine, hypers, grads: dict, *, seed: int = 0, eps: float = 1e-3, groups=None) -> list:
    """(group, analytic, numeric, rel_err) for one random direction per group."""
    return check_groups(lambda h: engine.objective_after_training(h, quantise=False), hypers, grads,
                        seed=seed, eps=eps, groups=groups)


def _hypers(problem, seed, lr_range):
    from shared.hyperparams import n_units  # noqa: PLC0415

    rng = np.random.default_rng(seed + 1)
    lay, T = problem.layout, problem.n_iters
    nb = lay.n_blocks
    return problem.hypers(lr=np.exp(rng.uniform(*lr_range, (T, nb))), momentum=rng.uniform(0.5, 0.9, (T, nb)),
                          l2=np.exp(rng.uniform(-7, -4, n_units(lay))), l2_shape="unit",
                          lr_shape="iter_block", momentum_shape="iter_block",
                          groups=("l2", "lr", "momentum", "init_scale"))


def mlp_problem(seed: int = 0, T: int = 30):
    """digits (300 train, 200 validation), MLP 64-20-10 tanh, batch 50, T steps."""
    from gpu_ver import models as M  # noqa: PLC0415
    from gpu_ver import problem as P  # noqa: PLC0415
    from shared.datasets import load  # noqa: PLC0415

    data = load("digits", n_train=300, n_val=200, n_test=100, seed=seed)
    problem = P.Problem.from_dataset(M.MLP((64, 20, 10), "tanh"), data, n_iters=T, batch_size=50,
                                     batch_seed=seed, init_seed=seed)
    return problem, _hypers(problem, seed, (-1.5, -0.5))


def densenet_problem(seed: int = 0, T: int = 6, depth: int = 7, growth: int = 4, activation: str = "softplus"):
    """Synthetic 8x8 images (32 train, 12 validation in 2 chunks, 4 classes), DenseNet
    depth 7 growth 4, batch 8, T steps."""
    from gpu_ver import models as M  # noqa: PLC0415
    from gpu_ver import problem as P  # noqa: PLC0415
    from gpu_ver.train import synthetic_images  # noqa: PLC0415

    data = synthetic_images(n_train=32, n_val=12, n_test=8, n_classes=4, size=8, seed=seed)
    net = M.DenseNet(depth, growth, n_classes=4, input_shape=(3, 8, 8), activation=activation)
    problem = P.Problem.from_dataset(net, data, n_iters=T, batch_size=8, batch_seed=seed, init_seed=seed,
                                     val_chunk=6)
    return problem, _hypers(problem, seed, (-2.5, -1.5))


def check_drmad(problem, hypers, *, seed=0, eps=1e-3, hvp="ror") -> list:
    """DrMAD K = T vs finite differences, one row per group."""
    from gpu_ver import drmad as D  # noqa: PLC0415

    engine = D.DrMAD(problem, hypers, K=problem.n_iters, hvp=hvp)
    res = engine.hypergradient(hypers)
    return fd_rows(engine, hypers, res.grads, seed=seed, eps=eps)


def check_exact(problem, hypers, *, seed=0, eps=1e-3, hvp="ror") -> list:
    """Exact reversal (``gpu_ver.reversible``) vs finite differences, one row per group."""
    from gpu_ver import reversible as R  # noqa: PLC0415

    engine = R.engine(problem, hypers, hvp=hvp)
    return fd_rows(engine, hypers, engine.hypergradient(hypers).grads, seed=seed, eps=eps)


def check_hvp(net, *, seed=0, h=1e-4, batch=6, hvp="ror") -> list:
    """[('hvp', |Hv|, |FD|, max|Hv - FD| / max|FD|)] at perturbed initial weights (BN scales off 1)."""
    from gpu_ver import models as M  # noqa: PLC0415

    f = M.Functions(net, hvp)
    rng = np.random.default_rng(seed + 3)
    X = rng.standard_normal((batch, *net.input_shape))
    y = rng.integers(0, net.n_classes, batch)
    w = net.init(seed) + 0.1 * rng.standard_normal(net.layout.size)
    l2 = np.exp(rng.uniform(-7, -4, net.layout.size))
    v = rng.standard_normal(w.size)
    hv, _ = f.hvp(w, l2, X, y, v)
    gf = lambda s: f.grad(w + s * v, l2, X, y)  # noqa: E731
    fd = (8.0 * (gf(h) - gf(-h)) - (gf(2 * h) - gf(-2 * h))) / (12.0 * h)
    err = float(np.max(np.abs(hv - fd)) / max(np.max(np.abs(fd)), 1e-300))
    return [("all", float(np.linalg.norm(hv)), float(np.linalg.norm(fd)), err)]


def run_checks(parts=PARTS, *, seed=0, T_mlp=30, T_densenet=6, eps=1e-3, hvp="ror") -> tuple:
    """(rows [(method, group, analytic, numeric, rel_err)], timings); ``hvp``: the reverse
    steps' Hessian-vector product ('rop' or 'ror', ``gpu_ver.models.symbolic_grad_and_hvp``)."""
    from gpu_ver.problem import floatX  # noqa: PLC0415

    if floatX() != "float64":
        raise ConfigError(f"finite-difference checks need float64 (got floatX={floatX()}); use --floatX float64")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ConfigError(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    rows, timings = [], {}
    if "mlp" in parts:
        t0 = time.perf_counter()
        problem, hypers = mlp_problem(seed, T_mlp)
        rows += [("drmad_K=T:mlp", *r) for r in check_drmad(problem, hypers, seed=seed, eps=eps, hvp=hvp)]
        timings["mlp_s"] = time.perf_counter() - t0
    if "hvp" in parts or "densenet" in parts or "exact" in parts:
        problem, hypers = densenet_problem(seed, T_densenet)
        if "hvp" in parts:
            t0 = time.perf_counter()
            rows += [("hvp:densenet", *r) for r in check_hvp(problem.model, seed=seed, hvp=hvp)]
            timings["hvp_s"] = time.perf_counter() - t0
        if "densenet" in parts:
            t0 = time.perf_counter()
            rows += [("drmad_K=T:densenet", *r) for r in check_drmad(problem, hypers, seed=seed, eps=eps, hvp=hvp)]
            timings["densenet_s"] = time.perf_counter() - t0
        if "exact" in parts:
            t0 = time.perf_counter()
            rows += [("exact:densenet", *r) for r in check_exact(problem, hypers, seed=seed, eps=eps, hvp=hvp)]
            timings["exact_s"] = time.perf_counter() - t0
    if "adaptive" in parts:
        from gpu_ver import online as adaptive  # noqa: PLC0415
        t0 = time.perf_counter()
        nan = float("nan")
        rows += [(f"adaptive:{m}", "one-step", nan, nan, float(e)) for m, e in adaptive.check_all().items()]
        timings["adaptive_s"] = time.perf_counter() - t0
    return rows, timings
