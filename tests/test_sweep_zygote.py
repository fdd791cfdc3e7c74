"""A worker's zygote (``shared/sweep_zygote.py``) and its fallback, without a cluster.

The sweep tests (tests/test_sweep.py) check that runs forked from zygotes equal the same
commands run alone, bit for bit, and survive kills; these check the zygote's own endings:
a command's exit status and usage errors, a zygote whose worker goes away, one that cannot
start, and a task outside a worker running as a subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from shared import sweep_exec, sweep_zygote
from sweep_helpers import REPO, TINY, env
from shared.sweep_spec import options_argv

pytestmark = pytest.mark.skipif(not sweep_zygote.available(), reason="zygotes need fork (Linux)")
HG = ["hypergrad", *options_argv({**TINY, "method": "exact", "iters": 5}), "--no-progress"]


def _env():
    return sweep_exec.run_env(env(), "test")


@pytest.fixture
def zygote():
    z = sweep_zygote.Zygote("cpu_ver", REPO, _env())
    yield z
    z.close()


def test_exit_status_is_the_commands(zygote, tmp_path):
    log = tmp_path / "sweep.log"
    assert zygote.run([*HG, "--iters", "0", "--out", str(tmp_path / "a")], log, REPO) == 2
    assert "error: --iters must be an integer >= 1, got 0" in log.read_text()
    # an argparse usage error ends by SystemExit(2) inside main
    assert zygote.run(["hypergrad", "--method", "nope"], log, REPO) == 2
    assert "invalid choice: 'nope'" in log.read_text()
    # the same zygote runs the next attempt; its output is appended to the log
    assert zygote.run([*HG, "--out", str(tmp_path / "b")], log, REPO) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["metrics"]["val_loss"] > 0
    assert log.read_text().count("results: ") == 1 and zygote.alive()


def test_a_zygote_whose_worker_goes_kills_its_child(tmp_path):
    """End of file on the zygote's input (its worker died or closed it) while a child runs:
    the child is killed and the zygote exits."""
    z = sweep_zygote.Zygote("cpu_ver", REPO, _env())
    z.wait_ready()
    argv = ["meta", *options_argv({**TINY, "iters": 20, "meta_iters": 100000}), "--no-progress",
            "--out", str(tmp_path / "m")]
    z.proc.stdin.write((json.dumps({"argv": argv, "log": str(tmp_path / "log"), "cwd": str(REPO)}) + "\n").encode())
    z.proc.stdin.flush()
    child = psutil.Process(json.loads(z.proc.stdout.readline())["pid"])
    assert child.ppid() == z.proc.pid
    z.proc.stdin.close()
    assert z.proc.wait(timeout=30) == 0
    gone, _ = psutil.wait_procs([child], timeout=10)
    assert gone, "the child outlived its zygote"
    z.proc.stdout.close()


def test_a_child_killed_by_pid_is_a_negative_return_code(zygote, tmp_path):
    argv = ["meta", *options_argv({**TINY, "iters": 20, "meta_iters": 100000}), "--no-progress",
            "--out", str(tmp_path / "m")]
    deadline = time.time() + 60

    def kill_when_running():
        while time.time() < deadline:
            kids = psutil.Process(zygote.proc.pid).children()
            if kids and (tmp_path / "m" / "checkpoint.npz").is_file():
                os.kill(kids[0].pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    import threading

    t = threading.Thread(target=kill_when_running)
    t.start()
    rc = zygote.run(argv, tmp_path / "log", REPO)
    t.join()
    assert rc == -signal.SIGKILL and zygote.alive()


def test_a_zygote_that_cannot_start_falls_back_to_a_subprocess(tmp_path):
    pytest.importorskip("distributed")
    from shared.sweep_plugin import Zygotes

    plugin = Zygotes()
    plugin.setup(SimpleNamespace(name="w"))
    try:
        assert plugin.run("no_such_backend", HG, tmp_path / "log", str(REPO), _env()) == (None, None)
    finally:
        plugin.teardown(None)


def test_a_task_outside_a_worker_runs_as_a_subprocess(tmp_path):
    task = {"backend": "cpu_ver", "command": "hypergrad", "argv": HG[1:], "folder": str(tmp_path / "run"),
            "checkpoint": None, "cwd": str(REPO), "launch": "zygote"}
    out = sweep_exec.run_task(task)
    assert out["error"] is None and out["launch"] == "subprocess" and out["worker"] == "local", out


def test_exit_code_is_the_interpreters():
    assert [sweep_zygote.exit_code(c) for c in (None, 0, 2, 256 + 3, True)] == [0, 0, 2, 3, 1]


@pytest.mark.parametrize("backend", sorted(sweep_zygote.WARM))
def test_every_warm_module_exists(backend):
    """A module renamed in the backend must be renamed here too: a zygote that cannot import
    one of its modules does not start, and every run silently takes the slower subprocess path."""
    import importlib.util

    missing = [m for m in sweep_zygote.modules_to_warm(backend) if importlib.util.find_spec(m) is None]
    assert missing == []


# ------------------------------------------------------------------------ the machine's zygote

def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


PROBE = """import json, os, sys, time


