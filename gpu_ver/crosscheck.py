"""The same MLP problem through both backends (``python -m gpu_ver crosscheck``,
``gpu_ver.cli.crosscheck``).

One problem (scikit-learn's digits, 300 train / 200 validation; MLP 64-20-10
tanh by default; the same initial weights, minibatches and hyperparameters:
per-unit L2, per-iteration x per-block learning rates and momenta, per-block
initial scales) is run by ``cpu_ver`` (autograd, float64: the reference,
imported lazily here and nowhere else in gpu_ver) and by ``gpu_ver`` (Theano,
in ``floatX``). Metrics:

``max_rel_diff_weights``   training trajectory: max over w_1, w_{T/3},
                           w_{2T/3}, w_T of max|w_gpu - w_cpu| / max|w_cpu|
                           (both with the quantised momentum).
``max_rel_diff_hypergradient``   method -> number: ``drmad`` (K = 1, grid t/T,
                           velocity reconstructed, every group) and each
                           method of ``gpu_ver.online.crosscheck_adaptive()``
                           when that module exists. Per group
                           max|g_gpu - g_cpu| / max|g_cpu|, then the max over groups.
``max_rel_diff_drmad_full_vs_exact``   gpu DrMAD with K = T against cpu_ver's
                           exact reversible hypergradient (same measure).
``max_rel_diff_exact``     gpu_ver's exact reversal (``gpu_ver.reversible``)
                           against cpu_ver's (same measure); ``exact_reversal_bit_exact``
                           says gpu_ver recovered w0, v0 and the empty buffer.

Targets: float64 1e-12 (weights, exact), 1e-10 (hypergradients), 1e-8 (full vs
exact); float32 (a GPU run against the float64 reference) 1e-4 for all. Exit
status of the command is 1 if one is missed. Figures are reported with the dtype.
"""
from __future__ import annotations

import time

import numpy as np

TARGETS = {"float64": {"weights": 1e-12, "hypergradient": 1e-10, "full_vs_exact": 1e-8, "exact": 1e-12},
           "float32": {"weights": 1e-4, "hypergradient": 1e-4, "full_vs_exact": 1e-4, "exact": 1e-4}}


def rel_diff(a, b) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    d = float(np.max(np.abs(a - b))) if b.size else 0.0
    return 0.0 if d == 0 else (d / scale if scale > 0 else float("inf"))


def group_diffs(ga: dict, gb: dict) -> dict:
    return {k: rel_diff(ga[k], gb[k]) for k in gb if k in ga}


def build(seed=0, T=30, layers=(64, 20, 10), activation="tanh", batch=50, dataset="digits"):
    """(cpu problem, gpu problem, hypers): identical data, init, batches, hyperparameters."""
    from cpu_ver import models as CM  # noqa: PLC0415 (the reference, lazily)
    from cpu_ver.problem import Problem as CProblem  # noqa: PLC0415
    from gpu_ver import models as M  # noqa: PLC0415
    from gpu_ver.problem import Problem as GProblem  # noqa: PLC0415
    from shared.datasets import load, make_synthetic  # noqa: PLC0415
    from shared.hyperparams import n_units  # noqa: PLC0415

    if dataset == "digits":
        data = load("digits", n_train=300, n_val=200, n_test=100, seed=seed)
    else:  # no scikit-learn (the GPU bundle): Gaussian clusters of the same size and shape
        data = make_synthetic(n=300, n_features=layers[0], n_classes=layers[-1], seed=seed, n_val=200, n_test=100)
    cp = CProblem.from_dataset(CM.MLP(tuple(layers), activation), data, n_iters=T, batch_size=batch,
                               batch_seed=seed, init_seed=seed)
    gp = GProblem.from_dataset(M.MLP(tuple(layers), activation), data, n_iters=T, batch_size=batch,
                                batch_seed=seed, init_seed=seed)
    rng = np.random.default_rng(seed + 1)
    lay = gp.layout
    nb = lay.n_blocks
    hypers = gp.hypers(lr=np.exp(rng.uniform(-1.5, -0.5, (T, nb))), momentum=rng.uniform(0.5, 0.9, (T, nb)),
                       l2=np.exp(rng.uniform(-7, -4, n_units(lay))), l2_shape="unit", lr_shape="iter_block",
                       momentum_shape="iter_block", groups=("l2", "lr", "momentum", "init_scale"))
    assert np.array_equal(cp.w0(hypers), gp.w0(hypers))
    return cp, gp, hypers


