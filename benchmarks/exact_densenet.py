"""Exact reversible learning on the Theano backend (gpu_ver/reversible.py) on a small DenseNet.

The problem is ``python -m gpu_ver check``'s DenseNet (depth 7, growth 4, softplus,
batch norm with batch statistics, 3,948 weights, 20 blocks) on synthetic 8x8
images (32 training examples, batch 8; 12 validation examples in 2 chunks),
float64 on Theano's C backend, learning rate 0.05 and L2 1e-4 per block, momentum
0.9 per block, every group tuned (l2, lr, momentum, init_scale). All ratios come
from ONE run, as medians over interleaved rounds:

  reversible_step_over_plain_step  an exact forward step (gradient, fixed point and
                                   buffer, fingerprint) over a plain float step   reported
  buffer_ops_over_gradient         the ExactRep arithmetic of one forward step (V.mul,
                                   V.sub, W.add and the float copy W.val) over one
                                   compiled DenseNet gradient                  target <= 0.10
  c                                the compiled reverse step (gradient, Hessian-vector
                                   product and hyperparameter VJP at w_t) over a plain
                                   training step (gradient + float update)     reported
  hypergradient_over_training      exact forward + reverse (validation gradient
                                   included) over plain training of the same T
                                   steps                                       target <= 1 + c + 0.25
  bits_over_floor                  information-buffer bits over sum log2(d/n)
                                   (``gpu_ver.reversible.information_floor_bits``)
                                                                               target <= 1.05 + C/floor
                                   (C = 2 bits per weight, the coder's constant; the
                                   constant-corrected ratio, the slope between T and
                                   T/2, must be <= 1.05, as benchmarks/exact_reversal.py)
  memory                           peak of the exact hypergradient for T = 100, 1,000
                                   (full mode also 10,000), each in a fresh process:
                                   tracemalloc peak (numpy registers its buffers) of
                                   everything allocated during forward + reverse, what
                                   is held at the end of the forward pass, and the
                                   growth of the process's current RSS over it; with
                                   the projection to DenseNet-40 (1.02 M weights, 300
                                   epochs of batch 64 = 234,375 steps, momentum 0.9)
                                   from the measured buffer bits per weight per step,
                                   the allocated buffer words over those bits (the
                                   word rows grow by 1/32 at a time: a factor 1 to
                                   1.03), the per-weight state and the per-step
                                   fingerprints.

Hypergradient timing T = 300 (--quick 100; --iters). BLAS runs on one thread
(--threads). --quick takes a few minutes once the compiled functions are cached
(the first run compiles the reverse step: about 2.5 minutes on 2 cores);
--json FILE writes the figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
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

CONST_BITS_PER_WEIGHT = 2.0
DENSENET40_WEIGHTS = 1_020_000            # the figure (depth 40, growth 12, CIFAR-10)
DENSENET40_STEPS = 300 * 50_000 // 64     # 300 epochs of 50,000 images, batch 64
GROUPS = ("l2", "lr", "momentum", "init_scale")


def _load():
    from gpu_ver import config  # noqa: PLC0415

    config.load(device="cpu", floatX="float64")


def make(T: int, momentum: float = 0.9, lr: float = 0.05):
    """(problem, hypers): the check DenseNet, T steps, per-block l2 / momentum, scalar lr."""
    from gpu_ver import fdcheck as GC  # noqa: PLC0415

    problem, _ = GC.densenet_problem(0, T=T)
    return problem, problem.hypers(lr=lr, momentum=momentum, l2=1e-4, l2_shape="block",
                                   momentum_shape="block", groups=GROUPS)


def engine(problem, hypers):
    from gpu_ver import reversible as R  # noqa: PLC0415

    return R.Reversible(problem, hypers)


def _median(xs):
    return float(np.median(np.asarray(xs, dtype=float)))


def _interleaved(fns: dict, rounds: int) -> dict:
    """name -> per-round times; the order alternates between rounds."""
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def _ratio(times, num, den):
    return _median([a / b for a, b in zip(times[num], times[den])])


# --------------------------------------------------------------------------- step costs
def step_costs(args) -> dict:
    """Exact forward step vs plain step; buffer arithmetic and reverse step vs one gradient."""
    from shared.reversal import fingerprint  # noqa: PLC0415
    from shared.schedule import schedule  # noqa: PLC0415

    n = args.step_block
    problem, H = make(n)
    eng = engine(problem, H)
    eng.forward(H)
    eng.train(H)
    t = _interleaved({"exact": lambda: eng.forward(H), "plain": lambda: eng.train(H)}, args.rounds)

    traj = eng.forward(H)
    W, V, keys = traj.W, traj.V, traj.keys
    s = schedule(H, 0)
    X, y = problem.batch(0)
    l2 = H.per_param("l2")
    w = W.val
    g = eng.grad(w, l2, X, y)
    dec, inc = (1.0 - s.gamma) * g, s.alpha * V.val
    eng.set_hypers(H)
    reps, a = args.op_reps, eng.adj

    def ops():
        for i in range(reps):
            W.val
            V.mul(s.n, i).sub(dec, i)
            W.add(inc * 1e-3, i)

    def grads():
        for _ in range(reps):
            eng.grad(w, l2, X, y)

    def train_steps():
        v = np.zeros_like(w)
        for _ in range(reps):
            gg = eng.grad(w, l2, X, y)
            v = s.gamma * v - (1.0 - s.gamma) * gg
            w + s.alpha * v

    def reverse_steps():
        a.dw.set_value(1e-3 * g)
        a.dv.set_value(np.zeros_like(g))
        for _ in range(reps):
            eng.f_reverse(X, y, 0, w, inc)

    parts = {"mul": lambda: [V.mul(s.n, i) for i in range(reps)],
             "sub": lambda: [V.sub(dec, i) for i in range(reps)],
             "add": lambda: [W.add(inc * 1e-3, i) for i in range(reps)],
             "val": lambda: [W.val for _ in range(reps)],
             "fingerprint": lambda: [fingerprint(W, V, keys) for _ in range(reps)]}
    t2 = _interleaved({"ops": ops, "grad": grads, "train": train_steps, "reverse": reverse_steps, **parts},
                      args.rounds)
    per = {k: _median(v) / reps for k, v in t2.items()}
    return {"reversible_step_over_plain_step": _ratio(t, "exact", "plain"),
            "buffer_ops_over_gradient": _ratio(t2, "ops", "grad"),
            "c": _ratio(t2, "reverse", "train"),
            "details": {"n_params": problem.layout.size, "plain_step_ms": 1e3 * _median(t["plain"]) / n,
                        "exact_forward_step_ms": 1e3 * _median(t["exact"]) / n,
                        "grad_ms": 1e3 * per["grad"], "train_step_ms": 1e3 * per["train"],
                        "reverse_step_ms": 1e3 * per["reverse"], "buffer_ops_ms": 1e3 * per["ops"],
                        "reverse_over_gradient": _ratio(t2, "reverse", "grad"),
                        "op_breakdown_ms": {k: 1e3 * per[k] for k in parts}}}


# --------------------------------------------------------------------------- whole runs
def hypergradient_cost(args) -> dict:
    """Exact forward + reverse over plain training of T steps; buffer bits against the floor."""
    T = args.iters
    problem, H = make(T)
    eng = engine(problem, H)
    t = {"hyper": [], "train": [], "forward": [], "reverse": []}
    res = None
    for r in range(args.hyper_rounds):
        for k in (("hyper", "train") if r % 2 == 0 else ("train", "hyper")):
            gc.collect()
            t0 = time.perf_counter()
            if k == "hyper":
                traj = eng.forward(H)
                t1 = time.perf_counter()
                res = eng.reverse(H, traj)
                t["forward"].append(t1 - t0)
                t["reverse"].append(time.perf_counter() - t1)
                t["hyper"].append(time.perf_counter() - t0)
            else:
                eng.train(H)
                t["train"].append(time.perf_counter() - t0)
    P = problem.layout.size
    bits, floor = res.info["buffer_bits"], res.info["information_floor_bits"]
    p2, H2 = make(T // 2)
    traj2 = engine(p2, H2).forward(H2)
    from gpu_ver import reversible as R  # noqa: PLC0415

    bits2, floor2 = traj2.V.buffer.bits(), R.information_floor_bits(p2, H2)
    slope = (bits - bits2) / (floor - floor2)
    return {"hypergradient_over_training": _ratio(t, "hyper", "train"),
            "bits_over_floor": bits / floor, "bits_over_floor_corrected": slope,
            "details_h": {"T": T, "momentum": 0.9, "hypergradient_s": _median(t["hyper"]),
                          "training_s": _median(t["train"]),
                          "forward_over_training": _ratio(t, "forward", "train"),
                          "reverse_over_training": _ratio(t, "reverse", "train"),
                          "buffer_bits_per_weight_step": bits / (P * T), "floor_bits_per_weight": floor / P,
                          "bits_constant_per_weight": (bits - slope * floor) / P,
                          "reversal_max_abs_error": res.info["reversal_max_abs_error"]}}


# --------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    """The process's current resident set (VmRSS), 0 where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _state_bytes(traj) -> dict:
    """Bytes the trajectory holds: parameter-sized arrays (fixed point, buffer heads and
    depths, keys, w0), the buffer's word rows, and the per-step fingerprints."""
    arrays, words = 0, 0
    for R_ in (traj.W, traj.V):
        arrays += R_.c.nbytes
        for name, a in vars(R_.buffer).items():
            if isinstance(a, np.ndarray):
                words += a.nbytes if name == "words" else 0
                arrays += 0 if name == "words" else a.nbytes
    arrays += traj.keys.nbytes + traj.w0_fixed.nbytes
    prints = sys.getsizeof(traj.fingerprints) + sum(sys.getsizeof(f) + sum(sys.getsizeof(x) for x in f)
                                                     for f in traj.fingerprints)
    return {"state_arrays_bytes": int(arrays), "words_bytes": int(words), "fingerprints_bytes": int(prints)}


