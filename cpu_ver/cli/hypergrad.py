"""``python -m cpu_ver hypergrad``: one hypergradient of the meta-objective, exact
(``cpu_ver.reversible``), DrMAD (``cpu_ver.drmad``), checked by finite differences
(``fd``), or all of them with their agreement.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cpu_ver.cli.problem import build, drmad_options, finish, run_config


def cmd_hypergrad(args):
    from cpu_ver import drmad, reversible
    from cpu_ver.fdcheck import check_groups

    problem, hypers, data = build(args)
    timings, metrics = {}, {}
    tuned = hypers.tuned
    results = {}
    if args.method in ("exact", "all"):
        t0 = time.perf_counter()
        results["exact"] = reversible.hypergradient(problem, hypers, progress=args.progress)
        timings["exact_s"] = time.perf_counter() - t0
        metrics.update(results["exact"].info)
    if args.method in ("drmad", "all"):
        t0 = time.perf_counter()
        results["drmad"] = drmad.hypergradient(problem, hypers, progress=args.progress, **drmad_options(args))
        timings["drmad_s"] = time.perf_counter() - t0
    if args.method == "fd":
        t0 = time.perf_counter()
        results["exact"] = reversible.hypergradient(problem, hypers, progress=args.progress)
        rows = check_groups(problem, hypers, results["exact"].grads, seed=args.seed, groups=tuned)
        metrics["fd_directional"] = {r[0]: {"analytic": r[1], "numeric": r[2], "rel_err": r[3]} for r in rows}
        timings["fd_s"] = time.perf_counter() - t0
    main_res = results.get("exact") or results.get("drmad")
    metrics["val_loss"] = main_res.objective
    metrics["hypergradient"] = {g: main_res.grads[g].tolist() for g in tuned if g in main_res.grads}
    metrics["hypergradient_norm"] = {g: float(np.linalg.norm(main_res.grads[g]))
                                     for g in tuned if g in main_res.grads}
    if args.method == "all":
        ex, dm = results["exact"].grads, results["drmad"].grads
        cos, sign = {}, {}
        for g in tuned:
            if g in dm:
                a, b = ex[g].ravel(), dm[g].ravel()
                cos[g] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))
                sign[g] = float(np.mean(np.sign(a) == np.sign(b)))      # fraction of entries of the same sign
        metrics["cosine_drmad_vs_exact"] = cos
        metrics["sign_agreement_drmad_vs_exact"] = sign
        metrics["drmad_hypergradient"] = {g: dm[g].tolist() for g in tuned if g in dm}
        t0 = time.perf_counter()
        rows = check_groups(problem, hypers, ex, seed=args.seed, groups=tuned)
        timings["fd_s"] = time.perf_counter() - t0
        metrics["max_rel_err_exact_vs_fd"] = max(r[3] for r in rows)
        metrics["fd_directional"] = {r[0]: {"analytic": r[1], "numeric": r[2], "rel_err": r[3]} for r in rows}
    from shared.plotting import METHOD_LABELS, hypergradient_figure, save_hypergradients
    from shared.records import make_run_dir
    grads = {m: r.grads for m, r in results.items()}
    out = make_run_dir(args.out)      # first use: with --overwrite, the earlier run's files go now, not after these
    save_hypergradients(out / "hypergradient.npz", grads, tuned)
    hypergradient_figure(out / "hypergradient.png", hypers, grads,
                         f"hypergradients of the validation loss: {', '.join(METHOD_LABELS.get(m, m) for m in grads)} "
                         f"- {data.name}, {args.iters} training steps")
    print(f"objective {metrics['val_loss']:.6f}; |hypergradient| per group: "
          + ", ".join(f"{k} {v:.3e}" for k, v in metrics["hypergradient_norm"].items()))
    for k in ("reversal_max_abs_error", "buffer_bits_per_weight_step", "cosine_drmad_vs_exact",
              "max_rel_err_exact_vs_fd"):
        if k in metrics:
            print(f"{k}: {metrics[k]}")
    finish(args, "hypergrad", run_config(args, data), metrics, timings)
