"""``python -m gpu_ver check``: finite-difference checks of this backend's hypergradients.

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
exit status 1 if one is above ``--tol`` (default 1e-6). Needs float64.

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
    from gpu_ver import drmad as D  # noqa: PLC0415
    from gpu_ver import models as M  # noqa: PLC0415
    from shared.datasets import load  # noqa: PLC0415

    data = load("digits", n_train=300, n_val=200, n_test=100, seed=seed)
    problem = D.Problem.from_dataset(M.MLP((64, 20, 10), "tanh"), data, n_iters=T, batch_size=50,
                                     batch_seed=seed, init_seed=seed)
    return problem, _hypers(problem, seed, (-1.5, -0.5))


def densenet_problem(seed: int = 0, T: int = 6, depth: int = 7, growth: int = 4, activation: str = "softplus"):
    """Synthetic 8x8 images (32 train, 12 validation in 2 chunks, 4 classes), DenseNet
    depth 7 growth 4, batch 8, T steps."""
    from gpu_ver import drmad as D  # noqa: PLC0415
    from gpu_ver import models as M  # noqa: PLC0415
    from gpu_ver.train import synthetic_images  # noqa: PLC0415

    data = synthetic_images(n_train=32, n_val=12, n_test=8, n_classes=4, size=8, seed=seed)
    net = M.DenseNet(depth, growth, n_classes=4, input_shape=(3, 8, 8), activation=activation)
    problem = D.Problem.from_dataset(net, data, n_iters=T, batch_size=8, batch_seed=seed, init_seed=seed,
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
    from gpu_ver import drmad as D  # noqa: PLC0415

    if D.floatX() != "float64":
        raise ConfigError(f"finite-difference checks need float64 (got floatX={D.floatX()}); use --floatX float64")
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
        from gpu_ver import adaptive  # noqa: PLC0415
        t0 = time.perf_counter()
        nan = float("nan")
        rows += [(f"adaptive:{m}", "one-step", nan, nan, float(e)) for m, e in adaptive.check_all().items()]
        timings["adaptive_s"] = time.perf_counter() - t0
    return rows, timings


def print_table(rows, tol) -> None:
    print(f"{'method':<28}{'group':<12}{'analytic':>16}{'finite diff':>16}{'rel err':>11}")
    for m, g, a, n, e in rows:
        flag = "" if e <= tol else "  FAIL"
        a_s, n_s = (f"{a:>16.8e}", f"{n:>16.8e}") if np.isfinite(a) else (f"{'-':>16}", f"{'-':>16}")
        print(f"{m:<28}{g:<12}{a_s}{n_s}{e:>11.2e}{flag}")


# --------------------------------------------------------------------------- command line
def add_check_arguments(p):
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--iters", type=int, default=30, help="training steps of the MLP check problem")
    p.add_argument("--densenet-iters", type=int, default=6, help="training steps of the DenseNet check problem")
    p.add_argument("--eps", type=float, default=1e-3, help="relative finite-difference step")
    p.add_argument("--tol", type=float, default=1e-6)
    from gpu_ver.meta import add_hvp_argument  # noqa: PLC0415 (no Theano)

    add_hvp_argument(p)


add_check_args = add_check_arguments      # the registry's spelling (gpu_ver/__main__.py)


def run_check(args) -> int:
    from shared import records  # noqa: PLC0415
    from gpu_ver.meta import _argv, _config  # noqa: PLC0415

    from gpu_ver.meta import check_hvp_option  # noqa: PLC0415

    check_hvp_option(args)
    parts = tuple(p for p in str(args.parts).split(",") if p)
    t0 = time.perf_counter()
    rows, timings = run_checks(parts, seed=args.seed, T_mlp=args.iters, T_densenet=args.densenet_iters,
                               eps=args.eps, hvp=args.hvp)
    timings["total_s"] = time.perf_counter() - t0
    print_table(rows, args.tol)
    worst = {}
    for m, g, a, n, e in rows:
        worst[m] = max(worst.get(m, 0.0), e)
    out = args.out or records.default_run_dir("check")
    records.write_results(out, _argv(args), {**_config(args), "floatX": "float64"},
                          {"max_rel_err": worst, "rows": [list(r) for r in rows], "tol": args.tol}, timings)
    print(f"results: {out}/{records.RESULTS_FILE}")
    bad = [m for m, e in worst.items() if not e <= args.tol]
    if bad:
        print(f"FAILED (tolerance {args.tol:g}): {', '.join(bad)}")
        return 1
    print(f"all {len(rows)} checks within {args.tol:g}")
    return 0
