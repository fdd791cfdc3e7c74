"""Interrupt a command with SIGINT at random moments, resume it, compare with an uninterrupted run.

Used by ``test_interrupt.py`` (cpu_ver) and ``test_gpu_interrupt.py`` (gpu_ver). One
*chain* per command: the command is started, SIGINT arrives at a random step (read from
its progress bar) and a random moment within that step, the resume command continues
it and is interrupted the same way, and so on ``n`` times; the last resume runs to the
end.
Its results and arrays must equal those of one uninterrupted run bit for bit. Every
interrupt must leave exit status 130, a checkpoint, and a message naming the exact
resume command; all must land mid-run (0 < checkpoint step < end), or the chain
would not test anything.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BAR = re.compile(rb"(\d+)/(\d+) \[")    # tqdm: "| 12/80 [00:03<...": steps done of the bar's total
MESSAGE = "Continue with:\n"
LATE = 3      # steps a loaded machine may run between the progress bar's target and the stop


def _env():
    # TQDM_MININTERVAL/MINITERS: the bar redraws at every step, so its count is the step the
    # loop is at (by default it redraws at most every 0.1 s and skips steps of a fast loop)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0", TQDM_MINITERS="1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


class Run:
    """A started command: its output collected by a thread, which also follows its
    progress bars (``progress``: steps done, summed over the bars a command draws one
    after another, as ``adaptive`` does for its two runs)."""

    def __init__(self, argv, cwd):
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=cwd, env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output, self.t_loop, self.t_last, self.first = bytearray(), None, None, 0
        self.progress, self._bar, self._offset = 0, (0, 0), 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self.output += chunk
            for n, total in BAR.findall(chunk):
                n, total = int(n), int(total)
                if n < self._bar[0]:                 # the next bar: the previous one's steps are done
                    self._offset += self._bar[1]
                self._bar = (n, total)
                self.progress = self._offset + n
                self.t_last = time.perf_counter()
                if self.t_loop is None:
                    self.t_loop, self.first = self.t_last, self.progress

    def wait_progress(self, target, timeout=300):
        """Until a bar is drawn and ``progress`` reaches ``target`` (False if the command ended first)."""
        t_end = time.perf_counter() + timeout
        while ((self.t_loop is None or self.progress < target) and self.proc.poll() is None
               and time.perf_counter() < t_end):
            time.sleep(0.005)
        return self.t_loop is not None and self.progress >= target and self.proc.poll() is None

    def finish(self, timeout=600):
        """Wait for the end; return (exit status, its output: stdout and stderr together)."""
        self.proc.wait(timeout)
        self.reader.join()
        return self.proc.returncode, self.output.decode(errors="replace")


def run(argv, cwd):
    """Run to the end; return (seconds per step of its loop: first to last bar drawn,
    not the work after the loop, its output)."""
    r = Run(argv, cwd)
    rc, out = r.finish()
    assert rc == 0, f"{shlex.join(argv)} failed ({rc}):\n{out[-3000:]}"
    assert r.t_loop is not None and r.progress > r.first, "no progress bar: cannot tell where the loop is"
    return (r.t_last - r.t_loop) / (r.progress - r.first), out


def interrupt(argv, cwd, target, wait_s):
    """Start ``argv``; once its progress bars show ``target`` steps, wait ``wait_s`` s
    (a random point within a step) and send SIGINT. Return (exit status, output)."""
    r = Run(argv, cwd)
    if r.wait_progress(target):
        time.sleep(wait_s)
        r.proc.send_signal(signal.SIGINT)
    return r.finish()


def printed_resume(output: str):
    """The resume command an interrupted run printed (argv after ``python -m``), or None."""
    if MESSAGE not in output:
        return None
    words = shlex.split(output.split(MESSAGE, 1)[1].splitlines()[0])
    return words[2:] if words[:2] == ["python", "-m"] else None


def checkpointed_steps(folder: Path, names) -> int:
    """Steps (or meta-iterations) held by the checkpoints ``names`` in ``folder``, summed (0 if missing)."""
    from shared.records import load_checkpoint

    total = 0
    for name in names:
        if (folder / name).exists():
            meta = load_checkpoint(folder / name)[1]
            total += int(meta.get("step", meta.get("meta_iter", 0)))
    return total


def arrays_of(folder: Path) -> dict:
    """Every array of every .npz in ``folder``, by file and name."""
    out = {}
    for f in sorted(folder.glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            out.update({(f.name, k): z[k] for k in z.files})
    return out


def metrics_of(folder: Path, drop=()) -> dict:
    m = json.loads((folder / "results.json").read_text())["metrics"]
    return {k: v for k, v in m.items() if k not in drop}


def assert_same(got: Path, want: Path, drop=()):
    """results.json metrics (as JSON text: values and types) and all arrays identical: dtype,
    shape and bytes (so a NaN equals the same NaN, as ``np.array_equal`` would not have it).
    ``drop``: metrics left out, with their checkpointed histories ``hist_<name>`` (wall-clock
    seconds per meta-iteration are a measurement, not a result)."""
    assert json.dumps(metrics_of(got, drop), sort_keys=True) == json.dumps(metrics_of(want, drop), sort_keys=True)
    skip = {f"hist_{d}" for d in drop}
    a, b = ({k: v for k, v in arrays_of(f).items() if k[1] not in skip} for f in (got, want))
    assert a.keys() == b.keys()
    for k in a:
        if k[1] == "__meta__":           # a checkpoint's JSON: equal but for time spent (``*_s``)
            assert _untimed(a[k]) == _untimed(b[k]), f"{k} differs"
            continue
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape) and a[k].tobytes() == b[k].tobytes(), \
            f"{k} differs"


def _untimed(meta_array):
    """A checkpoint's JSON without its time measurements (keys ending in ``_s``, at any depth)."""
    def strip(d):
        return {k: strip(v) for k, v in d.items() if not k.endswith("_s")} if isinstance(d, dict) else d
    return strip(json.loads(str(meta_array[()])))