def main(argv):
    if argv[0] == "sleep":
        time.sleep(600)
    with open(argv[0], "w") as f:
        json.dump({"env": dict(os.environ), "pid": os.getpid(), "ppid": os.getppid()}, f)
    return 3
"""


@pytest.fixture
def probe(tmp_path):
    """A backend ``probe`` whose command writes its environment and pids to the file it is given."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__init__.py").write_text("")
    (tmp_path / "probe" / "__main__.py").write_text(PROBE)
    return tmp_path


def test_machine_zygote_forks_each_workers_attempts_in_their_own_environment(probe):
    """Two workers' connections to one machine's zygote: each attempt runs in a fork of the
    connection's server (itself a fork of the zygote), with exactly the environment its
    request carries (two workers' compile folders differ), and returns the command's status."""
    base = {**_env(), "PYTHONPATH": f"{REPO}:{probe}"}
    with sweep_zygote.machine_zygotes(["probe"], str(probe), base) as addresses:
        (zygote,) = [c for c in psutil.Process().children() if "--listen-fd" in c.cmdline()]
        handles = [sweep_zygote.Zygote.connect("probe", addresses["probe"]) for _ in range(2)]
        try:
            for i, z in enumerate(handles):
                env_i = {**base, sweep_exec.ENV_CACHE: str(probe / f"cache-{i}")}
                assert z.run([str(probe / f"out{i}")], probe / "log", probe, env_i) == 3
                got = json.loads((probe / f"out{i}").read_text())
                assert got["env"] == env_i
                assert psutil.Process(got["ppid"]).ppid() == zygote.pid
            assert all(z.alive() and z.proc is None for z in handles)
        finally:
            for z in handles:
                z.close()
        assert _wait_for(lambda: not zygote.children(), 10)       # each connection's server ends with it
    assert not zygote.is_running() or zygote.status() == psutil.STATUS_ZOMBIE


def test_a_closed_connection_kills_its_attempt(probe):
    """The worker gone (its connection closed) while its attempt runs: the attempt is killed,
    as a worker's own zygote kills it at end of file."""
    base = {**_env(), "PYTHONPATH": f"{REPO}:{probe}"}
    with sweep_zygote.machine_zygotes(["probe"], str(probe), base) as addresses:
        z = sweep_zygote.Zygote.connect("probe", addresses["probe"])
        z.wait_ready()
        z._in.write((json.dumps({"argv": ["sleep"], "log": str(probe / "log"), "cwd": str(probe),
                                 "env": base}) + "\n").encode())
        z._in.flush()
        child = psutil.Process(z._answer()["pid"])
        z.close()
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone, "the attempt outlived its worker's connection"


def test_without_the_machines_zygote_a_worker_starts_its_own(tmp_path):
    """A machine's zygote that is not there (or was started with another environment): the
    worker's plugin forks the attempt from a zygote of its own, and says so."""
    pytest.importorskip("distributed")
    from shared.sweep_plugin import Zygotes

    env_w = sweep_exec.run_env(os.environ, "w")
    for i, machine_env in enumerate((env_w, {**env_w, "OPENBLAS_NUM_THREADS": "7"})):
        plugin = Zygotes(["cpu_ver"], str(REPO)).sharing({"cpu_ver": "\0hpo-sweep-zygote-nobody"}, machine_env)
        plugin.setup(SimpleNamespace(name="w"))
        try:
            rc, kind = plugin.run("cpu_ver", [*HG, "--out", str(tmp_path / str(i))], tmp_path / "log", str(REPO),
                                  env_w)
            assert (rc, kind) == (0, "worker")
        finally:
            plugin.teardown(None)


def test_figures_drawn_after_the_warm_up_are_byte_identical(tmp_path):
    """The zygote's matplotlib warm-up fills caches only: the PNG a command writes in a fork
    equals, byte for byte, the one it writes in a fresh interpreter."""
    from sweep_helpers import run

    z = sweep_zygote.Zygote("cpu_ver", REPO, _env())
    try:
        assert z.run([*HG, "--out", str(tmp_path / "fork")], tmp_path / "log", REPO) == 0
    finally:
        z.close()
    r = run([sys.executable, "-m", "cpu_ver", *HG, "--out", str(tmp_path / "alone")])
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in (tmp_path / "alone").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (tmp_path / "fork").glob("*.png"))
    for name in pngs:
        assert (tmp_path / "fork" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name
