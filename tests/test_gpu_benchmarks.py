"""The gpu_ver DenseNet benchmarks run and report what they claim (slow: each compiles the
DenseNet reverse steps, minutes on 2 cores when the compile cache is cold).

(a) benchmarks/exact_densenet.py on a short run: the reversal is bit-exact, the buffer
    is within 1.05 x the information floor after the constant per weight, and the
    memory rows grow with T; no timing target is asserted (those live in the script);
(b) benchmarks/drmad_densenet.py on a few steps: DrMAD with K = T agrees with the exact
    hypergradient (cosine 1 to rounding) in every group, K = 1 reports every group, and
    velocity ``ignore`` leaves the L2 and initial-scale hypergradients as they were.
Bad options exit 2 with a one-line error before any work.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=1800):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("script,args,option", [
    ("drmad_densenet.py", ["--K", "0"], "--K"),
    ("drmad_densenet.py", ["--momenta", "1.5"], "--momenta"),
    ("exact_densenet.py", ["--memory-steps", "100"], "--memory-steps"),
])
def test_bad_options_exit_2(script, args, option):
    out = _run(script, *args, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and option in out.stderr


@pytest.mark.slow
def test_exact_densenet_short_run(tmp_path):
    f = tmp_path / "exact.json"
    out = _run("exact_densenet.py", "--quick", "--iters", "20", "--memory-steps", "20,60", "--json", str(f))
    assert out.returncode in (0, 1), out.stderr[-3000:]          # 1: a timing target missed under load
    r = json.loads(f.read_text())
    assert r["details"]["reversal_max_abs_error"] == 0.0
    assert 1.0 <= r["bits_over_floor"] and r["bits_over_floor_corrected"] <= 1.05
    m = r["memory"]
    assert [row["T"] for row in m] == [20, 60] and m[1]["buffer_bits"] > m[0]["buffer_bits"]
    assert r["densenet40_projection"]["peak_bytes"] > r["densenet40_projection"]["information_bytes"] > 0


@pytest.mark.slow
def test_drmad_densenet_k_equals_T_is_exact(tmp_path):
    f = tmp_path / "fid.json"
    out = _run("drmad_densenet.py", "--steps", "12", "--momenta", "0.9", "--K", "1,T", "--json", str(f))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(f.read_text())
    full = [row for row in r["rows"] if row["K"] == row["T"]]
    one = [row for row in r["rows"] if row["K"] == 1]
    assert len(full) == 1 and len(one) == 2                         # K = T once, K = 1 on both grids
    assert all(full[0]["agreement"][g]["rel_err"] <= 1e-8 for g in ("l2", "lr", "momentum", "init_scale"))
    assert set(one[0]["agreement"]) == {"l2", "lr", "momentum", "init_scale"}
    assert r["ignore_max_rel_diff"] <= 1e-10
