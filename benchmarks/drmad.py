"""DrMAD (cpu_ver/drmad.py) against the exact hypergradient: agreement, memory, time.

Parts (all run by default):

agreement  MLP 64-50-50-50-10 (tanh) on scikit-learn's digits (1,000 train,
           400 validation; the embedded data set, so the script runs anywhere),
           batch 200, lr 0.3 (per step and block), L2 1e-4 (per parameter),
           default initial scales. For each momentum (0.5, 0.9, 0.95) and T
           (full: 50, 200, 1000; quick: 50) the exact hypergradient
           (reversible.hypergradient) is compared with DrMAD for K = 1, 4, 16
           and T segments (grid t/T, velocity reconstructed): cosine similarity,
           sign agreement (fraction of entries with the same sign, over the
           entries where the exact value is non-zero) and relative error
           ||d - e|| / ||e||, per group (l2, lr, momentum, init_scale) and
           'overall' = the l2 and lr gradients concatenated, each divided by
           the norm of the exact group gradient (both groups weigh equally),
           and 'overall_free' = the same in free coordinates (log l2, log lr:
           the meta-optimiser's vector, dominated by lr at these values).
           K = T is the exact recursion (equal to rounding; tests/test_drmad.py).
memory     tracemalloc peak (numpy registers its buffers with tracemalloc) of
           everything allocated during drmad.hypergradient with K = 1, above
           what was allocated before the call, for T = 100, 1,000 and (full
           mode) 10,000, on a small MLP 64-16-10, batch 50 (the structure, not
           the model size, decides whether memory grows with T; the benchmark
           model at T = 10,000 would take far too long here). Schedules are
           scalar for this measurement: a per-iteration hyperparameter and its
           gradient are themselves O(T x blocks) arrays, reported separately
           (``peak_memory_bytes_iter_block``, full mode). The contrast is the exact
           method's information buffer: the floor sum_t sum_i log2(2^16 / n)
           bits (``reversible.information_floor_bits``) for every T, and the
           measured buffer (info['buffer_bits']) where the exact run is
           affordable.
time       ``hypergradient_over_training``: DrMAD K = 1 (forward + reverse)
           over plain ``sgd.train`` on the benchmark model, T = 100 (quick) or
           T = 25 x 6 rounds (quick) or 50 x 12, alternated: total CPU time
           (process_time, the machine being shared) of DrMAD over that of
           training; the median wall-time ratio is reported beside it.
           BLAS threads default to 1 (OPENBLAS_NUM_THREADS/OMP_NUM_THREADS, set
           before numpy is imported unless already set), so that CPU time is
           not inflated by spinning BLAS threads on a small model. Target <= 3.5.

--quick about a minute; --json FILE writes the figures (keys of docs/DESIGN.md s.4:
peak_memory_bytes, cosine_vs_exact, hypergradient_over_training, and more).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cpu_ver import drmad, reversible, sgd  # noqa: E402
from cpu_ver.models import MLP  # noqa: E402
from cpu_ver.problem import Problem  # noqa: E402
from shared.datasets import load  # noqa: E402
from shared.hyperparams import standard  # noqa: E402

SIZES = (64, 50, 50, 50, 10)
BATCH = 200
LR, L2 = 0.3, 1e-4
SMALL_SIZES, SMALL_BATCH = (64, 16, 10), 50
GROUPS = ("l2", "lr", "momentum", "init_scale")
OVERALL = ("l2", "lr")

_DATA = {}


def data():
    if "digits" not in _DATA:
        _DATA["digits"] = load("digits", n_train=1000, n_val=400)
    return _DATA["digits"]


def setup(T, momentum, sizes=SIZES, batch=BATCH, shapes="iter_block"):
    model = MLP(sizes, "tanh")
    problem = Problem.from_dataset(model, data(), n_iters=T, batch_size=batch)
    hypers = standard(model.layout, T, lr=LR, momentum=momentum, l2=L2,
                      init_scales=model.default_init_scales(), lr_shape=shapes, momentum_shape=shapes)
    return problem, hypers


# ---------------------------------------------------------------------------
# Agreement


def compare(a, b):
    """cosine, sign agreement, relative error of a (DrMAD) against b (exact)."""
    a, b = np.ravel(a), np.ravel(b)
    nb = np.linalg.norm(b)
    cos = float(a @ b / (np.linalg.norm(a) * nb)) if nb > 0 and np.linalg.norm(a) > 0 else float("nan")
    nz = b != 0
    sign = float(np.mean(np.sign(a[nz]) == np.sign(b[nz]))) if np.any(nz) else float("nan")
    rel = float(np.linalg.norm(a - b) / nb) if nb > 0 else float("nan")
    return cos, sign, rel


def agreement(momenta, Ts, Ks, log=print, on_row=None):
    rows = []
    for T in Ts:
        for mom in momenta:
            problem, hypers = setup(T, mom)
            t0 = time.perf_counter()
            ex = reversible.hypergradient(problem, hypers)
            t_exact = time.perf_counter() - t0
            ex_free = {n: hypers.chain({n: ex.grads[n]})[n] for n in OVERALL}
            for K in sorted(set(min(k, T) if k != "T" else T for k in Ks)):
                t0 = time.perf_counter()
                d = drmad.hypergradient(problem, hypers, K=K, grid="t/T", velocity="reconstruct")
                t_d = time.perf_counter() - t0
                for g in GROUPS:
                    cos, sign, rel = compare(d.grads[g], ex.grads[g])
                    rows.append(dict(momentum=mom, T=T, K=K, group=g, cosine=cos, sign_agreement=sign,
                                     rel_error=rel))
                # overall: l2 and lr, each scaled by the exact group's norm (equal weight per group)
                scale = {n: np.linalg.norm(ex.grads[n]) for n in OVERALL}
                cos, sign, rel = compare(np.concatenate([d.grads[n].ravel() / scale[n] for n in OVERALL]),
                                         np.concatenate([ex.grads[n].ravel() / scale[n] for n in OVERALL]))
                rows.append(dict(momentum=mom, T=T, K=K, group="overall", cosine=cos, sign_agreement=sign,
                                 rel_error=rel))
                # overall_free: the meta-optimiser's vector (free coordinates; lr dominates here)
                d_free = {n: hypers.chain({n: d.grads[n]})[n] for n in OVERALL}
                cos, sign, rel = compare(np.concatenate([d_free[n].ravel() for n in OVERALL]),
                                         np.concatenate([ex_free[n].ravel() for n in OVERALL]))
                rows.append(dict(momentum=mom, T=T, K=K, group="overall_free", cosine=cos, sign_agreement=sign,
                                 rel_error=rel))
                log(f"  momentum {mom:<4} T {T:>5} K {K:>5}: " +
                    "  ".join(f"{r['group']} {r['cosine']:.4f}/{r['sign_agreement']:.3f}"
                              for r in rows[-len(GROUPS) - 2:]) +
                    f"   ({t_d:.1f} s; exact {t_exact:.1f} s)")
            if on_row:
                on_row(rows)
    return rows


# ---------------------------------------------------------------------------
# Memory


def traced_peak(fn):
    """Peak bytes allocated (and traced) during fn() above the allocation level before it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, out


