"""A sweep's zygote: one long-lived process that has imported a backend, and forks a child
per attempt of a run.

A fresh ``python -m cpu_ver meta ...`` spends much of a tiny run importing numpy, autograd,
numba and matplotlib and filling caches at its first figure. The zygote imports them once
(``warm``); each attempt is then ``os.fork()`` of it, so it starts with those modules loaded
and nothing else done: no command has run in the zygote, so every child begins in the
state a fresh interpreter reaches after the same imports (plus matplotlib's caches, which
change no figure: ``warm_matplotlib``).

Two kinds, one loop (``_serve_requests``):

- a worker's own (``python -m shared.sweep_zygote BACKEND``, started by the worker with the
  environment a run's subprocess would get): requests on its standard input, answers on
  its standard output;
- the machine's (``python -m shared.sweep_zygote BACKEND --listen-fd FD``, started by the
  driver of an embedded cluster: ``machine_zygotes``): it listens on a Unix socket and forks,
  for each worker that connects, a connection server (``_connection``) that serves that
  worker's requests on the connection as a worker's own zygote serves its standard input.
  One set of imports serves every worker of the machine.

The child (``_child``): dies with its parent (``PR_SET_PDEATHSIG``, SIGKILL), has its
standard output and error appended to the run's log and its standard input on /dev/null
(as the subprocess path), the environment its request carries (``env``: the run's own),
``sys.argv`` as ``python -m BACKEND`` would set it, numpy's global random state drawn
afresh (a new process's is; a fork would copy the zygote's), and calls
``BACKEND.__main__.main(argv)``; its exit status is main's return value or SystemExit code,
1 after an uncaught exception (its traceback in the log), as the interpreter would end.

What is imported (``WARM``): the backend's command module and the modules its commands
import when they run. gpu_ver's zygote never imports Theano: Theano reads its flags
(device, floatX, compile folder) once at import, and they belong to each run
(``gpu_ver.config.load`` in the child, from the request's environment).

Protocol, one JSON object a line: the worker writes ``{"argv", "log", "cwd", "env"}``; the
zygote (or connection server) answers ``{"ready": true}`` once after its imports, then per
request ``{"pid"}`` (the child) and ``{"returncode"}`` (negative: the signal that killed it,
as ``subprocess``). End of file on the requests (the worker closed them, or died) makes it
kill a child still running and exit, so a killed worker takes its runs with it. ``Zygote``
is the worker's handle of either kind.

Linux only (fork, ``PR_SET_PDEATHSIG``, abstract Unix sockets); elsewhere the worker runs
each attempt as a subprocess (``shared/sweep_exec.py``).
"""
from __future__ import annotations

import contextlib
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
                "matplotlib.pyplot"),
    "gpu_ver": ("gpu_ver.__main__", "shared.records", "shared.online", "shared.exact_kernels", "scipy.linalg",
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
    if "matplotlib" in sys.modules:
        warm_matplotlib()
    load_numba_caches([m for name, m in list(sys.modules.items()) if name.split(".")[0] in (backend, "shared")])


def warm_matplotlib() -> None:
    """Fill matplotlib's caches as a command's first figure would: draw one small figure
    off-screen (an Agg canvas of its own, not pyplot's, which keeps no record of it) with
    mathtext tick labels, and encode it as PNG. Caches only (the font, the mathtext
    parser, compiled patterns, the PNG writer): every figure a command draws afterwards is
    the same, byte for byte, and each fork saves what its first figure would spend on them
    (about 0.1 s)."""
    import io  # noqa: PLC0415

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(2, 1))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.semilogy([0, 1], [1e-3, 1.0])
    ax.set_title("warm")
    fig.savefig(io.BytesIO(), format="png")


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

