"""A sweep worker's zygote: one long-lived process that has imported a backend, and forks a
child per attempt of a run.

A fresh ``python -m cpu_ver meta ...`` spends most of a tiny run importing numpy, scipy,
autograd, numba, scikit-learn and matplotlib. The zygote (``python -m shared.sweep_zygote
BACKEND``, started by a worker with the environment a run's subprocess would get) imports
them once; each attempt is then ``os.fork()`` of the zygote, so it starts with those modules
loaded and nothing else done: no command has run in the zygote, so every child begins in
the state a fresh interpreter reaches after the same imports.

The child (``_child``): dies with the zygote (``PR_SET_PDEATHSIG``, SIGKILL), has its
standard output and error appended to the run's log and its standard input on /dev/null
(as the subprocess path), ``sys.argv`` as ``python -m BACKEND`` would set it, numpy's global
random state drawn afresh (a new process's is; a fork would copy the zygote's), and calls
``BACKEND.__main__.main(argv)``; its exit status is main's return value or SystemExit code,
1 after an uncaught exception (its traceback in the log), as the interpreter would end.

What is imported (``WARM``): the backend's command module and the modules its commands
import when they run. gpu_ver's zygote never imports Theano: Theano reads its flags
(device, floatX, compile folder) once at import, and they belong to each run
(``gpu_ver.config.load`` in the child).

Protocol, one JSON object a line: the worker writes ``{"argv", "log", "cwd"}`` to the
zygote's standard input; the zygote answers ``{"ready": true}`` once after its imports,
then per request ``{"pid"}`` (the child) and ``{"returncode"}`` (negative: the signal that
killed it, as ``subprocess``). End of file on its standard input (the worker closed it, or
the worker died) makes the zygote kill a child still running and exit, so a killed worker
takes its runs with it. ``Zygote`` is the worker's handle of one zygote process.

Linux only (fork and ``PR_SET_PDEATHSIG``); elsewhere the worker runs each attempt as a
subprocess (``shared/sweep_exec.py``).
"""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys

# backend -> modules imported before the first fork (those its commands import as they run);
# a name ending in ".*" is a package and every module below it (cpu_ver's commands import
# most of the package lazily, and a list of its module names would go stale as it moves)
WARM = {
    "cpu_ver": ("cpu_ver.*", "shared.records", "shared.online", "shared.exact_kernels",
                "sklearn.datasets", "matplotlib.pyplot"),
    "gpu_ver": ("gpu_ver.__main__", "shared.records", "shared.online", "shared.exact_kernels", "scipy.linalg",
                "sklearn.datasets",
                "matplotlib.pyplot"),
}
PR_SET_PDEATHSIG = 1


def available() -> bool:
    """Whether attempts can run in a zygote here (Linux: fork and PR_SET_PDEATHSIG)."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def warm(backend: str) -> None:
    """Import ``WARM[backend]`` (matplotlib with the Agg backend, as the commands select it),
    then load the compiled numba kernels of the project's modules from numba's disk cache."""
    for name in modules_to_warm(backend):
        if name == "matplotlib.pyplot":
            import matplotlib  # noqa: PLC0415

            matplotlib.use("Agg")
        importlib.import_module(name)
    load_numba_caches([m for name, m in list(sys.modules.items()) if name.split(".")[0] in (backend, "shared")])


def modules_to_warm(backend: str) -> list:
    """``WARM[backend]`` with each ``package.*`` expanded to the package and its modules."""
    import pkgutil  # noqa: PLC0415

    names = []
    for name in WARM.get(backend, (f"{backend}.__main__",)):
        if not name.endswith(".*"):
            names.append(name)
            continue
        package = importlib.import_module(name[:-2])
        names.append(package.__name__)
        names.extend(m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
    return names


def load_numba_caches(modules) -> int:
    """Load into each ``numba.njit(cache=True)`` kernel of ``modules`` the machine code numba's
    disk cache holds for it (every signature compiled before, for this CPU and source), as
    its first call would; nothing is compiled. The number of signatures loaded. Uses numba's
    cache index (an internal of numba 0.57): on any difference it loads nothing, and the
    child's first call loads the kernel as a fresh process does."""
    dispatcher = getattr(sys.modules.get("numba.core.dispatcher"), "Dispatcher", None)
    if dispatcher is None:
        return 0
    loaded = 0
    for module in modules:
        for obj in list(vars(module).values()):
            if not isinstance(obj, dispatcher) or getattr(obj, "_cache", None) is None:
                continue
            try:
                magic = obj.targetctx.codegen().magic_tuple()
                for key in obj._cache._cache_file._load_index():
                    if key[1] == magic and obj._cache.load_overload(key[0], obj.targetctx) is not None:
                        obj.compile(key[0])        # found in the cache just now: loads, does not compile
                        loaded += 1
            except Exception:           # noqa: BLE001 (a warm-up only)
                continue
    return loaded


