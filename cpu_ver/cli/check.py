"""``python -m cpu_ver check``: the finite-difference checks of ``cpu_ver.fdcheck`` and the
online methods' one-step checks, one table, ``results.json`` with ``max_rel_err``
(method -> number); exit status 1 if one is above ``--tol``.
"""
from __future__ import annotations

import sys
import time

from cpu_ver.cli.problem import finish, run_config


def cmd_check(args):
    from cpu_ver.fdcheck import check_methods
    from shared.fdcheck import print_table, worst_by_method

    t0 = time.perf_counter()
    table = check_methods(seed=args.seed, T=args.iters)
    timings = {"hypergradients_s": time.perf_counter() - t0}
    rows = [(m, g, a, n, e) for m, rs in table.items() for (g, a, n, e) in rs]
    try:
        from cpu_ver import online as adaptive
        t0 = time.perf_counter()
        for m, e in adaptive.check_all(tol=args.tol).items():
            rows.append((f"adaptive:{m}", "one-step", float("nan"), float("nan"), float(e)))
        timings["adaptive_s"] = time.perf_counter() - t0
    except ImportError:
        pass
    print_table(rows, args.tol)
    worst = worst_by_method(rows)
    finish(args, "check", run_config(args), {"max_rel_err": worst,
                                             "rows": [list(r) for r in rows]}, timings)
    bad = [m for m, e in worst.items() if not e <= args.tol]
    if bad:
        print(f"FAILED (tolerance {args.tol:g}): {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"all {len(rows)} checks within {args.tol:g}")
    return 0
