"""A notice for waits that can be long and silent (a first Theano compile can take minutes).

``slow_notice(what)`` wraps the wait: if it is still running after ``after`` seconds, one
line ``compiling <what> (first run; cached afterwards) ...`` goes to stderr, then the
elapsed time every ``every`` seconds, and ``compiled <what> in N s`` when it ends. A wait
shorter than ``after`` prints nothing, so cached runs stay quiet.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


@contextmanager
def slow_notice(what: str, after: float = 2.0, every: float = 30.0, stream=None,
                verb: str = "compiling", note: str = "first run; cached afterwards"):
    """Report a wait on ``stream`` (default stderr) once it exceeds ``after`` seconds."""
    out = stream if stream is not None else sys.stderr
    t0 = time.perf_counter()
    done = threading.Event()
    shown = []

    def say(text):
        try:
            print(text, file=out, flush=True)
        except (OSError, ValueError):         # a closed stream must not break the wait
            pass

    def watch():
        if done.wait(after):
            return
        shown.append(True)
        say(f"{verb} {what} ({note}) ...")
        while not done.wait(every):
            say(f"  still {verb} {what}: {time.perf_counter() - t0:.0f} s")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        if shown:
            say(f"{verb.replace('compiling', 'compiled')} {what} in {time.perf_counter() - t0:.1f} s")