def memory(Ts, exact_Ts, iter_block=True, log=print):
    out = {"model": list(SMALL_SIZES), "batch": SMALL_BATCH, "peak_memory_bytes": {},
           "peak_memory_bytes_iter_block": {}, "exact_buffer_floor_bits": {},
           "exact_buffer_measured_bits": {}, "exact_peak_memory_bytes": {}}
    warm, hw = setup(5, 0.9, SMALL_SIZES, SMALL_BATCH, shapes="scalar")
    drmad.hypergradient(warm, hw, K=1)   # first-call allocations (caches, lazy imports) outside the window
    for T in Ts:
        problem, hypers = setup(T, 0.9, SMALL_SIZES, SMALL_BATCH, shapes="scalar")
        P = problem.model.layout.size
        out["weight_vector_bytes"] = 8 * P
        peak, res = traced_peak(lambda: drmad.hypergradient(problem, hypers, K=1))
        out["peak_memory_bytes"][str(T)] = int(peak)
        out["stored_vectors"] = res.info["stored_vectors"]
        floor = reversible.information_floor_bits(problem, hypers)
        out["exact_buffer_floor_bits"][str(T)] = float(floor)
        msg = (f"  T {T:>6}: DrMAD K=1 peak {peak / 1024:8.1f} KiB ({peak / (8 * P):.1f} weight vectors)"
               f"   exact buffer floor {floor / 8 / 1024:10.1f} KiB")
        if T in exact_Ts:
            epeak, ex = traced_peak(lambda: reversible.hypergradient(problem, hypers))
            out["exact_peak_memory_bytes"][str(T)] = int(epeak)
            out["exact_buffer_measured_bits"][str(T)] = float(ex.info["buffer_bits"])
            msg += f"  (measured {ex.info['buffer_bits'] / 8 / 1024:.1f} KiB; exact peak {epeak / 1024:.1f} KiB)"
        log(msg)
        if not iter_block:
            continue
        # per-iteration schedules: the hyperparameters themselves are O(T x blocks)
        problem, hypers = setup(T, 0.9, SMALL_SIZES, SMALL_BATCH, shapes="iter_block")
        peak_ib, _ = traced_peak(lambda: drmad.hypergradient(problem, hypers, K=1))
        out["peak_memory_bytes_iter_block"][str(T)] = int(peak_ib)
        log(f"           with lr, momentum per iteration x block: peak {peak_ib / 1024:8.1f} KiB "
            f"(lr+momentum gradients alone: {2 * 8 * T * problem.model.layout.n_blocks / 1024:.1f} KiB)")
    return out


# ---------------------------------------------------------------------------
# Time


