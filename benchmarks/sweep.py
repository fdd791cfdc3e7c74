"""Sweep overhead: 8 tiny runs through ``sweep`` on an embedded cluster of 2 workers against
the same 8 commands one after another in one process.

The runs: ``cpu_ver meta`` on the embedded digits (MLP 64-20-10, T = 20, ``--meta-iters``
12, or 4 with ``--quick``), seeds 0-7. The serial side calls ``cpu_ver.__main__.main`` for
each run in one fresh process, so it pays the interpreter's start and imports once; the
sweep side is the whole ``python -m cpu_ver sweep`` command (cluster start, one process per
attempt: a fork of the worker's zygote, or with ``--launch subprocess`` a fresh interpreter;
manifest, table). Both sides use one BLAS thread per process (the sweep's setting per
worker). Printed and in ``--json``: ``serial_s``, ``sweep_s`` and ``sweep_over_serial``, the CPU
seconds of each side (``serial_cpu_s``, ``sweep_cpu_s``: on shared cores a steadier figure)
(target <= 0.65 on two cores), and whether the runs' metrics agree (timings aside).

    .venv/bin/python benchmarks/sweep.py [--quick] [--launch zygote|subprocess] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERIAL = """
import sys
from cpu_ver.__main__ import main
for argv in {runs!r}:
    assert main(argv) == 0, argv
"""


def spec_text(meta_iters: int) -> str:
    return f"""name = "bench"
backend = "cpu_ver"
command = "meta"
[options]
dataset = "digits"
layers = "64,20,10"
iters = 20
n_train = 300
n_val = 150
meta_iters = {meta_iters}
hypers = "l2,lr"
[grid]
seed = [0, 1, 2, 3, 4, 5, 6, 7]
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(argv, env) -> tuple:
    """(wall seconds, CPU seconds of the process and the descendants it waited for)."""
    t0, c0 = time.perf_counter(), _cpu()
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, argv[:4]))} ... failed:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0, _cpu() - c0


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if not (k.endswith("_s") or k == "seconds")}
    return [strip(v) for v in obj] if isinstance(obj, list) else obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 meta-iterations per run instead of 12")
    p.add_argument("--launch", default=None, choices=("zygote", "subprocess"),
                   help="the sweep's --launch (default: the sweep's default, zygote on Linux)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from shared import sweep_spec  # noqa: PLC0415

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        spec = tmp / "bench.toml"
        spec.write_text(spec_text(4 if args.quick else 12))
        runs = sweep_spec.load(spec).runs
        serial = [["meta", *r.argv(), "--no-progress", "--out", str(tmp / "serial" / r.folder_name)] for r in runs]
        serial_s, serial_cpu = timed([sys.executable, "-c", SERIAL.format(runs=serial)], env)
        sweep_s, sweep_cpu = timed([sys.executable, "-m", "cpu_ver", "sweep", str(spec), "--workers", "2", "--out",
                         str(tmp / "sweep"), "--no-progress", *(["--launch", args.launch] if args.launch else [])],
                        env)
        launch = sorted({e.get("launch") for e in
                         json.loads((tmp / "sweep" / "manifest.json").read_text())["runs"].values()})
        same = all(strip(json.loads((tmp / "serial" / r.folder_name / "results.json").read_text())["metrics"]) ==
                   strip(json.loads((tmp / "sweep" / "runs" / r.folder_name / "results.json").read_text())["metrics"])
                   for r in runs)
    out = {"runs": len(runs), "workers": 2, "launch": launch, "meta_iters": 4 if args.quick else 12,
           "serial_s": serial_s,
           "sweep_s": sweep_s, "sweep_over_serial": sweep_s / serial_s, "serial_cpu_s": serial_cpu,
           "sweep_cpu_s": sweep_cpu, "same_metrics": same}
    print(f"{len(runs)} runs: serial in one process {serial_s:.1f} s, sweep on 2 workers ({'/'.join(launch)}) "
          f"{sweep_s:.1f} s, "
          f"CPU {serial_cpu:.1f} s and {sweep_cpu:.1f} s, "
          f"ratio {out['sweep_over_serial']:.3f} (target <= 0.65); metrics equal: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
