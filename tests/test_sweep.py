"""``sweep SPEC`` on an embedded LocalCluster of two workers, with tiny cpu_ver runs.

One sweep (module fixture) holds two hypergradient runs, two meta-optimisation runs (one of
whose workers the test kills by pid once its checkpoint exists) and one run that always
fails; the tests then read its folder. Another sweep is interrupted and restarted.
Unit tests of the spec's expansion and its one-line errors need no cluster.
"""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from shared import sweep_spec
from shared.errors import ConfigError
from sweep_helpers import (HG_TINY, REPO, TINY, env, manifest, metrics, record, run, run_alone, sweep_argv,
                           without_timings, write_spec)

HG = HG_TINY
META = {"name": "meta", "command": "meta", "options": {**TINY, "iters": 20, "meta_iters": 40},
        "grid": {"seed": [0, 1]}}
# a learning rate outside the fixed-point range: refused by the run (exit 2) after its options pass
BAD = {"name": "bad", "command": "hypergrad", "options": {**TINY, "method": "exact", "iters": 5, "lr": 1e6},
       "grid": {"seed": [0]}}


# ------------------------------------------------------------------------------- the spec alone

def test_grid_expands_to_runs_named_by_the_hash_of_their_options(tmp_path):
    p = write_spec(tmp_path / "s.toml", "s", [HG, {**HG, "name": "hg2", "grid": {"seed": [0, 1], "K": [1, 2]}}])
    spec = sweep_spec.load(p)
    assert len(spec.runs) == 2 + 4
    r = spec.runs[0]
    assert r.options == {**TINY, "method": "exact", "iters": 5, "seed": 0}
    assert r.run_id == sweep_spec.run_id("cpu_ver", "hypergrad", dict(reversed(list(r.options.items()))))
    assert r.argv()[:2] == ["--dataset", "synthetic"] and "--seed" in r.argv()
    assert len({x.run_id for x in spec.runs}) == 6 and spec.axes == ("part", "seed", "K")
    assert sweep_spec.options_argv({"log_space": True, "baseline": False, "lr": 0.1}) == ["--log-space", "--lr", "0.1"]