def die_with_parent() -> None:
    """Ask the kernel for SIGKILL when this process's parent dies (Linux; nothing elsewhere)."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _die_with_parent(parent: int) -> None:
    die_with_parent()
    if os.getppid() != parent:          # the parent died before prctl took effect
        os._exit(1)


def _child(backend: str, request: dict, parent: int, keep: tuple, sigint) -> int:
    """In the forked child: set the process up as ``python -m BACKEND ARGV > LOG 2>&1`` would
    be, run the command, return its exit status."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, sigint)
    for fd in keep:
        os.close(fd)
    os.chdir(request["cwd"])
    if request.get("env") is not None:        # the run's own environment (a machine's zygote serves every worker)
        os.environ.clear()
        os.environ.update(request["env"])
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


def _prelude(backend: str):
    """The zygote's start: Ctrl-C ignored (it is the runs' and the driver's), the backend
    imported, the imported objects frozen; the SIGINT handler its children restore."""
    sigint = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warm(backend)
    import gc  # noqa: PLC0415

    gc.freeze()         # the imported modules' objects: never collected, so no child's collector touches their pages
    return sigint


def _serve_requests(backend: str, requests: int, answers, keep: tuple, sigint) -> int:
    """Answer the requests read from fd ``requests`` (one child at a time) until end of file."""
    answers.write(json.dumps({"ready": True}) + "\n")
    for request in _lines(requests):
        pid = _fork(backend, request, keep, sigint)
        answers.write(json.dumps({"pid": pid}) + "\n")
        rc = _wait(pid, requests)
        if rc is None:
            return 0
        answers.write(json.dumps({"returncode": rc}) + "\n")
    return 0


