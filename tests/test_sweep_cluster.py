"""``sweep --scheduler`` through a scheduler and workers started as separate processes on
127.0.0.1, and ``sweep --slurm``: the job script dask-jobqueue would submit (no SLURM here)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shared import sweep_exec
from shared.errors import ConfigError
from sweep_helpers import HG_TINY, env, manifest, metrics, run, run_alone, sweep_argv, write_spec


@pytest.fixture
def scheduler(tmp_path):
    """A Dask scheduler and one worker process (two single-threaded workers), each its own
    process; yields the scheduler's address."""
    info = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(info)],
                              env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.time() + 60
        while not info.is_file() and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2",
                                       "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                      env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        yield address
    finally:
        for p in reversed(procs):           # each started in its own session: its group is its own
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def test_sweep_through_a_scheduler_in_other_processes(scheduler, tmp_path):
    assert scheduler.startswith("tcp://127.0.0.1:")
    spec = write_spec(tmp_path / "s.toml", "remote", [HG_TINY])
    out = tmp_path / "out"
    r = run(sweep_argv("gpu_ver", spec, out, "--scheduler", scheduler), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest(out)
    assert [e["state"] for e in m["runs"].values()] == ["done", "done"]
    # the runs ran in the worker processes started above, not in the sweep's own process
    assert all(e["worker"].startswith("tcp_127.0.0.1_") for e in m["runs"].values()), m
    alone = run_alone(list(m["runs"].values()), tmp_path / "alone")
    for e in m["runs"].values():
        assert metrics(out / e["folder"]) == metrics(alone[e["folder"]])


@pytest.mark.slow       # the client tries to connect for its whole timeout
def test_unreachable_scheduler_is_one_line(tmp_path):
    spec = write_spec(tmp_path / "s.toml", "remote", [HG_TINY])
    r = run(sweep_argv("cpu_ver", spec, tmp_path / "out", "--scheduler", "tcp://127.0.0.1:9"), timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --scheduler tcp://127.0.0.1:9: cannot connect"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_slurm_job_script():
    pytest.importorskip("dask_jobqueue", reason="the slurm extra (scripts/test.sh installs it)")
    settings = sweep_exec.parse_slurm("queue=gpu,jobs=3,walltime=02:30:00,memory=8GB,account=hpo")
    assert settings == {"queue": "gpu", "jobs": 3, "walltime": "02:30:00", "memory": "8GB", "account": "hpo"}
    cluster = sweep_exec.slurm_cluster(settings)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for want in ("#SBATCH -p gpu", "#SBATCH -t 02:30:00", "#SBATCH -A hpo", "#SBATCH -n 1", "#SBATCH --cpus-per-task=1"):
        assert want in lines, (want, script)
    assert any(ln.startswith("#SBATCH --mem=") for ln in lines), script
    (worker,) = [ln for ln in lines if "distributed.cli.dask_worker" in ln]
    assert worker.startswith(sys.executable)
    assert worker.count("--nthreads 1") == 1 and "--nworkers" not in worker and " tcp://" in worker, worker


@pytest.mark.parametrize("text, message", [
    ("queue=gpu", "--slurm needs jobs=N"),
    ("jobs=two", "--slurm: jobs=two is not int"),
    ("jobs=1,walltime=soon", "walltime=soon is not a SLURM time"),
    ("jobs=1,jobs=2", "jobs given twice"),
    ("jobs", "'jobs' is not key=value"),
])
def test_slurm_settings_are_checked(text, message):
    with pytest.raises(ConfigError, match=message):
        sweep_exec.parse_slurm(text)


def test_slurm_without_dask_jobqueue_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(ConfigError, match=r"--slurm needs dask-jobqueue: pip install 'hypergrad-hpo\[slurm\]'"):
        sweep_exec.slurm_cluster({"jobs": 1})

