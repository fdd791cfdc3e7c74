"""The named experiments (experiments/*.toml) and gpu_ver runs in a sweep.

Default run: every spec loads at each of its scales, and every run's options pass its
backend's parser (``sweep --list``: nothing runs); each worker's runs get their own Theano
compile folder. Slow: every spec runs at its ``tiny`` scale on two workers, and a sweep of
gpu_ver runs on two workers finishes (no deadlock on Theano's compile lock).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from shared import sweep_exec, sweep_spec
from sweep_helpers import REPO, TINY, manifest, run, sweep_argv, write_spec

SPECS = sorted((REPO / "experiments").glob("*.toml"))


def test_there_are_the_four_experiments():
    assert {p.stem for p in SPECS} >= {"drmad_vs_exact", "densenet_l2", "densenet_adaptive", "hd_mnist"}


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_spec_has_tiny_and_paper_scales_whose_runs_parse(spec):
    from shared.sweep_cli import check_runs

    doc = sweep_spec.read_toml(spec)
    assert {"tiny", "paper"} <= set(sweep_spec.scales_of(doc))
    for scale in ("tiny", "paper"):
        s = sweep_spec.load(spec, scale)
        assert len(s.runs) >= 2 and len({r.run_id for r in s.runs}) == len(s.runs)
        tasks = check_runs(s)               # each run's options through its backend's parser
        assert set(tasks) == {r.run_id for r in s.runs}
        assert all("--no-progress" in t["argv"] for t in tasks.values())


def test_list_shows_every_run_and_writes_nothing(tmp_path):
    spec = REPO / "experiments" / "drmad_vs_exact.toml"
    r = run(sweep_argv("gpu_ver", "experiments/drmad_vs_exact.toml", tmp_path / "x", "--scale", "tiny", "--list"),
            timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("pending ") == len(sweep_spec.load(spec, "tiny").runs)
    assert "python -m cpu_ver hypergrad " in r.stdout and "python -m cpu_ver meta " in r.stdout
    assert not (tmp_path / "x").exists()


def test_each_worker_has_its_own_compile_folder(tmp_path):
    base = {"PATH": "/bin", sweep_exec.ENV_CACHE: str(tmp_path / "cache")}
    a, b = sweep_exec.run_env(base, "0"), sweep_exec.run_env(base, "1")
    assert a[sweep_exec.ENV_CACHE] == str(tmp_path / "cache" / "sweep-worker-0")
    assert b[sweep_exec.ENV_CACHE] == str(tmp_path / "cache" / "sweep-worker-1")
    assert a["OPENBLAS_NUM_THREADS"] == "1" and sweep_exec.run_env({**base, "OMP_NUM_THREADS": "4"}, "0")[
        "OMP_NUM_THREADS"] == "4"
    home = sweep_exec.run_env({"HOME": str(tmp_path)}, "w")[sweep_exec.ENV_CACHE]
    assert home == str(tmp_path / ".cache" / "hypergrad-hpo" / "theano" / "sweep-worker-w")


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_experiment_runs_at_tiny_scale(spec, tmp_path):
    out = tmp_path / "out"
    backend = sweep_spec.load(spec, "tiny").runs[0].backend
    r = run(sweep_argv(backend, spec, out, "--scale", "tiny", "--workers", "2"), timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest(out)
    assert all(e["state"] == "done" for e in m["runs"].values())
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert rows and all(int(x["seeds"]) >= 2 for x in rows)
    figures = json.loads((out / "results.json").read_text())["metrics"]["figures"]
    doc = sweep_spec.read_toml(spec)
    assert figures == [p["file"] for p in doc.get("plots", [])]
    assert all((out / f).stat().st_size > 10_000 for f in figures)


@pytest.mark.slow
def test_gpu_ver_sweep_on_two_workers_does_not_deadlock(tmp_path, monkeypatch):
    """Two gpu_ver runs at once, each worker compiling into its own folder (cold)."""
    cache = tmp_path / "theano"
    monkeypatch.setenv(sweep_exec.ENV_CACHE, str(cache))
    part = {"name": "gpu", "backend": "gpu_ver", "command": "drmad",
            "options": {**TINY, "iters": 8, "layers": "20,8,3"}, "grid": {"seed": [0, 1]}}
    spec = write_spec(tmp_path / "s.toml", "gpu", [part])
    out = tmp_path / "out"
    r = run(sweep_argv("gpu_ver", spec, out, "--workers", "2", "--retries", "0"), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest(out)
    assert [e["state"] for e in m["runs"].values()] == ["done", "done"]
    workers = {e["worker"] for e in m["runs"].values()}
    assert all((cache / f"sweep-worker-{w}").is_dir() for w in workers)
    if len(workers) == 2:       # the two runs ran at once, one per worker
        assert all(any(Path(cache / f"sweep-worker-{w}").rglob("*.so")) for w in workers)