def serve(backend: str) -> int:
    """A worker's zygote (``python -m shared.sweep_zygote BACKEND``): requests on standard
    input, answers on standard output."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                       # what imports print goes to stderr, not into the answers
    sigint = _prelude(backend)
    # the child's fd 0 goes to /dev/null over the requests
    return _serve_requests(backend, 0, answers, (answers.fileno(),), sigint)


def _connection(backend: str, conn, listener, zygote: int, sigint) -> int:
    """In a fork of a machine's zygote: serve one worker's connection as a worker's own zygote
    serves its standard input (its end of file, the worker gone, kills the child running)."""
    _die_with_parent(zygote)
    listener.close()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    fd = conn.fileno()
    answers = os.fdopen(os.dup(fd), "w", buffering=1)
    return _serve_requests(backend, fd, answers, (fd, answers.fileno()), sigint)


def serve_socket(backend: str, listen_fd: int) -> int:
    """A machine's zygote (``python -m shared.sweep_zygote BACKEND --listen-fd FD``): imports
    once, then forks one connection server (``_connection``) per worker that connects to the
    listening Unix socket ``listen_fd``; ends at end of file on its standard input (the driver
    that started it closed it, or died), its connection servers and their children with it
    (``PR_SET_PDEATHSIG``), once each connection has closed."""
    import socket  # noqa: PLC0415

    os.dup2(2, 1)
    listener = socket.socket(fileno=listen_fd)
    sigint = _prelude(backend)
    me = os.getpid()
    while True:
        ready, _, _ = select.select([0, listener], [], [], 1.0)       # each second: reap the servers that ended
        if 0 in ready and not os.read(0, 1 << 16):
            listener.close()
            with contextlib.suppress(ChildProcessError):    # each ends when its worker has closed its connection
                while True:
                    os.waitpid(-1, 0)
            return 0
        if listener in ready:
            conn, _ = listener.accept()
            if os.fork() == 0:
                code = 1
                try:
                    code = _connection(backend, conn, listener, me, sigint)
                finally:
                    os._exit(code)
            conn.close()
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:        # reap the connection servers that ended
                pass


# ---------------------------------------------------------------------------------- the handles

class ZygoteLost(RuntimeError):
    """The zygote process ended (its exit status in ``returncode``; None: a machine's zygote,
    whose connection closed)."""

    def __init__(self, returncode):
        how = f"killed by {signal.Signals(-returncode).name}" if returncode and returncode < 0 else \
            f"exit status {returncode}" if returncode is not None else "its connection closed"
        super().__init__(f"the worker's zygote process ended ({how})")
        self.returncode = returncode


class Zygote:
    """A worker's handle of one zygote of ``backend``: its own process, started in ``cwd`` with
    ``env`` (the environment a run's subprocess would get), or (``Zygote.connect``) a
    connection to the machine's zygote, whose connection server is then the worker's zygote."""

    def __init__(self, backend: str, cwd, env: dict):
        self.backend, self.ready, self.sock = backend, False, None
        self.proc = subprocess.Popen([sys.executable, "-m", "shared.sweep_zygote", backend], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self._in, self._out = self.proc.stdin, self.proc.stdout

    @classmethod
    def connect(cls, backend: str, address: str) -> "Zygote":
        """A handle connected to the machine's zygote listening at ``address`` (OSError when
        nothing listens there)."""
        import socket  # noqa: PLC0415

        z = cls.__new__(cls)
        z.backend, z.ready, z.proc = backend, False, None
        z.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            z.sock.connect(address)
        except OSError:
            z.sock.close()
            raise
        z._in, z._out = z.sock.makefile("wb"), z.sock.makefile("rb")
        return z

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        import socket  # noqa: PLC0415

        try:            # between attempts nothing is sent to us: readable means closed
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _answer(self) -> dict:
        line = self._out.readline()
        if not line:
            raise ZygoteLost(self.proc.wait() if self.proc is not None else None)
        return json.loads(line)

    def wait_ready(self) -> None:
        """Block until the zygote has imported its modules; ZygoteLost if it could not."""
        if not self.ready:
            self._answer()
            self.ready = True

    def run(self, argv: list, log, cwd, env: dict | None = None) -> int:
        """Run ``BACKEND.__main__.main(argv)`` in a forked child, its output appended to ``log``,
        in folder ``cwd``, with environment ``env`` (None: the zygote's); its return code
        (negative: the signal that killed it). ZygoteLost when the zygote ended before the
        child's end was reported."""
        self.wait_ready()
        request = {"argv": list(argv), "log": str(log), "cwd": str(cwd), "env": env}
        try:
            self._in.write((json.dumps(request) + "\n").encode())
            self._in.flush()
        except (BrokenPipeError, ConnectionError):
            raise ZygoteLost(self.proc.wait() if self.proc is not None else None) from None
        self._answer()                  # {"pid"}
        return int(self._answer()["returncode"])

    def close(self) -> None:
        """End the zygote, or the connection (end of file on its input: a child still running
        is killed)."""
        for f in (self._in, self._out):
            with contextlib.suppress(OSError):
                f.close()
        if self.proc is None:
            self.sock.close()
            return
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def machine_zygotes(backends, cwd, env: dict):
    """The machine's zygotes, one per backend, for the workers of an embedded cluster: each a
    process (started in ``cwd`` with ``env``, the environment a worker's run gets less its
    compile folder) that imports the backend once and forks a connection server per worker
    that connects (``serve_socket``). Yields ``{backend: address}`` (Linux abstract Unix
    sockets) of those that started; ends them at the end, and dies with this process."""
    import socket  # noqa: PLC0415

    procs, addresses = [], {}
    try:
        for backend in backends:
            address = f"\0hpo-sweep-zygote-{os.getpid()}-{backend}-{os.urandom(6).hex()}"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                try:
                    listener.bind(address)
                    listener.listen(64)
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "shared.sweep_zygote", backend, "--listen-fd", str(listener.fileno())],
                        cwd=cwd, env=env, stdin=subprocess.PIPE, pass_fds=(listener.fileno(),),
                        preexec_fn=die_with_parent))
                except OSError:
                    continue
            addresses[backend] = address
        yield addresses
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    status = serve_socket(sys.argv[1], int(sys.argv[3])) if sys.argv[2:3] == ["--listen-fd"] else serve(sys.argv[1])
    sys.stderr.flush()
    os._exit(status)            # nothing of the zygote's own needs finalizing: skip the interpreter's teardown
