"""``python -m gpu_ver check``: the finite-difference checks of ``gpu_ver.fdcheck``, one
table, ``results.json`` with ``max_rel_err`` (method -> number), exit status 1 if one is
above ``--tol``. Theano is imported inside ``run_check`` only.
"""
from __future__ import annotations

import time

from gpu_ver.cli.problem import add_hvp_argument, check_hvp_option
from gpu_ver.fdcheck import PARTS
from shared.cli import config_of, record_argv
from shared.fdcheck import print_table, worst_by_method


def add_check_arguments(p):
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--iters", type=int, default=30, help="training steps of the MLP check problem")
    p.add_argument("--densenet-iters", type=int, default=6, help="training steps of the DenseNet check problem")
    p.add_argument("--eps", type=float, default=1e-3, help="relative finite-difference step")
    p.add_argument("--tol", type=float, default=1e-6)
    add_hvp_argument(p)


def run_check(args) -> int:
    from shared import records  # noqa: PLC0415

    check_hvp_option(args)
    parts = tuple(p for p in str(args.parts).split(",") if p)
    t0 = time.perf_counter()
    from gpu_ver.fdcheck import run_checks  # noqa: PLC0415 (loads Theano)

    rows, timings = run_checks(parts, seed=args.seed, T_mlp=args.iters, T_densenet=args.densenet_iters,
                               eps=args.eps, hvp=args.hvp)
    timings["total_s"] = time.perf_counter() - t0
    print_table(rows, args.tol)
    worst = worst_by_method(rows)
    out = args.out or records.default_run_dir("check")
    records.write_results(out, record_argv("gpu_ver", args), {**config_of(args), "floatX": "float64"},
                          {"max_rel_err": worst, "rows": [list(r) for r in rows], "tol": args.tol}, timings)
    print(f"results: {out}/{records.RESULTS_FILE}")
    bad = [m for m, e in worst.items() if not e <= args.tol]
    if bad:
        print(f"FAILED (tolerance {args.tol:g}): {', '.join(bad)}")
        return 1
    print(f"all {len(rows)} checks within {args.tol:g}")
    return 0