def _warm_exact_rep(size: int) -> None:
    """Load the buffer's compiled kernels and the progress-bar module before measuring."""
    from gpu_ver.problem import progress_bar  # noqa: PLC0415
    from shared.exact_rep import ExactRep, momentum_numerator  # noqa: PLC0415

    V, n = ExactRep(np.zeros(size), "warm-up"), momentum_numerator(0.9)
    V.mul(n, 0).sub(np.full(size, 1e-3), 0).add(np.full(size, 1e-3), 0).div(n, 0)
    progress_bar(1, "warm-up", False).close()


def memory_child(T: int) -> dict:
    """In a fresh process: peak memory of one exact hypergradient (forward + reverse)."""
    import tracemalloc  # noqa: PLC0415

    problem, H = make(T)
    eng = engine(problem, H)
    w0, X, y = problem.w0(H), *problem.batch(0)
    eng.objective_and_grad(w0)                          # every compiled function called once
    eng.set_hypers(H)
    eng.f_reverse(X, y, 0, w0, np.zeros_like(w0))
    eng.grad(w0, H.per_param("l2"), X, y)
    _warm_exact_rep(w0.size)
    rss0 = _rss_bytes()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    traj = eng.forward(H)
    held = tracemalloc.get_traced_memory()[0] - base
    rss1 = _rss_bytes()
    bits = traj.V.buffer.bits()
    state = _state_bytes(traj)
    res = eng.reverse(H, traj)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert res.info["reversal_max_abs_error"] == 0.0
    return {"T": T, "n_params": problem.layout.size, "tracemalloc_peak_bytes": int(peak),
            "held_after_forward_bytes": int(held), "rss_growth_forward_bytes": int(rss1 - rss0),
            "buffer_bits": bits, "buffer_bytes": bits / 8, **state, "seconds": seconds}