def crosscheck(seed=0, T=30, layers=(64, 20, 10), activation="tanh", batch=50, adaptive=True,
               dataset="digits") -> tuple:
    """(metrics, timings)."""
    from cpu_ver import drmad as CD  # noqa: PLC0415
    from cpu_ver import reversible, sgd  # noqa: PLC0415
    from gpu_ver import drmad as D  # noqa: PLC0415
    from gpu_ver import reversible as GR  # noqa: PLC0415
    from gpu_ver.problem import floatX  # noqa: PLC0415

    timings = {}
    t0 = time.perf_counter()
    cp, gp, hypers = build(seed, T, layers, activation, batch, dataset)
    keep = sorted({1, max(T // 3, 1), max(2 * T // 3, 1), T})
    e1 = D.DrMAD(gp, hypers, K=1)
    eT = D.DrMAD(gp, hypers, K=T)
    timings["compile_s"] = e1.compile_s + eT.compile_s
    t1 = time.perf_counter()
    w_gpu = e1.forward(hypers, keep=keep)
    _, _, w_cpu = sgd.train(cp, hypers, snapshots=keep)
    per_step = {int(k): rel_diff(w_gpu[k], w_cpu[k]) for k in keep}
    t2 = time.perf_counter()
    g1 = e1.hypergradient(hypers)
    c1 = CD.hypergradient(cp, hypers, K=1)
    t3 = time.perf_counter()
    gT = eT.hypergradient(hypers)
    cx = reversible.hypergradient(cp, hypers)
    t4 = time.perf_counter()
    gx = GR.hypergradient(gp, hypers)
    t5 = time.perf_counter()
    timings.update({"trajectory_s": t2 - t1, "drmad_s": t3 - t2, "full_vs_exact_s": t4 - t3, "exact_s": t5 - t4})
    d_drmad = group_diffs(g1.grads, c1.grads)
    d_full = group_diffs(gT.grads, cx.grads)
    d_exact = group_diffs(gx.grads, cx.grads)
    metrics = {
        "dtype": floatX(),
        "max_rel_diff_weights": max(per_step.values()),
        "rel_diff_weights_by_step": per_step,
        "max_rel_diff_hypergradient": {"drmad": max(d_drmad.values())},
        "rel_diff_hypergradient_by_group": {"drmad": d_drmad, "drmad_full_vs_exact": d_full, "exact": d_exact},
        "max_rel_diff_drmad_full_vs_exact": max(d_full.values()),
        "max_rel_diff_exact": max(d_exact.values()),
        "exact_reversal_bit_exact": gx.info["reversal_max_abs_error"] == 0.0,
        "rel_diff_val_loss": abs(g1.objective - c1.objective) / abs(c1.objective),
        "problem": {"T": T, "layers": list(layers), "activation": activation, "batch": batch,
                    "n_params": gp.layout.size, "n_hypers": hypers.size},
    }
    if adaptive and metrics["dtype"] != "float64":
        metrics["adaptive"] = "skipped: the online methods' one-step checks need float64"
    elif adaptive:
        from gpu_ver import config  # noqa: PLC0415
        from gpu_ver.online import crosscheck_adaptive, unexpected_host_ops  # noqa: PLC0415
        t5 = time.perf_counter()
        for m, v in dict(crosscheck_adaptive()).items():
            metrics["max_rel_diff_hypergradient"][str(m)] = float(v)
        if config.on_gpu(config.load()):
            metrics["adaptive_unexpected_host_ops"] = unexpected_host_ops()
        timings["adaptive_s"] = time.perf_counter() - t5
    timings["total_s"] = time.perf_counter() - t0
    return metrics, timings


def verdict(metrics) -> list:
    """[(name, value, target, ok)]."""
    tg = TARGETS.get(metrics["dtype"], TARGETS["float32"])
    rows = [("max_rel_diff_weights", metrics["max_rel_diff_weights"], tg["weights"])]
    rows += [(f"max_rel_diff_hypergradient[{m}]", v, tg["hypergradient"])
             for m, v in metrics["max_rel_diff_hypergradient"].items()]
    rows.append(("max_rel_diff_drmad_full_vs_exact", metrics["max_rel_diff_drmad_full_vs_exact"],
                 tg["full_vs_exact"]))
    rows.append(("max_rel_diff_exact", metrics["max_rel_diff_exact"], tg["exact"]))
    return [(n, v, t, bool(v <= t)) for n, v, t in rows]


def print_table(metrics) -> None:
    print(f"gpu_ver ({metrics['dtype']}) vs cpu_ver (float64), MLP {metrics['problem']['layers']}, "
          f"T={metrics['problem']['T']}")
    print(f"{'metric':<48}{'value':>12}{'target':>10}")
    for n, v, t, ok in verdict(metrics):
        print(f"{n:<48}{v:>12.3e}{t:>10.0e}{'' if ok else '  FAIL'}")
    for meth, d in metrics["rel_diff_hypergradient_by_group"].items():
        print(f"  {meth:<22}" + "  ".join(f"{k} {v:.2e}" for k, v in d.items()))
    for meth, ops in (metrics.get("adaptive_unexpected_host_ops") or {}).items():
        print(f"  host ops of the device step [{meth}]: {', '.join(ops)}")
