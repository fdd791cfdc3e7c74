"""``python -m gpu_ver hypergrad``: one hypergradient of the validation loss, exact
(``gpu_ver.reversible``), DrMAD (``gpu_ver.drmad``) or both, for the MLP or DenseNet.

``--method exact``: exact reversal (reports ``reversal_max_abs_error``, always 0.0 or
the run fails, ``buffer_bits`` against ``information_floor_bits``). ``--method drmad``:
DrMAD with ``--K``, ``--grid``, ``--velocity``. ``--method all``: the exact
hypergradient and every DrMAD completion at ``--K`` (grid ``t/T`` and ``cumlr`` x
velocity ``reconstruct`` and ``ignore``), with ``agreement_vs_exact``: per completion
and hyperparameter group, the cosine similarity, the sign agreement (fraction of entries
whose sign equals the exact one's) and the relative error ``|d - e| / |e|`` (Euclidean
norms). A velocity-``ignore`` completion has no learning-rate or momentum
hypergradient, so only its L2 and initial-scale groups are compared.

Files: ``results.json``, ``hypergradient.npz`` (keys ``METHOD/GROUP``),
``hypergradient.png`` (exact and the completions that give every tuned group),
``command.txt``. The model, data and hyperparameter options are ``gpu_ver drmad``'s
(``gpu_ver.cli.problem.add_problem_arguments``). This module does not import Theano at the
top, so the parser can be built before ``gpu_ver.config.load``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gpu_ver.cli.problem import add_problem_arguments, build_problem
from shared.cli import config_of, record_argv

METHODS = ("exact", "drmad", "all")
COMPLETIONS = (("t/T", "reconstruct"), ("cumlr", "reconstruct"), ("t/T", "ignore"), ("cumlr", "ignore"))


def completion_name(K, grid, velocity) -> str:
    return f"drmad[K={K},{grid},{velocity}]"


def agreement(approx: np.ndarray, exact: np.ndarray) -> dict:
    """Cosine similarity, sign agreement and relative error of ``approx`` against ``exact``."""
    a, e = np.ravel(np.asarray(approx, float)), np.ravel(np.asarray(exact, float))
    na, ne = float(np.linalg.norm(a)), float(np.linalg.norm(e))
    return {"cosine": float(a @ e / (na * ne)) if na > 0 and ne > 0 else float("nan"),
            "sign_agreement": float(np.mean(np.sign(a) == np.sign(e))) if e.size else float("nan"),
            "rel_err": float(np.linalg.norm(a - e) / ne) if ne > 0 else float("nan")}


def compare(exact: dict, approx: dict, groups) -> dict:
    """{group: agreement} for the groups both give."""
    return {g: agreement(approx[g], exact[g]) for g in groups if g in approx and g in exact}


def add_hypergrad_arguments(p):
    add_problem_arguments(p)
    p.add_argument("--method", default="all", choices=METHODS,
                   help="exact (reversible), drmad (--K/--grid/--velocity), or all (exact and every DrMAD "
                        "completion at --K, with their agreement)")
    p.add_argument("--no-progress", action="store_true")



def run_hypergrad(args) -> int:
    from shared import records  # noqa: PLC0415

    out = Path(args.out)          # resolved once by gpu_ver.__main__ (shared.cli.prepare_run_folder)
    t0 = time.perf_counter()
    problem, hypers, data_desc = build_problem(args)
    from gpu_ver import drmad as D  # noqa: PLC0415
    from gpu_ver import reversible as R  # noqa: PLC0415

    tuned, progress = hypers.tuned, not args.no_progress
    if args.method == "drmad" and args.velocity == "ignore":
        bad = [g for g in ("lr", "momentum") if g in tuned]
        if bad:
            from shared.errors import ConfigError  # noqa: PLC0415
            raise ConfigError(f"--velocity ignore gives no hypergradient for {bad}; use --hypers l2,init_scale "
                              "or --velocity reconstruct")
    plan = []                                            # (name, build the engine) in order
    if args.method in ("exact", "all"):
        plan.append(("exact", lambda: R.Reversible(problem, hypers, hvp=args.hvp)))
    if args.method == "drmad":
        plan.append((completion_name(args.K, args.grid, args.velocity),
                     lambda: D.DrMAD(problem, hypers, K=args.K, grid=args.grid, velocity=args.velocity,
                                     hvp=args.hvp)))
    if args.method == "all":
        plan += [(completion_name(args.K, g, v), lambda g=g, v=v: D.DrMAD(problem, hypers, K=args.K, grid=g,
                                                                            velocity=v, hvp=args.hvp))
                 for g, v in COMPLETIONS]
    timings = {"setup_s": time.perf_counter() - t0}
    results = {}
    for name, make in plan:
        t1 = time.perf_counter()
        eng = make()
        t2 = time.perf_counter()
        results[name] = eng.hypergradient(hypers, progress=progress)
        timings[f"{name}_compile_s"], timings[f"{name}_s"] = t2 - t1, time.perf_counter() - t2
    main_name = plan[0][0]
    main = results[main_name]
    metrics = {"val_loss": main.objective,
               "hypergradient_norm": {m: {g: float(np.linalg.norm(r.grads[g])) for g in tuned if g in r.grads}
                                      for m, r in results.items()}}
    if "exact" in results:
        info = results["exact"].info
        metrics.update({k: info[k] for k in ("reversal_max_abs_error", "buffer_bits", "information_floor_bits",
                                             "buffer_bits_per_weight_step")})
        metrics["buffer_over_floor"] = info["buffer_bits"] / info["information_floor_bits"]
    if args.method == "all":
        ex = results["exact"].grads
        metrics["agreement_vs_exact"] = {m: compare(ex, r.grads, tuned) for m, r in results.items() if m != "exact"}
    grads = {m: r.grads for m, r in results.items()}
    from shared.plotting import hypergradient_figure, save_hypergradients  # noqa: PLC0415

    records.make_run_dir(out)
    save_hypergradients(out / "hypergradient.npz", grads, tuned)
    full = {m: g for m, g in grads.items() if all(n in g for n in tuned)}
    hypergradient_figure(out / "hypergradient.png", hypers, full,
                         f"hypergradients of the validation loss - {args.model}, {args.iters} steps, "
                         f"floatX {D.floatX()}")
    config = {**config_of(args), "data": data_desc, "problem": problem.describe(), "floatX": D.floatX()}
    records.write_results(out, record_argv("gpu_ver", args), config, metrics, timings)
    _print(metrics, main_name)
    print(f"results: {out / records.RESULTS_FILE}")
    return 0


def _print(metrics, main_name) -> None:
    norms = metrics["hypergradient_norm"][main_name]
    print(f"validation loss {metrics['val_loss']:.6f}; |hypergradient| ({main_name}): "
          + ", ".join(f"{k} {v:.3e}" for k, v in norms.items()))
    if "reversal_max_abs_error" in metrics:
        print(f"exact reversal: max |w0 error| {metrics['reversal_max_abs_error']}, buffer "
              f"{metrics['buffer_over_floor']:.6f} x the information floor")
    for m, rows in metrics.get("agreement_vs_exact", {}).items():
        print(f"  {m:<34}" + "  ".join(f"{g}: cos {r['cosine']:+.4f} sign {r['sign_agreement']:.3f}"
                                       for g, r in rows.items()))