def chain(argv, resume_of, progress_of, total, cwd, step_s, n=5, seed=0):
    """Interrupt ``argv`` ``n`` times at random moments (seeded): each time once a step
    drawn uniformly from the next ``(total - done) // (interrupts left + 1)`` is done (at
    least one further step, so that every interrupt lands past the last checkpoint and
    leaves room for the ones after it), at a random point within the step after it
    (``step_s``: seconds per step of an uninterrupted run). Each resume is ``resume_of(argv)``, which the
    command must also have printed; the last one runs to the end. ``progress_of(argv)``
    reads the steps the checkpoint that ``argv`` resumes holds. Returns (log: one
    (target step, exit status, checkpointed steps) per interrupt, the last argv, problems
    seen: exit status other than 130, a missing or different resume command)."""
    rng = np.random.default_rng(seed)
    log, problems = [], []
    for k in range(n):
        done = progress_of(argv)
        if done >= total:                            # the last stop came after the last step
            break
        # at most LATE steps pass between the target and the checkpoint, so each later
        # interrupt needs LATE + 1 steps and the last must leave one to run
        last = max(done + 1, min(done + (total - done) // (n - k + 1), total - (LATE + 1) * (n - k)))
        target = int(rng.integers(done + 1, last + 1))
        rc, out = interrupt(argv, cwd, target, float(rng.uniform(0.0, step_s)))
        if rc == 0:                                  # the signal came after the last step: nothing to resume
            log.append((target, rc, total))
            break
        expected = resume_of(argv)
        log.append((target, rc, progress_of(expected)))
        printed = printed_resume(out)
        if rc != 130 or printed != expected:
            problems.append(f"exit {rc}, printed resume {printed}, expected {expected}:\n{out[-2000:]}")
        argv = expected
    if not log or log[-1][1] != 0:
        run(argv, cwd)
    return log, argv, problems


def assert_all_mid_run(log, total, n=5):
    """All ``n`` interrupts stopped the command (exit 130) with a checkpoint strictly inside the run."""
    mid = [after for _, rc, after in log if rc == 130 and 0 < after < total]
    assert len(log) == n and len(mid) == n, f"not every interrupt landed mid-run: {log}"


def option_value(argv, opt):
    """The folder given to ``opt`` in ``argv`` (None: the option takes no value there)."""
    i = argv.index(opt)
    return Path(argv[i + 1]) if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None


def chain_equals_reference(tmp_path, argv, resume_of, progress_of, final_dir, total, drop=()):
    """Run ``argv`` once to the end and as a chain of 5 interrupts (``chain``); the chain's
    final folder (``final_dir`` of its last argv) must equal the reference bit for bit and
    every interrupt must have stopped the command mid-run."""
    ref = tmp_path / "ref"
    step_s, _ = run([*argv, "--out", str(ref)], tmp_path)
    log, last, problems = chain([*argv, "--out", str(tmp_path / "cut")], resume_of, progress_of, total,
                                tmp_path, step_s, n=5, seed=total)
    assert_same(final_dir(last), ref, drop)
    assert not problems, problems
    assert_all_mid_run(log, total, n=5)
