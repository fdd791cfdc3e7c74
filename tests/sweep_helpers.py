"""Helpers of the sweep tests: tiny specs, the sweep's command line, results without timings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# tiny, fast runs: about 2 s each, most of it the interpreter's imports
TINY = {"dataset": "synthetic", "n_train": 100, "n_val": 50, "hypers": "l2"}
# two exact hypergradients of 5 steps (seeds 0, 1)
HG_TINY = {"name": "hg", "command": "hypergrad", "options": {**TINY, "method": "exact", "iters": 5},
           "grid": {"seed": [0, 1]}}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_spec(path: Path, name: str, parts: list, top: str = "") -> Path:
    """A spec file of ``parts``: dicts with ``name``, ``backend``, ``command``, ``options``, ``grid``."""
    lines = [f"name = {json.dumps(name)}", top]
    for p in parts:
        lines += ["[[parts]]", f"name = {json.dumps(p['name'])}", f"backend = {json.dumps(p.get('backend', 'cpu_ver'))}",
                  f"command = {json.dumps(p['command'])}", "[parts.options]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in p.get("options", {}).items()]
        lines += ["[parts.grid]"] + [f"{k} = {toml_value(v)}" for k, v in p.get("grid", {}).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep_argv(backend: str, spec, out, *extra) -> list:
    return [sys.executable, "-m", backend, "sweep", str(spec), "--out", str(out), "--no-progress", *map(str, extra)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env(), cwd=REPO, **kw)


def manifest(folder) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def without_timings(obj):
    """``obj`` with every timing entry (``*_s``, ``seconds``) removed, recursively."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if not (k.endswith("_s") or k == "seconds")}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def metrics(run_dir) -> dict:
    return without_timings(json.loads((Path(run_dir) / "results.json").read_text())["metrics"])


# what differs between two runs of the same options in two folders: the folder, and how it was started
PATH_OPTIONS = ("out", "resume", "overwrite")
TIMING_ARRAYS = ("hist_seconds",)


def record(run_dir) -> dict:
    """Everything a run folder holds that a rerun of the same options must reproduce bit for
    bit: results.json's versions, config (without the folder options) and metrics (without
    timings), and every array of its .npz files as raw bytes with dtype and shape (timings aside)."""
    import numpy as np

    run_dir = Path(run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    arrays = {}
    for f in sorted(run_dir.glob("*.npz")):
        with np.load(f) as z:
            arrays[f.name] = {k: (z[k].dtype.str, z[k].shape, z[k].tobytes()) for k in z.files
                              if k not in TIMING_ARRAYS}
    return {"versions": res["versions"], "metrics": without_timings(res["metrics"]), "arrays": arrays,
            "config": {k: v for k, v in without_timings(res["config"]).items() if k not in PATH_OPTIONS}}


def alone_argv(entry: dict, out) -> list:
    """The command of a manifest entry run by itself (as the sweep runs it, without the sweep)."""
    from shared.sweep_spec import options_argv

    return [sys.executable, "-m", entry["backend"], entry["command"], *options_argv(entry["options"]),
            "--no-progress", "--out", str(out)]


def run_alone(entries: list, root: Path, parallel: int = 2) -> dict:
    """Run each manifest entry's command alone (``parallel`` at a time, one BLAS thread each, as
    the sweep's workers do); folder name -> its run folder."""
    out, todo = {}, list(entries)
    e1 = {**env(), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while todo:
        batch, todo = todo[:parallel], todo[parallel:]
        procs = []
        for e in batch:
            d = root / Path(e["folder"]).name
            procs.append((e, d, subprocess.Popen(alone_argv(e, d), env=e1, cwd=REPO, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE, text=True)))
        for e, d, p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
            out[e["folder"]] = d
    return out