def timing(T, rounds, log=print):
    """Alternate plain training and DrMAD K=1 ``rounds`` times; CPU time (process_time) is the
    headline because the machine is shared (wall time is reported beside it)."""
    problem, hypers = setup(T, 0.9)
    cpu_train, cpu_hyper, wall_train, wall_hyper = [], [], [], []
    sgd.train(problem, hypers)  # warm-up
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        sgd.train(problem, hypers)
        c1, w1 = time.process_time(), time.perf_counter()
        drmad.hypergradient(problem, hypers, K=1)
        c2, w2 = time.process_time(), time.perf_counter()
        cpu_train.append(c1 - c0)
        cpu_hyper.append(c2 - c1)
        wall_train.append(w1 - w0)
        wall_hyper.append(w2 - w1)
    ratio = sum(cpu_hyper) / sum(cpu_train)
    wall_ratio = float(np.median(np.array(wall_hyper) / np.array(wall_train)))
    log(f"  T {T}, {rounds} rounds: train {sum(cpu_train):.2f} s CPU, DrMAD K=1 {sum(cpu_hyper):.2f} s CPU "
        f"(wall: median ratio {wall_ratio:.2f})")
    return {"T": T, "rounds": rounds, "cpu_train_s": cpu_train, "cpu_hypergradient_s": cpu_hyper,
            "wall_train_s": wall_train, "wall_hypergradient_s": wall_hyper,
            "wall_median_ratio": wall_ratio, "hypergradient_over_training": float(ratio)}


# ---------------------------------------------------------------------------


def table(rows):
    lines = [f"{'momentum':>8} {'T':>5} {'K':>5}  " +
             "  ".join(f"{g + ' cos/sign':>22}" for g in GROUPS + ("overall",))]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["momentum"], r["T"], r["K"]), {})[r["group"]] = r
    for (m, T, K), gs in keyed.items():
        lines.append(f"{m:>8} {T:>5} {K:>5}  " + "  ".join(
            f"{gs[g]['cosine']:>13.5f}/{gs[g]['sign_agreement']:.3f}" for g in GROUPS + ("overall",)))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about a minute")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--Ts", default=None, help="comma-separated T values for the agreement sweep")
    p.add_argument("--momenta", default=None, help="comma-separated momenta for the agreement sweep")
    p.add_argument("--mem-Ts", default=None, help="comma-separated T values for the memory part")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: agreement,memory,time")
    args = p.parse_args(argv)
    quick = args.quick
    Ts = [int(x) for x in args.Ts.split(",")] if args.Ts else ([50] if quick else [50, 200, 1000])
    momenta = [float(x) for x in args.momenta.split(",")] if args.momenta else [0.5, 0.9, 0.95]
    skip = set(filter(None, args.skip.split(",")))
    out = {"mode": "quick" if quick else "full",
           "setup": {"model": list(SIZES), "activation": "tanh", "data": "digits (1000 train / 400 val)",
                     "batch": BATCH, "lr": LR, "l2": L2, "grid": "t/T", "velocity": "reconstruct"}}

    def dump():
        if args.json:
            from shared.records import write_json_atomic
            write_json_atomic(args.json, out)

    t_all = time.perf_counter()
    if "time" not in skip:
        print("== DrMAD K=1 hypergradient time over plain training (MLP 64-50-50-50-10, batch 200)")
        tm = timing(25, 6) if quick else timing(50, 12)
        out["timing"] = tm
        out["hypergradient_over_training"] = tm["hypergradient_over_training"]
        print(f"hypergradient_over_training = {tm['hypergradient_over_training']:.2f} (target <= 3.5; "
              f"wall-time median ratio {tm['wall_median_ratio']:.2f})")
        dump()
    if "memory" not in skip:
        mem_Ts = ([int(x) for x in args.mem_Ts.split(",")] if args.mem_Ts
                  else [100, 1000] if quick else [100, 1000, 10000])
        print(f"== peak memory of drmad.hypergradient K=1 (MLP {SMALL_SIZES}, batch {SMALL_BATCH})")
        mem = memory(mem_Ts, exact_Ts=[100] if quick else [100, 1000], iter_block=not quick)
        out["peak_memory_bytes"] = mem.pop("peak_memory_bytes")
        out["memory"] = mem
        pk = list(out["peak_memory_bytes"].values())
        out["peak_memory_growth"] = pk[-1] / pk[0]
        print(f"peak memory T={mem_Ts[-1]} over T={mem_Ts[0]}: {out['peak_memory_growth']:.3f}")
        dump()
    if "agreement" not in skip:
        print("== agreement with the exact hypergradient (cosine/sign agreement)")

        def on_row(rows):
            out["cosine_vs_exact"] = rows
            dump()

        out["cosine_vs_exact"] = agreement(momenta, Ts, [1, 4, 16, "T"], on_row=on_row)
        print(table(out["cosine_vs_exact"]))
    out["wall_s"] = time.perf_counter() - t_all
    dump()
    if args.json:
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
