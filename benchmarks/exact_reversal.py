"""Exact reversible learning (cpu_ver/reversible.py, shared/exact_rep.py): cost and exactness.

All figures come from ONE run, as ratios of timings taken in interleaved rounds
(median over rounds), on the MLP 784-50-50-50-10, batch 200, float64, on the
real MNIST t10k digits in ../shared/data/mnist (the folder beside the
repository) when present, else the MLP 64-50-50-50-10 on scikit-learn digits.

  reversible_step_over_plain_step  a reversible forward step (fixed point + buffer)
                                   over a plain float SGD step            target <= 1.5
  buffer_ops_over_gradient         the ExactRep ops of one step (V.mul, V.sub, W.add)
                                   over one gradient evaluation            target <= 0.10
  vjp_over_gradient (= c)          grad_and_hvp over grad                  reported
  hypergradient_over_training      exact forward + reverse over plain training of the
                                   same T steps                            target <= 1 + c + 0.25
  bits_over_floor                  information-buffer bits over sum log2(d/n)
                                                                           target <= 1.05 + C/floor
                                   (C = 2 bits per weight; the constant-corrected ratio,
                                   the slope between two run lengths, must be <= 1.05)
  bit-exact reversal at T = 10,000 for momentum 0.5, 0.9, 0.99 (--quick: 150 steps)

Hypergradient timing: T = 300 (--quick 100; --iters); the meta-objective and its
gradient on the validation split (a fixed cost, in the hypergradient only) is
reported in the details. BLAS runs on one thread unless --threads says otherwise.

--quick finishes in about a minute; --json FILE writes the figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path


def _blas_threads(argv) -> None:
    """--threads N (default 1; 0 leaves the environment alone), applied before numpy loads.

    On a shared 2-core machine multi-threaded BLAS made single timings vary by 2x;
    one thread gives steadier ratios (and was faster there)."""
    n = "1"
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = argv[i + 1]
        elif a.startswith("--threads="):
            n = a.split("=", 1)[1]
    if n != "0":
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = n


if __name__ == "__main__":
    _blas_threads(sys.argv[1:])

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cpu_ver import reversible, sgd  # noqa: E402
from cpu_ver.models import MLP, parse_layers  # noqa: E402
from cpu_ver.problem import Problem, schedule  # noqa: E402
from shared.datasets import load  # noqa: E402
from shared.exact_rep import ExactRep, to_fixed  # noqa: E402
from shared.hyperparams import standard  # noqa: E402

MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
CONST_BITS_PER_WEIGHT = 2.0


def _median(xs):
    return float(np.median(np.asarray(xs, dtype=float)))


def _timed(f):
    gc.collect()
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def _interleaved(fns: dict, rounds: int, number: int = 1) -> dict:
    """name -> list of per-call times, one entry per round; the functions alternate in each round."""
    times = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(number):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / number)
    return times


def _ratio(times, num, den):
    return _median([a / b for a, b in zip(times[num], times[den])])


def make_problem(args, T):
    model = MLP(args.sizes, "tanh")
    P = Problem.from_dataset(model, args.data, n_iters=T, batch_size=args.batch)
    return model, P


def make_hypers(model, T, momentum=0.9, lr=0.1):
    return standard(model.layout, T, lr=lr, momentum=momentum, l2=1e-4,
                    init_scales=model.default_init_scales())


# ---------------------------------------------------------------------------

def step_costs(args) -> dict:
    """Reversible forward step vs plain SGD step; buffer ops and VJP vs one gradient."""
    K = args.step_block
    model, P = make_problem(args, K)
    H = make_hypers(model, K)
    reversible.forward(P, H)                      # warm up caches and code paths
    sgd.train(P, H)
    t = _interleaved({"reversible": lambda: reversible.forward(P, H),
                      "plain": lambda: sgd.train(P, H)}, args.rounds)
    step_ratio = _ratio(t, "reversible", "plain")

    # one step's ExactRep arithmetic on a realistic state (after a short training run)
    traj = reversible.forward(P, H)
    W, V = traj.W, traj.V
    s = schedule(H, 0)
    X, y = P.batch(0)
    w = W.val
    g = model.grad(w, s.l2, X, y)
    dec = (1.0 - s.gamma) * g
    inc = s.alpha * V.val
    reps = args.op_reps

    def ops():
        for i in range(reps):
            V.mul(s.n, i).sub(dec, i)
            W.add(inc * 1e-3, i)

    def grads():
        for _ in range(reps):
            model.grad(w, s.l2, X, y)

    def vjps():
        for _ in range(reps):
            model.grad_and_hvp(w, s.l2, X, y, g)

    parts = {"mul": lambda: [V.mul(s.n, i) for i in range(reps)],
             "sub": lambda: [V.sub(dec, i) for i in range(reps)],
             "add": lambda: [W.add(inc * 1e-3, i) for i in range(reps)],
             "val": lambda: [V.val for _ in range(reps)],
             "to_fixed": lambda: [to_fixed(dec) for _ in range(reps)]}
    t2 = _interleaved({"ops": ops, "grad": grads, "vjp": vjps, **parts}, args.rounds)
    per = {k: _median(v) / reps for k, v in t2.items()}
    return {
        "reversible_step_over_plain_step": step_ratio,
        "buffer_ops_over_gradient": _ratio(t2, "ops", "grad"),
        "vjp_over_gradient": _ratio(t2, "vjp", "grad"),
        "details": {
            "plain_step_ms": 1e3 * _median(t["plain"]) / K,
            "reversible_step_ms": 1e3 * _median(t["reversible"]) / K,
            "grad_ms": 1e3 * per["grad"], "grad_and_hvp_ms": 1e3 * per["vjp"],
            "buffer_ops_ms": 1e3 * per["ops"],
            "op_breakdown_ms": {k: 1e3 * per[k] for k in parts},
        },
    }


def hypergradient_cost(args) -> dict:
    """Exact forward + reverse over plain training of the same T steps; buffer bits vs floor."""
    T = args.iters
    model, P = make_problem(args, T)
    H = make_hypers(model, T)
    t = {"hyper": [], "train": [], "forward": [], "reverse": []}
    res = None
    for r in range(args.hyper_rounds):
        order = ("hyper", "train") if r % 2 == 0 else ("train", "hyper")
        for k in order:
            if k == "hyper":                     # reversible.hypergradient = forward then reverse
                dt_f, traj = _timed(lambda: reversible.forward(P, H))
                dt_r, res = _timed(lambda: reversible.reverse(P, H, traj))
                t["forward"].append(dt_f)
                t["reverse"].append(dt_r)
                t["hyper"].append(dt_f + dt_r)
            else:
                dt, _ = _timed(lambda: sgd.train(P, H))
                t["train"].append(dt)
    dt_obj, _ = _timed(lambda: (P.objective(res.w_final), P.objective_grad(res.w_final)))
    size = model.layout.size
    floor = reversible.information_floor_bits(P, H)
    bits = res.info["buffer_bits"]
    # the constant per weight: fit bits = a floor + C size from a run of half the length
    _, P2 = make_problem(args, T // 2)
    H2 = make_hypers(model, T // 2)
    traj2 = reversible.forward(P2, H2)
    bits2, floor2 = traj2.V.buffer.bits(), reversible.information_floor_bits(P2, H2)
    slope = (bits - bits2) / (floor - floor2)
    const = (bits - slope * floor) / size
    buf = traj2.V.buffer
    stored = None
    if hasattr(buf, "depth") and hasattr(buf, "words") and hasattr(buf, "head"):
        stored = float(np.sum(buf.depth) * 8 * buf.words.itemsize + 64 * size)
    return {
        "hypergradient_over_training": _ratio(t, "hyper", "train"),
        "bits_over_floor": bits / floor,
        "details_h": {
            "T": T, "momentum": 0.9, "hypergradient_s": _median(t["hyper"]), "training_s": _median(t["train"]),
            "forward_over_training": _ratio(t, "forward", "train"),
            "reverse_over_training": _ratio(t, "reverse", "train"),
            "meta_objective_and_grad_s": dt_obj,
            "buffer_bits_per_weight": bits / size, "floor_bits_per_weight": floor / size,
            "bits_over_floor_corrected": slope, "bits_constant_per_weight": const,
            "bits_over_floor_minus_allowed_constant": (bits - CONST_BITS_PER_WEIGHT * size) / floor,
            "stored_bits_over_floor_half_run": None if stored is None else stored / floor2,
            "reversal_max_abs_error": res.info["reversal_max_abs_error"],
        },
    }


def exactness(args) -> dict:
    """Bit-exact reversal for momentum 0.5, 0.9, 0.99 over ``exact_iters`` steps."""
    T = args.exact_iters
    out = {}
    for gamma in (0.5, 0.9, 0.99):
        model, P = make_problem(args, T)
        H = make_hypers(model, T, momentum=gamma, lr=0.05)
        t0 = time.perf_counter()
        traj = reversible.forward(P, H)
        t1 = time.perf_counter()
        w0 = traj.w0_fixed.copy()
        try:
            res = reversible.reverse(P, H, traj)
            ok = bool(np.array_equal(traj.W.c, w0) and not traj.V.c.any() and traj.V.buffer.is_empty()
                      and res.info["reversal_max_abs_error"] == 0.0)
            bits = res.info["buffer_bits"] / reversible.information_floor_bits(P, H)
            err = None
        except Exception as e:  # report, do not hide
            ok, bits, err = False, None, f"{type(e).__name__}: {e}"
        t2 = time.perf_counter()
        out[str(gamma)] = {"T": T, "bit_exact": ok, "forward_s": t1 - t0, "reverse_s": t2 - t1,
                           "bits_over_floor": bits, "error": err}
        print(f"  exactness momentum {gamma}: T={T} bit-exact={ok} forward {t1 - t0:.1f} s "
              f"reverse {t2 - t1:.1f} s bits/floor {bits}", flush=True)
    return out


# ---------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer rounds and steps")
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    ap.add_argument("--layers", help="MLP sizes, e.g. 784,50,50,50,10 (default: by dataset)")
    ap.add_argument("--dataset", choices=("digits", "mnist-t10k"),
                    help="default: mnist-t10k when ../shared/data/mnist exists, else digits")
    ap.add_argument("--data-dir", default=None, help=f"MNIST folder (default {MNIST_DIR})")
    ap.add_argument("--iters", type=int, help="T for the hypergradient timing (default 200; quick 40)")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--exact-iters", type=int, help="T for the bit-exactness check (default 10000; quick 150)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads, set before numpy loads (default 1; 0: leave the environment)")
    args = ap.parse_args(argv)

    data_dir = Path(args.data_dir) if args.data_dir else MNIST_DIR
    if args.dataset is None:
        args.dataset = "mnist-t10k" if (data_dir / "t10k-images-idx3-ubyte.gz").exists() else "digits"
    args.data = load(args.dataset, data_dir=data_dir) if args.dataset != "digits" else load("digits")
    n_in = args.data.train.X.shape[1]
    args.sizes = parse_layers(args.layers) if args.layers else (n_in, 50, 50, 50, 10)
    q = args.quick
    args.iters = args.iters or (100 if q else 300)
    args.exact_iters = args.exact_iters or (150 if q else 10_000)
    args.rounds = 7 if q else 15
    args.hyper_rounds = 3 if q else 5
    args.step_block = 10 if q else 30
    args.op_reps = 10 if q else 20

    print(f"exact reversal benchmark: MLP {'-'.join(map(str, args.sizes))} on {args.dataset} "
          f"({len(args.data.train)} training examples), batch {args.batch}, float64, "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}", flush=True)
    t0 = time.perf_counter()
    fig = step_costs(args)
    fig.update(hypergradient_cost(args))
    c = fig["vjp_over_gradient"]
    exact = exactness(args)
    details = {**fig.pop("details"), **fig.pop("details_h")}

    const_allow = CONST_BITS_PER_WEIGHT / details["floor_bits_per_weight"]
    rows = [
        ("reversible_step_over_plain_step", fig["reversible_step_over_plain_step"], "<= 1.5", 1.5),
        ("buffer_ops_over_gradient", fig["buffer_ops_over_gradient"], "<= 0.10", 0.10),
        ("vjp_over_gradient (c)", c, "reported", None),
        ("hypergradient_over_training", fig["hypergradient_over_training"], f"<= 1 + c + 0.25 = {1.25 + c:.2f}",
         1.25 + c),
        ("bits_over_floor (raw)", fig["bits_over_floor"], f"<= 1.05 + {const_allow:.3f}", 1.05 + const_allow),
        ("bits_over_floor (corrected)", details["bits_over_floor_corrected"], "<= 1.05", 1.05),
    ]
    print(f"\n{'figure':34s} {'value':>12s}  {'target':24s} result")
    passes = {}
    for name, val, tgt, lim in rows:
        res = "" if lim is None else ("PASS" if val <= lim else "FAIL")
        if lim is not None:
            passes[name] = res == "PASS"
        print(f"{name:34s} {val:12.6f}  {tgt:24s} {res}")
    for gamma, r in exact.items():
        res = "PASS" if r["bit_exact"] else "FAIL"
        passes[f"bit_exact_{gamma}"] = r["bit_exact"]
        print(f"{'bit-exact T=' + str(r['T']) + ' momentum ' + gamma:34s} {str(r['bit_exact']):>12s}  "
              f"{'True':24s} {res}")
    print("\ndetails:", json.dumps(details, indent=1))
    print(f"total {time.perf_counter() - t0:.1f} s")

    if args.json:
        out = {k: fig[k] for k in ("reversible_step_over_plain_step", "buffer_ops_over_gradient",
                                   "vjp_over_gradient", "hypergradient_over_training", "bits_over_floor")}
        out.update({"bits_over_floor_corrected": details["bits_over_floor_corrected"],
                    "bits_constant_per_weight": details["bits_constant_per_weight"],
                    "exact_reversal": exact, "pass": passes, "details": details,
                    "config": {"layers": list(args.sizes), "dataset": args.dataset, "batch": args.batch,
                               "iters": args.iters, "exact_iters": args.exact_iters, "quick": q,
                               "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}})
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if all(passes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
