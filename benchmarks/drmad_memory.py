"""Peak memory of one gpu_ver DrMAD hypergradient (K = 1) against the number of training
steps T: DrMAD's memory does not grow with T (docs/ALGORITHMS.md s.2).

Each T runs in its own process (so ``ru_maxrss`` is that run's peak) on the digits MLP,
scalar schedules and per-unit L2. ``python -m gpu_ver drmad --memory-steps 100,1000,10000``
runs it and writes the rows to its results.json; ``python benchmarks/drmad_memory.py
100,1000`` prints the table alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                     # run as a script: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def memory_child(T_steps: int, layers: str, batch: int, seed: int) -> dict:
    """Run in a fresh process: DrMAD (K = 1, scalar schedules, per-unit L2) on the digits MLP
    for ``T_steps`` steps; memory figures of the hypergradient call."""
    import resource  # noqa: PLC0415
    import tracemalloc  # noqa: PLC0415

    from gpu_ver import models as M  # noqa: PLC0415 (loads Theano)
    from gpu_ver.drmad import DrMAD  # noqa: PLC0415
    from gpu_ver.problem import Problem, floatX, theano  # noqa: PLC0415
    from shared.datasets import load  # noqa: PLC0415
    from shared.mlp_spec import parse_layers  # noqa: PLC0415

    data = load("digits", seed=seed)
    model = M.MLP(parse_layers(layers), "tanh")
    problem = Problem.from_dataset(model, data, n_iters=T_steps, batch_size=batch, batch_seed=seed, init_seed=seed)
    hypers = problem.hypers(lr=0.1, momentum=0.9, l2=1e-4, l2_shape="unit")
    engine = DrMAD(problem, hypers, K=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    engine.hypergradient(hypers)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"T": int(T_steps), "n_params": problem.layout.size, "maxrss_bytes": int(after),
            "maxrss_before_bytes": int(before), "maxrss_growth_bytes": int(after - before),
            "tracemalloc_peak_bytes": int(peak), "shared_bytes": engine.shared_bytes(), "seconds": seconds,
            "floatX": floatX(), "device": str(theano.config.device)}


def measure_memory(steps=(100, 1000, 10000), *, layers="64,50,10", batch=50, seed=0, progress=False) -> list:
    """Peak memory of one DrMAD hypergradient (K = 1) for each T in ``steps``, each in its own
    process (so ``ru_maxrss`` is that run's peak): rows with ``maxrss_bytes`` (process peak,
    including Python, Theano and the compiled modules), ``maxrss_growth_bytes`` (growth of the
    peak during the hypergradient), ``tracemalloc_peak_bytes`` (peak of Python/numpy
    allocations during it) and ``shared_bytes`` (the engine's Theano shared variables)."""
    from gpu_ver.problem import floatX, theano  # noqa: PLC0415 (loads Theano)

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, HPO_FLOATX=floatX(),
               HPO_DEVICE="cuda" if str(theano.config.device).startswith("cuda") else "cpu",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for n in steps:
        code = (f"import json; from benchmarks import drmad_memory; "
                f"print('MEMORY ' + json.dumps(drmad_memory.memory_child({int(n)}, {str(layers)!r}, {int(batch)}, {int(seed)})))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("MEMORY ")]
        if r.returncode != 0 or not line:
            raise RuntimeError(f"memory measurement for T={n} failed (exit {r.returncode}): {r.stderr[-2000:]}")
        rows.append(json.loads(line[-1][len("MEMORY "):]))
        if progress:
            print(f"  T={n}: peak RSS {rows[-1]['maxrss_bytes'] / 2**20:.1f} MiB", flush=True)
    return rows


def print_memory_table(rows) -> None:
    print(f"{'T':>7} {'peak RSS MiB':>13} {'RSS growth MiB':>15} {'tracemalloc peak KiB':>21} "
          f"{'shared KiB':>11} {'seconds':>8}")
    for r in rows:
        print(f"{r['T']:>7} {r['maxrss_bytes'] / 2**20:>13.1f} {r['maxrss_growth_bytes'] / 2**20:>15.2f} "
              f"{r['tracemalloc_peak_bytes'] / 2**10:>21.1f} {r['shared_bytes'] / 2**10:>11.1f} {r['seconds']:>8.2f}")


if __name__ == "__main__":
    print_memory_table(measure_memory([int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "100,1000").split(",")],
                                      progress=True))
