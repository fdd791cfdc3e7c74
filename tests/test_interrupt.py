"""Ctrl-C takes effect only between steps (shared/interrupt.py), and an interrupted
``cpu_ver meta`` / ``cpu_ver adaptive`` resumes to the uninterrupted result bit for bit."""
import os
import signal
import threading
from pathlib import Path

import pytest

import interrupt_runs as IR
from shared import interrupt
from shared.online_cli import CHECKPOINTS


# --------------------------------------------------------------------------- the helper
def test_a_signal_only_sets_the_request_until_check():
    before = signal.getsignal(signal.SIGINT)
    with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGINT)          # would raise KeyboardInterrupt right here
        assert interrupt.stop_requested()
        with pytest.raises(interrupt.StopRequested) as e:
            interrupt.check()
        assert e.value.signum == signal.SIGINT and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGINT) is before and not interrupt.stop_requested()
    interrupt.check()                                # outside a scope: nothing pending


def test_sigterm_too_and_nested_scopes_share_one_request():
    with interrupt.deferred():
        with interrupt.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.stop_requested()            # the inner scope's end keeps it for the outer loop
        with pytest.raises(interrupt.StopRequested, match="SIGTERM"):
            interrupt.check()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_second_signal_stops_at_once_and_writes_no_checkpoint():
    saved = []
    with pytest.raises(KeyboardInterrupt) as e:
        with interrupt.checkpointed(lambda: saved.append(1)):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    assert type(e.value) is KeyboardInterrupt and saved == []
    with pytest.raises(interrupt.StopRequested):
        with interrupt.checkpointed(lambda: saved.append(2)):
            os.kill(os.getpid(), signal.SIGINT)
            interrupt.check()
    assert saved == [2]


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def body():
        with interrupt.deferred():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [signal.getsignal(signal.SIGINT)]


def test_resume_argv_replaces_resume_out_and_stop_after():
    argv = ["python", "-m", "cpu_ver", "adaptive", "--out", "a b", "--steps", "9", "--stop-after=4",
            "--resume", "--lr", "0.1"]
    assert interrupt.resume_argv(argv, ["--resume", "a b"]) == [
        "python", "-m", "cpu_ver", "adaptive", "--steps", "9", "--lr", "0.1", "--resume", "a b"]
    assert interrupt.resume_argv(["p", "train", "--resume", "x", "--out=y"], ["--resume", "y"], out="y-2") == [
        "p", "train", "--resume", "y", "--out", "y-2"]
    e = interrupt.StopRequested(signal.SIGINT)
    e.resume_command = interrupt.as_command(["python", "-m", "cpu_ver", "meta", "--out", "a b"])
    import io
    f = io.StringIO()
    assert interrupt.report(e, f) == 130 and "python -m cpu_ver meta --out 'a b'" in f.getvalue()


# --------------------------------------------------------------------------- the commands
def _out(argv):
    """The run folder of a meta/adaptive command line (--out, or --resume's folder)."""
    for opt in ("--out", "--resume"):
        if opt in argv and argv.index(opt) + 1 < len(argv) and not argv[argv.index(opt) + 1].startswith("-"):
            return Path(argv[argv.index(opt) + 1])
    raise AssertionError(argv)


def _check_chain(tmp_path, argv, resume_of, names, total, drop=()):
    ref = tmp_path / "ref"
    step_s, _ = IR.run([*argv, "--out", str(ref)], tmp_path)
    cut = tmp_path / "cut"
    log, last, problems = IR.chain([*argv, "--out", str(cut)], resume_of, lambda a: IR.checkpointed_steps(_out(a), names),
                                   total, tmp_path, step_s, n=5, seed=len(argv))
    IR.assert_same(_out(last), ref, drop)
    assert not problems, problems
    IR.assert_all_mid_run(log, total, n=5)


META = ["cpu_ver", "meta", "--layers", "64,12,10", "--iters", "30", "--batch", "50", "--n-train", "300",
        "--n-val", "200", "--meta-iters", "25"]


def test_meta_interrupted_five_times_resumes_bit_for_bit(tmp_path):
    _check_chain(tmp_path, META, lambda a: interrupt.resume_argv(a, ["--resume"], out=_out(a)),
                 ["checkpoint.npz"], 25, drop=("seconds",))


ADAPTIVE = ["cpu_ver", "adaptive", "--method", "idbd", "--n-train", "200", "--n-val", "100", "--layers", "64,16,10",
            "--batch", "20", "--steps", "300", "--eval-every", "50"]


def test_adaptive_interrupted_five_times_resumes_bit_for_bit(tmp_path):
    _check_chain(tmp_path, ADAPTIVE, lambda a: interrupt.resume_argv(a, ["--resume", _out(a)]),
                 list(CHECKPOINTS.values()), 600)
