"""Ctrl-C (SIGINT) and SIGTERM that take effect only between two steps of a long loop.

Python raises KeyboardInterrupt at whatever bytecode runs when the signal arrives. In a
training loop that can be after a compiled Theano step has updated its shared variables
but before the loop has counted the step (the checkpoint then says step t but holds the
weights after step t + 1, and a resumed run applies that step twice), between two
assignments of one step's results, or inside a numba kernel called from a Theano op
(``SystemError: ... returned a result with an exception set``, exit 1, no checkpoint).

Inside ``deferred()`` a signal only records a stop request. The loop calls ``check()``
at each step boundary, where everything it checkpoints is consistent; ``check()`` then
raises ``StopRequested`` (a KeyboardInterrupt, so code that cleans up on Ctrl-C still
runs), the loop writes its checkpoint and the command prints the exact command that
resumes it (``resume_argv``, ``report``). A second signal while a request is pending
aborts at once with a plain KeyboardInterrupt: no checkpoint is written then, and files
already written stay whole (every write is atomic, ``shared.records``).

Scopes nest (a command wraps its whole run, the loops it calls wrap themselves; one
request is seen by all of them) and restore the previous handlers when the outermost
one ends. A request that arrives after the last step boundary lets the command finish.
Outside the main thread, where Python delivers no signals, ``deferred()`` installs
nothing. The only module state is that scoped flag (``_SCOPE``).
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130                      # the shell's code for a command ended by Ctrl-C
# options a resumed command must not repeat: how many values each takes (None: an optional one)
_REPLACED = {"--resume": None, "--out": 1, "--stop-after": 1}


class StopRequested(KeyboardInterrupt):
    """Raised by ``check()`` at a step boundary after SIGINT/SIGTERM.

    ``resume_command`` is set by the command that wrote the checkpoint (the shell
    command that continues the run); ``report`` prints it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.resume_command = None


class _Scope:
    """The signal handler's flag: how deep ``deferred()`` is nested, the handlers it
    replaced, and the signal of a pending stop request (None: none)."""

    def __init__(self):
        self.depth = 0
        self.previous = {}
        self.pending = None


_SCOPE = _Scope()


def _handler(signum, frame):
    """Record the request (the first signal) or abort now (a second one)."""
    if _SCOPE.pending is not None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    _SCOPE.pending = signum
    # os.write, not print: the handler may run in the middle of a write to sys.stderr
    os.write(2, f"\n{signal.Signals(signum).name}: stopping after the current step "
                f"(again to stop at once, without a checkpoint)\n".encode())


@contextmanager
def deferred():
    """Within the block SIGINT and SIGTERM set the stop request that ``check()`` raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _SCOPE.depth == 0:
        _SCOPE.pending = None
        _SCOPE.previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _SCOPE.depth += 1
    try:
        yield
    finally:
        _SCOPE.depth -= 1
        if _SCOPE.depth == 0:
            for s, h in _SCOPE.previous.items():
                signal.signal(s, signal.SIG_DFL if h is None else h)
            _SCOPE.previous, _SCOPE.pending = {}, None


@contextmanager
def checkpointed(on_stop):
    """``deferred()`` around a loop that calls ``check()`` at its step boundaries; when
    that stops it, ``on_stop()`` (which writes the checkpoint) runs before the
    ``StopRequested`` goes on. A plain KeyboardInterrupt (a second signal) writes nothing:
    the state may then be half way through a step."""
    with deferred():
        try:
            yield
        except StopRequested:
            on_stop()
            raise


@contextmanager
def resumable(resume_command_argv):
    """``deferred()`` around the part of a command that ends with a checkpoint: a
    ``StopRequested`` leaving it carries ``resume_command_argv`` (the command that
    continues the run, e.g. from ``resume_argv``; None: not known) for ``report``."""
    with deferred():
        try:
            yield
        except StopRequested as e:
            if e.resume_command is None and resume_command_argv is not None:
                e.resume_command = as_command(resume_command_argv)
            raise


def stop_requested() -> bool:
    """Whether a signal asked the current ``deferred()`` scope to stop."""
    return _SCOPE.pending is not None


def check() -> None:
    """At a step boundary: raise ``StopRequested`` if a signal asked to stop."""
    if _SCOPE.pending is not None:
        raise StopRequested(_SCOPE.pending)


def resume_argv(argv, resume_args, out=None) -> list:
    """``argv`` (a command line, program first) with its ``--resume``, ``--out`` and
    ``--stop-after`` options dropped and ``resume_args`` (plus ``--out out`` when given)
    appended: the command that continues an interrupted run to the same result."""
    kept, i, argv = [], 0, [str(a) for a in argv]
    while i < len(argv):
        name, eq, _ = argv[i].partition("=")
        if name not in _REPLACED:
            kept.append(argv[i])
            i += 1
            continue
        n = _REPLACED[name]
        if eq:
            n = 0
        elif n is None:                        # an optional value: the next word if it is not an option
            n = int(i + 1 < len(argv) and not argv[i + 1].startswith("-"))
        i += 1 + n
    return kept + [str(a) for a in resume_args] + ([] if out is None else ["--out", str(out)])


def report(exc: KeyboardInterrupt, file=None) -> int:
    """Print what an interruption left behind; return the exit status (130)."""
    file = sys.stderr if file is None else file
    cmd = getattr(exc, "resume_command", None)
    if cmd:
        print(f"\ninterrupted between two steps; the checkpoint is written. Continue with:\n  {cmd}", file=file)
    elif isinstance(exc, StopRequested):
        print("\ninterrupted between two steps", file=file)
    else:
        print("\ninterrupted at once: no new checkpoint (files already written are whole)", file=file)
    return EXIT_CODE


def as_command(argv) -> str:
    """A command line as one shell-quoted string."""
    return shlex.join(str(a) for a in argv)