def test_scale_merges_options_and_replaces_axes(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('name = "s"\nbackend = "cpu_ver"\ncommand = "hypergrad"\n[options]\niters = 50\n'
                 '[grid]\nseed = [0, 1, 2]\n[scales.tiny]\noptions = { iters = 5 }\ngrid = { seed = [7] }\n')
    assert [r.options for r in sweep_spec.load(p, "tiny").runs] == [{"iters": 5, "seed": 7}]
    assert len(sweep_spec.load(p).runs) == 3
    with pytest.raises(ConfigError, match=r"--scale huge: .* defines the scales tiny"):
        sweep_spec.load(p, "huge")


@pytest.mark.parametrize("text, message", [
    ('backend = "cpu_ver"\ncommand = "x"\n', r"name: a sweep needs a name"),
    ('name = "s"\nbackend = "jax"\ncommand = "meta"\n', r"backend: choose from cpu_ver, gpu_ver"),
    ('name = "s"\nbackend = "cpu_ver"\ncommand = "meta"\n[options]\nout = "x"\n', r"options.out: the sweep sets"),
    ('name = "s"\nbackend = "cpu_ver"\ncommand = "meta"\n[grid]\nseed = []\n', r"grid.seed: a grid axis is a non-empty"),
    ('name = "s"\nbackend = "cpu_ver"\ncommand = "meta"\n[options]\nseed = [1, 2]\n', r"put values to sweep under"),
    ('name = "s"\nbackend = "cpu_ver"\ncommand = "meta"\ncolour = 1\n', r"unknown key 'colour'"),
    ('name = "s"\nbackend = "cpu_ver"\ncommand = "meta"\n[grid]\nseed = [1, 1]\n', r"repeated value"),
    ('name = "s"\nbackend = \n', r"not valid TOML"),
])
def test_bad_spec_is_one_line_naming_the_problem(tmp_path, text, message):
    p = tmp_path / "s.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        sweep_spec.load(p)


@pytest.mark.parametrize("options, message", [
    ({"method": "nope"}, r"run .*: cpu_ver hypergrad: argument --method: invalid choice: 'nope'"),
    ({"iters": 0}, r"run .*: --iters must be an integer >= 1, got 0"),
    ({"colour": 1}, r"cpu_ver hypergrad: unrecognized arguments: --colour 1"),
])
def test_options_the_backend_refuses_end_the_sweep_before_any_work(tmp_path, options, message):
    p = write_spec(tmp_path / "s.toml", "s", [{**HG, "options": {**HG["options"], **options}}])
    r = run(sweep_argv("cpu_ver", p, tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert __import__("re").search(message, r.stderr), r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_sweep_options_are_refused(tmp_path):
    p = write_spec(tmp_path / "s.toml", "s", [HG])
    for extra, message in ((["--retries", "-1"], "--retries must be an integer >= 0"),
                           (["--slurm", "queue=q"], "--slurm needs jobs=N"),
                           (["--slurm", "jobs=2,colour=red"], "unknown setting 'colour'"),
                           (["--scale", "tiny"], "defines no scales"),
                           (["--launch", "fork"], "error: argument --launch: invalid choice: 'fork'"),
                           (["--workers", "two"], "error: argument --workers: invalid int value: 'two'"),
                           (["--colour", "red"], "error: unrecognized arguments: --colour red")):
        r = run(sweep_argv("gpu_ver", p, tmp_path / "out", *extra))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- one real sweep

def _logs_open(proc: psutil.Process) -> list:
    """The run folders whose sweep.log ``proc`` holds open."""
    try:
        return [Path(f.path).parent for f in proc.open_files() if f.path.endswith("/sweep.log")]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _is_zygote(proc: psutil.Process) -> bool:
    try:
        return "shared.sweep_zygote" in proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return True


def _kill_meta_runs(driver: subprocess.Popen, deadline: float) -> dict:
    """SIGKILL by pid, once a meta run's checkpoint exists: first the worker process running
    it (the worker holds the run's sweep.log open while the attempt runs), then the run's
    own process (not its worker) of another meta run: a fork of the machine's zygote, which
    is the driver's child, not the worker's. ``{"worker": folder, "run": folder}`` of the
    runs caught (a key is missing when no such moment came), and ``"forked_from"``: the
    command line of the killed run's zygote."""
    me, killed = psutil.Process(driver.pid), {}
    while time.time() < deadline and driver.poll() is None and "run" not in killed:
        try:
            kids = me.children()
            everyone = me.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        workers = [k for k in kids if not _is_zygote(k)]
        for folder, proc in [(f, p) for p in everyone if p not in workers for f in _logs_open(p)]:
            if "meta-" not in folder.name or not (folder / "checkpoint.npz").is_file() or folder in killed.values():
                continue
            if "worker" not in killed:
                running = [w for w in workers if folder in _logs_open(w)]
                if running:
                    running[0].kill()
                    killed["worker"] = folder
                    break
            else:
                with contextlib.suppress(psutil.NoSuchProcess):
                    killed["forked_from"] = proc.parent().parent().cmdline()
                proc.kill()
                killed["run"] = folder
                break
        time.sleep(0.05)
    return killed


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    spec = write_spec(root / "spec.toml", "faults", [META, HG, BAD])
    out = root / "out"
    t0 = time.time()
    driver = subprocess.Popen(sweep_argv("cpu_ver", spec, out, "--workers", "2", "--retries", "1"), cwd=REPO,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = _kill_meta_runs(driver, time.time() + 120)
    stdout, stderr = driver.communicate(timeout=300)
    return {"root": root, "out": out, "spec": spec, "rc": driver.returncode, "stdout": stdout, "stderr": stderr,
            "killed": killed, "manifest": manifest(out), "seconds": time.time() - t0}


def _entries(m, part):
    return [e for e in m["runs"].values() if e["part"] == part]


def test_sweep_completes_the_good_runs_and_fails_the_bad_one_after_its_retries(sweep):
    m = sweep["manifest"]
    assert sweep["rc"] == 1, sweep["stderr"][-2000:]          # one run failed
    states = {e["folder"]: e["state"] for e in m["runs"].values()}
    assert sorted(states.values()) == ["done"] * 4 + ["failed"], states
    (bad,) = _entries(m, "bad")
    assert bad["state"] == "failed" and bad["attempts"] == 2            # the first attempt and one retry
    assert "exit status 2: error: increment of weights" in bad["error"]
    assert "outside the fixed-point range" in bad["error"]
    results = json.loads((sweep["out"] / "results.json").read_text())
    assert results["metrics"]["runs"] == {"pending": 0, "running": 0, "done": 4, "failed": 1}
    assert list(results["metrics"]["failed"]) == [bad["folder"]]
    assert (sweep["out"] / "command.txt").read_text().startswith("python -m cpu_ver sweep")


@pytest.mark.parametrize("which", ["worker", "run"])
def test_killed_run_is_retried_from_its_checkpoint(sweep, which):
    """A worker killed by pid, and a run's own process killed by pid: each run is retried from
    its checkpoint, and nothing else is lost."""
    assert which in sweep["killed"], f"no meta run was caught between two checkpoints ({which})"
    folder = sweep["killed"][which]
    m = sweep["manifest"]
    (e,) = [e for e in m["runs"].values() if (sweep["out"] / e["folder"]).resolve() == folder.resolve()]
    assert e["state"] == "done" and e["attempts"] == 2, e
    starts = [line for line in (folder / "sweep.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(starts) == 2 and "--resume" not in starts[0], starts
    assert starts[1].endswith(f"--resume {folder}"), starts
    # the other runs each took one attempt: the kills lost nothing done
    assert sorted(x["attempts"] for x in m["runs"].values() if x["state"] == "done") == [1, 1, 2, 2]


def test_every_run_equals_the_same_command_run_alone(sweep, tmp_path):
    """Each run's record, hyperparameters and checkpoint arrays (forks of a zygote, two of
    them resumed after a kill) equal those of ``python -m cpu_ver ...`` run alone, bit for bit."""
    done = [e for e in sweep["manifest"]["runs"].values() if e["state"] == "done"]
    assert {e["launch"] for e in done} == {"zygote"}
    # forks of the machine's zygote, the restarted worker's runs too (so one import served both workers)
    assert {e["zygote"] for e in done} == {"machine"}
    assert "--listen-fd" in sweep["killed"].get("forked_from", [])
    alone = run_alone(done, tmp_path)
    for e in done:
        got, want = record(sweep["out"] / e["folder"]), record(alone[e["folder"]])
        assert got["arrays"] and got == want, e["folder"]


def test_table_has_mean_and_spread_over_seeds(sweep):
    import csv

    rows = list(csv.DictReader((sweep["out"] / "summary.csv").open()))
    assert [r["part"] for r in rows] == ["meta", "hg"]           # the failed run has no row
    m = sweep["manifest"]
    finals = [metrics(sweep["out"] / e["folder"])["final_val_loss"] for e in _entries(m, "meta")]
    mean = sum(finals) / 2
    std = (sum((f - mean) ** 2 for f in finals) / 1) ** 0.5
    assert rows[0]["seeds"] == "2"
    assert float(rows[0]["final_val_loss mean"]) == pytest.approx(mean, rel=1e-12)
    assert float(rows[0]["final_val_loss std"]) == pytest.approx(std, rel=1e-9)
    assert "final_val_loss mean" in sweep["stdout"] and "4 done, 1 failed" in sweep["stdout"]


def test_rerun_skips_done_runs_and_a_changed_spec_is_refused_by_name(sweep, tmp_path):
    out, m = sweep["out"], sweep["manifest"]
    stamps = {e["folder"]: (out / e["folder"] / "results.json").stat().st_mtime_ns
              for e in m["runs"].values() if e["state"] == "done"}
    changed = write_spec(sweep["root"] / "changed.toml", "faults", [META, {**HG, "grid": {"seed": [0, 1, 2]}}, BAD])
    r = run(sweep_argv("cpu_ver", changed, out))
    assert r.returncode == 2 and "1 new run(s) (first: hg: seed=2); pass --extend" in r.stderr, r.stderr
    lr = write_spec(sweep["root"] / "lr.toml", "faults", [META, {**HG, "options": {**HG["options"], "lr": 0.2}}, BAD])
    r = run(sweep_argv("cpu_ver", lr, out))
    assert r.returncode == 2 and "no longer in the spec (first: hg: seed=0; changed: lr null -> 0.2)" \
        in r.stderr, r.stderr
    # the original spec again (--list: nothing runs): the done runs stay done, the failed one is to do
    r = run(sweep_argv("cpu_ver", sweep["spec"], out, "--list"))
    assert r.returncode == 0 and r.stdout.count("done ") == 4 and r.stdout.count("pending ") == 1, r.stdout
    assert {f: (out / f / "results.json").stat().st_mtime_ns for f in stamps} == stamps


# ------------------------------------------------------------------------------- the driver stopped

def test_interrupted_driver_continues_where_it_stopped(tmp_path):
    spec = write_spec(tmp_path / "s.toml", "stop", [{**HG, "grid": {"seed": [0, 1, 2, 3]}}])
    out = tmp_path / "out"
    argv = sweep_argv("cpu_ver", spec, out, "--workers", "2", "--launch", "subprocess")      # the fallback
    driver = subprocess.Popen(argv, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and driver.poll() is None:
        try:
            if sum(e["state"] == "done" for e in manifest(out)["runs"].values()) >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    first = manifest(out)
    done = {e["folder"] for e in first["runs"].values() if e["state"] == "done"}
    if driver.returncode == 0:
        pytest.skip("the sweep finished before the interruption reached it")
    assert driver.returncode == 130 and "Continue with:" in err, err[-2000:]
    assert 1 <= len(done) < 4 and all(e["state"] in ("done", "pending") for e in first["runs"].values())
    stamps = {f: (out / f / "results.json").stat().st_mtime_ns for f in done}
    r = run(argv)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(done)} already done" in r.stdout
    final = manifest(out)
    assert all(e["state"] == "done" and e["launch"] == "subprocess" for e in final["runs"].values())
    alone = run_alone(list(final["runs"].values()), tmp_path)      # the subprocess path gives the same runs
    for e in final["runs"].values():
        assert record(out / e["folder"]) == record(alone[e["folder"]]), e["folder"]
    assert {f: (out / f / "results.json").stat().st_mtime_ns for f in done} == stamps
    assert all(final["runs"][k]["attempts"] == first["runs"][k]["attempts"] for k in final["runs"]
               if first["runs"][k]["folder"] in done)


def test_timings_are_the_only_difference_left_out():
    assert without_timings({"a_s": 1, "seconds": [1], "val": {"b_s": 2, "c": 3}, "x": [{"y_s": 1, "z": 2}]}) == \
        {"val": {"c": 3}, "x": [{"z": 2}]}
