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
        assert plugin.run("no_such_backend", HG, tmp_path / "log", str(REPO), _env()) is None
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
