"""DrMAD's completions against the exact hypergradient on a small DenseNet (gpu_ver).

The fidelity study of the seed thesis's network, which it could not measure: for each
number of steps T, momentum and DrMAD completion, the cosine similarity and the sign
agreement (``gpu_ver.cli.hypergrad.agreement``) of DrMAD's hypergradient
(``gpu_ver.drmad.DrMAD``) with the exact one (``gpu_ver.reversible.Reversible``,
bit-exact reversal), per hyperparameter group.

Problem: ``python -m gpu_ver check``'s DenseNet (depth 7, growth 4, softplus, batch
norm with batch statistics, 3,948 weights in 20 blocks) on synthetic 8x8 images (32
training examples, batch 8; 12 validation examples in 2 chunks), float64, Theano's C
backend. Hyperparameters, all tuned: L2 1e-4 per block; learning rate per step,
decaying linearly from 0.05 to 0.01 over the T steps (the same for every block, so the
``cumlr`` grid differs from ``t/T``); momentum per block, one value for the whole run;
initial scales per block (1).

Completions: K segments (K = 1 is DrMAD proper; K = T stores every weight vector and
must agree with exact to rounding: the study's own check), grid ``t/T`` and ``cumlr``,
velocity ``reconstruct``. Velocity ``ignore`` drops the learning-rate and momentum
hypergradients and leaves the recursion of dw, dv and dl2 unchanged, so its L2 and
initial-scale hypergradients equal ``reconstruct``'s; it is run once per (T, momentum)
at K = 1, grid t/T, and ``ignore_max_rel_diff`` reports that difference.

  --quick   T = 50, 100; momenta 0.5, 0.9, 0.99; K = 1, 4, T. Loading the compiled
            engines dominates short runs, so the engines of one T serve every
            momentum: 7 minutes on the loaded 2-core machine (418 s; without that
            reuse it did not finish in 15); the first run also compiles the
            reverse steps, about 3 minutes more
  default   T = 100, 300, 1000 (--steps), K = 1, 4, 16, T (--K), the three momenta
            (--momenta)
  --json FILE, --plot FILE (PNG: cosine and sign agreement against T, one panel per
            group and momentum, one line per K and grid); --plot-from FILE... draws
            the plot from the rows of earlier --json files (the figures are
            deterministic, so runs of parts of the grid in separate processes
            combine into one study).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GROUPS = ("l2", "lr", "momentum", "init_scale")
GRIDS = ("t/T", "cumlr")
LR0, LR1, L2 = 0.05, 0.01, 1e-4


def make(T: int, momentum: float):
    """(problem, hypers) of the study at T steps and one momentum for every block."""
    from gpu_ver import fdcheck as GC  # noqa: PLC0415

    problem, _ = GC.densenet_problem(0, T=T)
    lr = LR0 + (LR1 - LR0) * np.arange(T) / max(T - 1, 1)
    return problem, problem.hypers(lr=lr, momentum=momentum, l2=L2, l2_shape="block", lr_shape="iter",
                                   momentum_shape="block", groups=GROUPS)


def k_values(ks, T) -> list:
    """The K of the study at T steps (``'T'`` is every step), each clipped to T, no repeats."""
    return sorted({T if k == "T" else min(int(k), T) for k in ks})


def study_one(T: int, momentum: float, ks, log=print, engines=None) -> dict:
    """Exact and every completion at (T, momentum): {'rows': [...], 'ignore_max_rel_diff', timings}.

    ``engines``: a dict kept between calls; the compiled engines of one T serve every
    momentum (only the hyperparameter values change), which saves loading them again."""
    from gpu_ver import drmad as D  # noqa: PLC0415
    from gpu_ver import reversible as R  # noqa: PLC0415
    from gpu_ver.cli.hypergrad import compare  # noqa: PLC0415

    engines = {} if engines is None else engines
    problem, H = make(T, momentum)

    def get(key, build):
        if key not in engines:
            engines[key] = build()
        return engines[key]

    t0 = time.perf_counter()
    ex = get((T, "exact"), lambda: R.Reversible(problem, H)).hypergradient(H)
    t_exact = time.perf_counter() - t0
    assert ex.info["reversal_max_abs_error"] == 0.0
    rows = []
    for K in k_values(ks, T):
        for grid in GRIDS:
            if K == T and grid == "cumlr":
                continue                  # every step stored: the grid is never used
            t0 = time.perf_counter()
            d = get((T, K, grid, "reconstruct"),
                    lambda: D.DrMAD(problem, H, K=K, grid=grid, velocity="reconstruct")).hypergradient(H)
            rows.append({"T": T, "momentum": momentum, "K": K, "grid": grid, "seconds": time.perf_counter() - t0,
                         "agreement": compare(ex.grads, d.grads, GROUPS)})
            if K == 1 and grid == "t/T":
                ref = d
    ign = get((T, 1, "t/T", "ignore"), lambda: D.DrMAD(problem, H, K=1, grid="t/T", velocity="ignore")).hypergradient(H)
    diff = max(float(np.linalg.norm(ign.grads[g] - ref.grads[g]) / np.linalg.norm(ref.grads[g]))
               for g in ("l2", "init_scale"))
    for r in rows:
        a = r["agreement"]
        log(f"  T={T:5d} momentum {momentum:<5} K={r['K']:<5d} {r['grid']:<6}"
            + "  ".join(f"{g}: cos {a[g]['cosine']:+.3f} sign {a[g]['sign_agreement']:.2f}" for g in GROUPS))
    return {"rows": rows, "ignore_max_rel_diff": diff, "exact_s": t_exact,
            "exact_bits_over_floor": ex.info["buffer_bits"] / ex.info["information_floor_bits"],
            "exact_grad_norms": {g: float(np.linalg.norm(ex.grads[g])) for g in GROUPS}}


# --------------------------------------------------------------------------- plot
def _tick_labels(Ts) -> list:
    """T as labels, leaving out one that would overlap the previous label on a log axis."""
    out, last = [], None
    for t in Ts:
        keep = last is None or np.log10(t / last) >= 0.2
        out.append(str(t) if keep else "")
        last = t if keep else last
    return out



def plot(path, rows, title) -> Path:
    """Two rows of panels per group (cosine, sign agreement) x momentum; x = T (log)."""
    from shared.plotting import pyplot  # noqa: PLC0415

    plt = pyplot()
    moms = sorted({r["momentum"] for r in rows})
    Ts = sorted({r["T"] for r in rows})
    series = sorted({("T" if r["K"] == r["T"] else r["K"], r["grid"]) for r in rows},
                    key=lambda s: (s[0] == "T", s[0] if s[0] != "T" else 0, GRIDS.index(s[1])))
    ks = [k for k in dict.fromkeys(s[0] for s in series)]
    colours = dict(zip(ks, plt.cm.viridis(np.linspace(0, 0.9, len(ks)))))
    metrics = (("cosine", "cosine similarity"), ("sign_agreement", "sign agreement"))
    fig, axes = plt.subplots(2 * len(GROUPS), len(moms), figsize=(4.2 * len(moms), 2.3 * 2 * len(GROUPS)),
                             sharex=True, squeeze=False)
    for gi, g in enumerate(GROUPS):
        for mi, (key, label) in enumerate(metrics):
            for ci, mom in enumerate(moms):
                ax = axes[2 * gi + mi, ci]
                for k, grid in series:
                    pts = [(r["T"], r["agreement"][g][key]) for r in rows if r["momentum"] == mom
                           and r["grid"] == grid and ("T" if r["K"] == r["T"] else r["K"]) == k]
                    if not pts:
                        continue
                    x, yv = zip(*sorted(pts))
                    ax.plot(x, yv, "-" if grid == "t/T" else "--", marker="o" if grid == "t/T" else "s",
                            color=colours[k], ms=4, label=f"K={k}" + ("" if k == "T" else f", {grid}"))
                ax.set_xscale("log")
                ax.set_xticks(Ts)
                ax.set_xticklabels(_tick_labels(Ts))
                ax.minorticks_off()
                ax.axhline(1.0, color="0.8", lw=0.8, zorder=0)
                if key == "cosine":
                    ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
                    ax.set_ylim(-1.05, 1.05)
                else:
                    ax.axhline(0.5, color="0.8", lw=0.8, ls=":", zorder=0)
                    ax.set_ylim(-0.02, 1.02)
                ax.grid(alpha=0.3)
                if gi == 0 and mi == 0:
                    ax.set_title(f"momentum {mom}")
                if ci == 0:
                    ax.set_ylabel(f"{g}\n{label}", fontsize=9)
                if gi == len(GROUPS) - 1 and mi == 1:
                    ax.set_xlabel("training steps T")
    h, lab = axes[0, 0].get_legend_handles_labels()
    H = fig.get_figheight()
    fig.suptitle(title, y=1.0 - 0.12 / H, fontsize=11)
    fig.legend(h, lab, loc="upper center", ncol=min(len(lab), 7), fontsize=9, bbox_to_anchor=(0.5, 1.0 - 0.4 / H))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / H))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


TITLE = ("DrMAD completions vs the exact hypergradient - DenseNet depth 7 growth 4 (batch norm), "
         "8x8 synthetic, lr 0.05 -> 0.01 per step")


def replot(files, out) -> int:
    """--plot-from: the rows of earlier --json files (later files replace equal cases) in one plot."""
    if not out:
        print("error: --plot-from needs --plot FILE", file=sys.stderr)
        return 2
    rows = {}
    for f in files:
        try:
            data = json.loads(Path(f).read_text())["rows"]
        except (OSError, ValueError, KeyError) as e:
            print(f"error: --plot-from {f}: not a --json file of this script ({type(e).__name__})", file=sys.stderr)
            return 2
        rows.update({(r["T"], r["momentum"], r["K"], r["grid"]): r for r in data})
    print(f"plot: {plot(out, list(rows.values()), TITLE)} ({len(rows)} completions from {len(files)} files)")
    return 0


# --------------------------------------------------------------------------- main
def _ints(text, option, allow_T=False):
    out = []
    for s in text.split(","):
        s = s.strip()
        if allow_T and s == "T":
            out.append("T")
            continue
        if not s.isdigit() or int(s) < 1:
            raise ValueError(f"error: {option} takes positive integers{' or T' if allow_T else ''}, got {text!r}")
        out.append(int(s))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 50, 100, K = 1, 4, T (a few minutes)")
    ap.add_argument("--steps", help="comma-separated T (default 100,300,1000; quick 50,100)")
    ap.add_argument("--momenta", default="0.5,0.9,0.99", help="comma-separated momenta in (0, 1)")
    ap.add_argument("--K", help="comma-separated K (T: every step stored; default 1,4,16,T; quick 1,4,T)")
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    ap.add_argument("--plot", metavar="FILE", help="write the PNG to FILE")
    ap.add_argument("--plot-from", nargs="+", metavar="JSON", help="no runs: plot the rows of these --json files")
    args = ap.parse_args(argv)
    if args.plot_from:
        return replot(args.plot_from, args.plot)
    try:
        Ts = _ints(args.steps or ("50,100" if args.quick else "100,300,1000"), "--steps")
        ks = _ints(args.K or ("1,4,T" if args.quick else "1,4,16,T"), "--K", allow_T=True)
        try:
            moms = [float(m) for m in args.momenta.split(",")]
        except ValueError:
            moms = [-1.0]
        if not all(0 < m < 1 for m in moms):
            raise ValueError(f"error: --momenta takes numbers in (0, 1), got {args.momenta!r}")
        if min(Ts) < 2:
            raise ValueError(f"error: --steps must be >= 2, got {args.steps!r}")
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    from gpu_ver import config  # noqa: PLC0415

    config.load(device="cpu", floatX="float64")
    print(f"DrMAD vs exact on gpu_ver: DenseNet depth 7 growth 4 (batch norm), 8x8 synthetic, float64; "
          f"T {Ts}, momenta {moms}, K {ks}", flush=True)
    t0 = time.perf_counter()
    rows, per_case = [], []
    for T in Ts:
        engines = {}
        for m in moms:
            one = study_one(T, m, ks, engines=engines)
            rows += one.pop("rows")
            per_case.append({"T": T, "momentum": m, **one})
    worst_full = min((r["agreement"][g]["cosine"] for r in rows if r["K"] == r["T"] for g in GROUPS),
                     default=float("nan"))
    ign = max(c["ignore_max_rel_diff"] for c in per_case)
    full = f"worst cosine {worst_full:.12f}" if np.isfinite(worst_full) else "not run (--K without T)"
    print(f"K = T (every step stored) against exact: {full}; velocity ignore vs reconstruct (l2, init_scale): "
          f"max relative difference {ign:.2e}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.plot:
        print(f"plot: {plot(args.plot, rows, TITLE)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cases": per_case, "k_equals_T_worst_cosine": worst_full,
                                               "ignore_max_rel_diff": ign,
                                               "config": {"steps": Ts, "momenta": moms, "K": ks, "lr": [LR0, LR1],
                                                          "l2": L2, "quick": args.quick,
                                                          "seconds": time.perf_counter() - t0}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