def exit_code(code) -> int:
    """The exit status the interpreter gives ``sys.exit(code)``: None 0, an int itself, else 1
    (the object printed to stderr)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------- the child

def _die_with_parent(parent: int) -> None:
    import ctypes  # noqa: PLC0415

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:          # the zygote died before prctl took effect
        os._exit(1)


def _child(backend: str, request: dict, parent: int, keep: tuple, sigint) -> int:
    """In the forked child: set the process up as ``python -m BACKEND ARGV > LOG 2>&1`` would
    be, run the command, return its exit status."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, sigint)
    for fd in keep:
        os.close(fd)
    os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    main = importlib.import_module(f"{backend}.__main__")
    sys.argv = [main.__file__, *request["argv"]]
    try:
        code = exit_code(main.main(list(request["argv"])))
    except SystemExit as e:
        code = exit_code(e.code)
    except BaseException:       # noqa: BLE001 (the interpreter prints it and exits 1)
        sys.excepthook(*sys.exc_info())
        code = 1
    import atexit  # noqa: PLC0415

    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    return code


def _fork(backend: str, request: dict, keep: tuple, sigint) -> int:
    """Fork a child for ``request``; its pid (the child never returns from here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _child(backend, request, parent, keep, sigint)
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, requests: int):
    """Wait for child ``pid``; its return code, or None when ``requests`` reached end of file
    first (the child is then killed and reaped)."""
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            ready, _, _ = select.select([requests] + ([pidfd] if pidfd is not None else []), [], [],
                                        None if pidfd is not None else 0.05)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if requests in ready and not os.read(requests, 1 << 16):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _lines(fd: int):
    """The JSON requests on ``fd``, one a line, until end of file."""
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        if line.strip():
            yield json.loads(line)


def serve(backend: str) -> int:
    """The zygote's loop (``python -m shared.sweep_zygote BACKEND``)."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                       # what imports print goes to stderr, not into the answers
    sigint = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C is the runs' and the driver's, not ours
    warm(backend)
    import gc  # noqa: PLC0415

    gc.freeze()         # the imported modules' objects: never collected, so no child's collector touches their pages
    answers.write(json.dumps({"ready": True}) + "\n")
    keep = (answers.fileno(),)         # the child's fd 0 goes to /dev/null over the requests
    for request in _lines(0):
        pid = _fork(backend, request, keep, sigint)
        answers.write(json.dumps({"pid": pid}) + "\n")
        rc = _wait(pid, 0)
        if rc is None:
            return 0
        answers.write(json.dumps({"returncode": rc}) + "\n")
    return 0


# ---------------------------------------------------------------------------------- the handle

class ZygoteLost(RuntimeError):
    """The zygote process ended (its exit status in ``returncode``)."""

    def __init__(self, returncode):
        how = f"killed by {signal.Signals(-returncode).name}" if returncode and returncode < 0 else \
            f"exit status {returncode}"
        super().__init__(f"the worker's zygote process ended ({how})")
        self.returncode = returncode


class Zygote:
    """A worker's handle of one zygote process of ``backend``, started in ``cwd`` with ``env``
    (the environment a run's subprocess would get)."""

    def __init__(self, backend: str, cwd, env: dict):
        self.backend = backend
        self.proc = subprocess.Popen([sys.executable, "-m", "shared.sweep_zygote", backend], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise ZygoteLost(self.proc.wait())
        return json.loads(line)

    def wait_ready(self) -> None:
        """Block until the zygote has imported its modules; ZygoteLost if it could not."""
        if not self.ready:
            self._answer()
            self.ready = True

    def run(self, argv: list, log, cwd) -> int:
        """Run ``BACKEND.__main__.main(argv)`` in a forked child, its output appended to ``log``,
        in folder ``cwd``; its return code (negative: the signal that killed it). ZygoteLost
        when the zygote ended before the child's end was reported."""
        self.wait_ready()
        try:
            self.proc.stdin.write((json.dumps({"argv": list(argv), "log": str(log), "cwd": str(cwd)}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ZygoteLost(self.proc.wait()) from None
        self._answer()                  # {"pid"}
        return int(self._answer()["returncode"])

    def close(self) -> None:
        """End the zygote (end of file on its input: a child still running is killed)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


if __name__ == "__main__":
    status = serve(sys.argv[1])
    sys.stderr.flush()
    os._exit(status)            # nothing of the zygote's own needs finalizing: skip the interpreter's teardown