def memory(steps) -> list:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for n in steps:
        code = ("import json, benchmarks.exact_densenet as B; B._load(); "
                f"print('MEMORY ' + json.dumps(B.memory_child({int(n)})))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("MEMORY ")]
        if r.returncode != 0 or not line:
            raise RuntimeError(f"memory run T={n} failed (exit {r.returncode}): {r.stderr[-2000:]}")
        rows.append(json.loads(line[-1][len("MEMORY "):]))
        m = rows[-1]
        print(f"  memory T={n}: tracemalloc peak {m['tracemalloc_peak_bytes'] / 2**20:.2f} MiB, buffer "
              f"{m['buffer_bytes'] / 2**10:.1f} KiB ({m['seconds']:.0f} s)", flush=True)
    return rows


def allocated_rows(bits_per_weight: float, start: int = 8) -> int:
    """Rows of 16-bit words ``shared.exact_rep``'s vector buffer allocates for a depth of
    ``bits_per_weight``: it starts with ``start`` rows and grows by ``next_rows`` one row
    beyond the current depth at a time, as the buffer does when a weight spills."""
    from shared.exact_rep import next_rows  # noqa: PLC0415
    need, rows = int(np.ceil(bits_per_weight / 16)) + 1, start
    while rows < need:
        rows = next_rows(rows, rows + 1)
    return rows


def projection(rows) -> dict:
    """DenseNet-40 estimate from the longest measured run: what the trajectory holds, scaled
    (parameter-sized arrays and the initial word rows by the weights; the velocity buffer's
    word rows at the measured bits per weight per step, allocated as the buffer grows them; fingerprints
    by the steps),
    plus the rest of the measured peak (transients of a step, Python objects) unscaled for the
    estimate and scaled by the weights for an upper bound."""
    b = rows[-1]
    P, T = b["n_params"], b["T"]
    P40, T40 = DENSENET40_WEIGHTS, DENSENET40_STEPS
    bits_wstep = b["buffer_bits"] / (P * T)
    info = bits_wstep * P40 * T40 / 8
    alloc = allocated_rows(bits_wstep * T40) / (bits_wstep * T40 / 16)
    held = (b["state_arrays_bytes"] + b["words_bytes"]) / P * P40 + alloc * info + b["fingerprints_bytes"] / T * T40
    rest = max(b["tracemalloc_peak_bytes"] - b["state_arrays_bytes"] - b["words_bytes"] - b["fingerprints_bytes"], 0)
    return {"weights": P40, "steps": T40, "from_T": T, "buffer_bits_per_weight_step": bits_wstep,
            "information_bytes": info, "allocated_over_information": alloc,
            "state_arrays_bytes_per_weight": b["state_arrays_bytes"] / P,
            "fingerprint_bytes_per_step": b["fingerprints_bytes"] / T, "rest_of_peak_bytes": rest,
            "peak_bytes": held + rest, "peak_bytes_upper": held + rest / P * P40}


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes: fewer rounds and steps, T <= 1,000")
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    ap.add_argument("--iters", type=int, help="T of the hypergradient timing (default 300; quick 100)")
    ap.add_argument("--memory-steps", help="comma-separated T of the memory runs (default 100,1000,10000; "
                                           "quick 100,1000)")
    args = ap.parse_args(argv)
    q = args.quick
    try:
        steps = [int(s) for s in (args.memory_steps or ("100,1000" if q else "100,1000,10000")).split(",")]
        if len(steps) < 2 or min(steps) < 2:
            raise ValueError
    except ValueError:
        print(f"error: --memory-steps must be two or more integers >= 2, got {args.memory_steps!r}",
              file=sys.stderr)
        return 2
    if args.iters is not None and args.iters < 4:
        print(f"error: --iters must be >= 4, got {args.iters}", file=sys.stderr)
        return 2
    args.iters = args.iters or (100 if q else 300)
    args.rounds, args.hyper_rounds = (5, 3) if q else (11, 5)
    args.step_block, args.op_reps = (10, 10) if q else (30, 20)
    _load()
    print(f"exact reversal on gpu_ver: DenseNet depth 7 growth 4, batch norm, 8x8 synthetic images, float64, "
          f"C backend, BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}", flush=True)
    t0 = time.perf_counter()
    fig = step_costs(args)
    fig.update(hypergradient_cost(args))
    details = {**fig.pop("details"), **fig.pop("details_h")}
    mem = memory(sorted(set(steps)))
    proj = projection(mem)
    c = fig["c"]
    const_allow = CONST_BITS_PER_WEIGHT / details["floor_bits_per_weight"]
    rows = [("reversible_step_over_plain_step", fig["reversible_step_over_plain_step"], "reported", None),
            ("buffer_ops_over_gradient", fig["buffer_ops_over_gradient"], "<= 0.10", 0.10),
            ("c (reverse step / training step)", c, "reported", None),
            ("hypergradient_over_training", fig["hypergradient_over_training"],
             f"<= 1 + c + 0.25 = {1.25 + c:.2f}", 1.25 + c),
            ("bits_over_floor (raw)", fig["bits_over_floor"], f"<= 1.05 + {const_allow:.4f}", 1.05 + const_allow),
            ("bits_over_floor (corrected)", fig["bits_over_floor_corrected"], "<= 1.05", 1.05)]
    print(f"\n{'figure':36s} {'value':>12s}  {'target':24s} result")
    passes = {}
    for name, val, tgt, lim in rows:
        res = "" if lim is None else ("PASS" if val <= lim else "FAIL")
        if lim is not None:
            passes[name] = res == "PASS"
        print(f"{name:36s} {val:12.6f}  {tgt:24s} {res}")
    print(f"\n{'T':>7} {'tracemalloc peak MiB':>21} {'held after fwd MiB':>19} {'RSS growth fwd MiB':>19} "
          f"{'buffer KiB':>11} {'words KiB':>10} {'prints KiB':>11} {'seconds':>8}")
    for m in mem:
        print(f"{m['T']:>7} {m['tracemalloc_peak_bytes'] / 2**20:>21.2f} {m['held_after_forward_bytes'] / 2**20:>19.2f} "
              f"{m['rss_growth_forward_bytes'] / 2**20:>19.2f} {m['buffer_bytes'] / 2**10:>11.1f} "
              f"{m['words_bytes'] / 2**10:>10.1f} {m['fingerprints_bytes'] / 2**10:>11.1f} {m['seconds']:>8.1f}")
    print(f"projection to DenseNet-40 ({proj['weights']:,} weights, {proj['steps']:,} steps, from T = {proj['from_T']}): "
          f"buffer information {proj['information_bytes'] / 1e9:.2f} GB at {proj['buffer_bits_per_weight_step']:.4f} "
          f"bits per weight per step, allocated x{proj['allocated_over_information']:.2f}; peak about "
          f"{proj['peak_bytes'] / 1e9:.2f} GB (at most {proj['peak_bytes_upper'] / 1e9:.2f} GB)")
    print("\ndetails:", json.dumps(details, indent=1))
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.json:
        out = {**fig, "memory": mem, "densenet40_projection": proj, "pass": passes, "details": details,
               "config": {"model": "DenseNet depth 7 growth 4 (batch norm)", "input": "8x8x3 synthetic",
                          "batch": 8, "floatX": "float64", "iters": args.iters, "memory_steps": steps, "quick": q,
                          "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if all(passes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
