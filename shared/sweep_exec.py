"""Running a sweep's runs on Dask: an embedded LocalCluster, a scheduler's address, or SLURM.

Each attempt of a run is one Dask task, ``run_task``, which runs the backend's command
(``cpu_ver meta ... --out RUN_FOLDER``) in a process of its own on the worker, so that runs
are isolated from each other and from the worker, and a killed worker is a real fault: the
run's process dies with it. Two ways to start that process (``LAUNCHES``, the task's
``launch``):

- ``zygote`` (the default on Linux): a fork of a zygote, a long-lived process that has
  imported the backend's modules once (``shared/sweep_zygote.py``): on an embedded cluster
  the machine's, which the driver starts before the cluster and every worker connects to
  (a run still dies with its worker: its connection closes), elsewhere the worker's own;
  the worker holds its zygotes in a worker plugin (``shared/sweep_plugin.py``, given to
  the workers by ``cluster``);
- ``subprocess``: ``python -m BACKEND COMMAND ...`` started afresh for every attempt (and
  wherever fork is missing, or a zygote cannot start).

Both give the process the same environment, folder, command line and log, and the run the
same results, bit for bit. A run writes its own results durably (its folder's results.json,
written atomically by the command), so nothing completed lives only in a worker's memory.

``execute`` is the driver's loop: it hands runs to the cluster (as many as the cluster has
threads), records every change of state in ``manifest.json`` (``shared/sweep_manifest.py``),
and on a failure (non-zero exit, or a worker lost while running it; Dask's own silent
re-execution is switched off, ``allowed-failures`` 0, so every loss is counted) hands the
run out again, up to ``retries`` times; a command that checkpoints continues from its
checkpoint (``--resume``), another starts again with ``--overwrite``. Then the run is
``failed`` with the reason, and the sweep goes on.

Each worker gives its runs their own Theano compile folder, ``<root>/sweep-worker-<name>``
(root: ``$HPO_THEANO_CACHE`` or the default cache folder), so gpu_ver runs on one machine
never wait on each other's compile lock; the runs of one worker reuse its modules. Each
run gets one BLAS thread (unless the caller's environment sets one): a worker is one
thread.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared import sweep_zygote
from shared.errors import ConfigError
from shared.records import RESULTS_FILE, run_files

LOG_FILE = "sweep.log"              # the run's stdout and stderr, every attempt appended
LOCK_FILE = ".sweep-lock"           # held while an attempt runs: two attempts never share a folder
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
ENV_CACHE = "HPO_THEANO_CACHE"
NANNY_HASH_SEED = "6640"           # what a Dask nanny sets (distributed 2024.1 on) where PYTHONHASHSEED is unset or 0
LAUNCHES = ("zygote", "subprocess")     # how a worker starts an attempt's process (see the module's text)


def default_launch() -> str:
    """``zygote`` where attempts can be forked from one (Linux), else ``subprocess``."""
    return "zygote" if sweep_zygote.available() else "subprocess"


# ---------------------------------------------------------------------------------- worker side

@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (waits for an earlier attempt still running there)."""
    import fcntl  # noqa: PLC0415

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _theano_root(environ) -> str:
    """The compile-cache root a run's folder goes under: ``$HPO_THEANO_CACHE`` or the default
    (the same default gpu_ver/config.py uses)."""
    if environ.get(ENV_CACHE):
        return os.path.abspath(os.path.expanduser(environ[ENV_CACHE]))
    base = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hypergrad-hpo", "theano")


def run_env(environ, worker: str) -> dict:
    """The environment of a run on ``worker``: ``environ`` with its own Theano compile folder
    (``<root>/sweep-worker-<worker>``, see ``_theano_root``) and one BLAS thread where
    ``environ`` sets none."""
    env = dict(environ)
    root = _theano_root(environ)
    env[ENV_CACHE] = os.path.join(root, f"sweep-worker-{worker}")
    for var in THREAD_VARS:
        env.setdefault(var, "1")
    return env


def existing_folder(path):
    """``path`` when it names a folder that exists, else None (the process's own folder)."""
    return path if path and os.path.isdir(path) else None


def _file_word(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "worker"


def _this_worker():
    """The Dask worker running this task (None outside one)."""
    try:
        from distributed import get_worker  # noqa: PLC0415

        return get_worker()
    except (ImportError, ValueError):
        return None


def worker_name() -> str:
    """This Dask worker's name as a file-name word ('local' outside a worker)."""
    worker = _this_worker()
    return _file_word(worker.name) if worker is not None else "local"


def _plugin(worker):
    """The worker's ``shared.sweep_plugin.Zygotes`` (None: not registered, or outside a worker)."""
    from shared.sweep_plugin import PLUGIN_NAME  # noqa: PLC0415

    plugins = getattr(worker, "plugins", {}) if worker is not None else {}
    return plugins.get(PLUGIN_NAME)


def attempt_argv(task: dict) -> list:
    """The command line of the next attempt at ``task``: ``--resume FOLDER`` when the command
    checkpoints and its checkpoint is there, else ``--out FOLDER`` (with ``--overwrite`` when
    an earlier attempt left run files)."""
    folder = Path(task["folder"])
    argv = [sys.executable, "-m", task["backend"], task["command"], *task["argv"]]
    ckpt = task.get("checkpoint")
    if ckpt and (folder / ckpt).is_file():
        return argv + ["--resume", str(folder)]
    argv += ["--out", str(folder)]
    return argv + (["--overwrite"] if run_files(folder) else [])


def _reason(log: Path, offset: int, rc: int) -> str:
    """Why an attempt failed: its last ``error: ...`` line, else its last line, and the exit."""
    with open(log, "rb") as f:
        f.seek(offset)
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    last = errors[-1] if errors else (lines[-1][:300] if lines else "no output")
    return f"{how}: {last}"


def run_task(task: dict) -> dict:
    """Run one attempt of a sweep run on this worker (the Dask task).

    ``task``: ``backend``, ``command``, ``argv`` (the options), ``folder`` (absolute),
    ``checkpoint`` (the file ``--resume`` continues from, or None), ``cwd``, and ``launch``
    (``LAUNCHES``; default ``subprocess``). Returns ``returncode``, ``error`` (None when the
    run finished with its results.json), ``worker``, ``pid`` (this worker process),
    ``launch`` (how the attempt ran), ``zygote`` (``machine`` or ``worker``: whose zygote it
    was forked from; None for a subprocess) and ``seconds``.
    """
    folder = Path(task["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    worker = _this_worker()
    name = _file_word(worker.name) if worker is not None else "local"
    env = run_env(os.environ, name)
    zygotes = _plugin(worker) if task.get("launch") == "zygote" and sweep_zygote.available() else None
    cwd = existing_folder(task.get("cwd"))
    t0 = time.perf_counter()
    with _locked(folder / LOCK_FILE):
        argv = attempt_argv(task)
        log = folder / LOG_FILE
        with open(log, "ab") as f:
            offset = f.tell()
            f.write(f"$ {' '.join(argv)}\n".encode())
            f.flush()
            rc, zygote = zygotes.run(task["backend"], argv[3:], log, cwd, env) if zygotes is not None else (None, None)
            launch = "zygote" if rc is not None else "subprocess"
            if rc is None:
                rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     cwd=cwd, preexec_fn=sweep_zygote.die_with_parent if sys.platform.startswith("linux") else None)
    error = None
    if rc != 0:
        error = _reason(log, offset, rc)
    elif not (folder / RESULTS_FILE).is_file():
        error = f"exit status 0 but no {RESULTS_FILE} in {folder}"
    return {"returncode": rc, "error": error, "worker": name, "pid": os.getpid(), "launch": launch,
            "zygote": zygote, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------- clusters

SLURM_KEYS = {"queue": str, "jobs": int, "walltime": str, "cores": int, "memory": str, "account": str,
              "python": str}


def parse_slurm(text: str) -> dict:
    """``queue=gpu,jobs=4,walltime=02:00:00[,cores=1,memory=8GB,account=...,python=...]``;
    ConfigError naming the setting that is unknown, repeated or malformed. ``jobs`` (the
    number of SLURM jobs, one single-threaded worker each) is required."""
    out = {}
    for item in (s.strip() for s in str(text).split(",") if s.strip()):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise ConfigError(f"--slurm: {item!r} is not key=value (e.g. queue=gpu,jobs=4,walltime=02:00:00)")
        if key not in SLURM_KEYS:
            raise ConfigError(f"--slurm: unknown setting {key!r}; choose from {', '.join(SLURM_KEYS)}")
        if key in out:
            raise ConfigError(f"--slurm: {key} given twice")
        try:
            out[key] = SLURM_KEYS[key](value.strip())
        except ValueError:
            raise ConfigError(f"--slurm: {key}={value} is not {SLURM_KEYS[key].__name__}") from None
    if out.get("jobs", 0) < 1:
        raise ConfigError("--slurm needs jobs=N (N >= 1 SLURM jobs, one worker each)")
    if "walltime" in out and not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){1,2}|\d+", out["walltime"]):
        raise ConfigError(f"--slurm: walltime={out['walltime']} is not a SLURM time (e.g. 02:00:00 or 1-00:00:00)")
    return out


def slurm_cluster(settings: dict):
    """A dask-jobqueue SLURMCluster whose jobs are one single-threaded worker each (``cores``
    threads with ``cores=``; nothing is submitted until ``scale``). ConfigError when dask-jobqueue is not installed."""
    try:
        from dask_jobqueue import SLURMCluster  # noqa: PLC0415
    except ImportError:
        raise ConfigError("--slurm needs dask-jobqueue: pip install 'hypergrad-hpo[slurm]'") from None
    kw = {"queue": settings.get("queue"), "walltime": settings.get("walltime", "01:00:00"),
          "cores": settings.get("cores", 1), "processes": 1, "memory": settings.get("memory", "4GB"),
          "account": settings.get("account"), "python": settings.get("python", sys.executable)}
    return SLURMCluster(**{k: v for k, v in kw.items() if v is not None})


# The sweep's Dask settings: Dask's re-execution of a task whose worker died is off (every
# loss is a counted attempt, see ``execute``), and the clusters the sweep starts itself skip
# the bookkeeping that costs CPU while the runs compute and that a sweep never reads: the
# statistical profiler (a thread sampling every thread's stack every 10 ms while a task
# runs), the 20 ms event-loop tick, the system monitor's and the nanny's memory polls
# (100 ms; the sweep sets no memory limit), and work stealing (one task per thread).
SETTINGS = {"distributed.scheduler.allowed-failures": 0}
QUIET = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s",
         "distributed.admin.system-monitor.interval": "5s", "distributed.admin.system-monitor.disk": False,
         "distributed.worker.memory.monitor-interval": "5s", "distributed.scheduler.work-stealing": False}


@contextlib.contextmanager
def cluster(*, workers: int = 2, scheduler: str | None = None, slurm: dict | None = None, zygotes=None):
    """A connected ``distributed.Client`` for the sweep, closed (with an embedded cluster) at
    the end, its workers holding the zygotes of ``zygotes`` (``zygote_backends``: the backends
    and folder of the attempts that run in one; None: none does) in a worker plugin
    (``shared/sweep_plugin.py``) for the length of the sweep.

    An embedded cluster gets one zygote per backend for the machine
    (``sweep_zygote.machine_zygotes``), started before anything of Dask's distributed is
    imported, so that its imports overlap the cluster's start; each worker (built with the
    plugin) connects to it as soon as its process is up. Workers elsewhere (a scheduler's,
    SLURM's) get the plugin registered once the client connects, each starting zygotes of
    its own, and removed at the end (which ends their zygotes)."""
    with contextlib.ExitStack() as stack:
        machine, env = {}, None
        if zygotes is not None and not scheduler and not slurm and sweep_zygote.available():
            env = run_env(nanny_environ(os.environ), "machine")
            backends, cwd = zygotes
            machine = stack.enter_context(sweep_zygote.machine_zygotes(backends, existing_folder(cwd), env))
        import logging  # noqa: PLC0415

        import dask  # noqa: PLC0415
        from distributed import Client, LocalCluster  # noqa: PLC0415

        plugin = None
        if zygotes is not None:
            from shared.sweep_plugin import Zygotes  # noqa: PLC0415

            plugin = Zygotes(*zygotes).sharing(machine, env) if machine else Zygotes(*zygotes)
        stack.enter_context(dask.config.set({**SETTINGS, **({} if scheduler else QUIET)}))
        if scheduler:
            try:
                client = Client(scheduler, timeout="10s")
            except (OSError, TimeoutError) as e:
                raise ConfigError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        elif slurm:
            made = stack.enter_context(slurm_cluster(slurm))
            made.scale(jobs=slurm["jobs"])
            client = Client(made)
        else:
            made = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.CRITICAL, plugins=(plugin,) if plugin is not None else ()))
            client = Client(made)
        stack.enter_context(client)
        stack.enter_context(_registered(client, plugin if scheduler or slurm else None))
        yield client


def nanny_environ(environ) -> dict:
    """The environment a Dask nanny on this machine gives the worker it starts: ``environ``
    with ``distributed.nanny.pre-spawn-environ`` and ``distributed.nanny.environ`` (where
    ``environ`` does not set them) and the nanny's fixed ``PYTHONHASHSEED`` where none is
    set; a worker's zygote inherits it, and the machine's zygote is started with it. Read
    without importing ``distributed`` (its defaults from its ``distributed.yaml``, merged
    under dask's configuration), so that the machine's zygote starts first; where this
    differs from what a worker really gets, the workers start zygotes of their own
    (``shared/sweep_plugin.py`` compares the two)."""
    import importlib.util  # noqa: PLC0415

    import dask  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    found = importlib.util.find_spec("distributed")
    defaults = {}
    if found is not None and found.origin:
        with contextlib.suppress(OSError, yaml.YAMLError):
            defaults = yaml.safe_load((Path(found.origin).parent / "distributed.yaml").read_text())
    nanny = ((defaults or {}).get("distributed") or {}).get("nanny") or {}
    out = dict(environ)
    for key in ("pre-spawn-environ", "environ"):
        cfg = {**(nanny.get(key) or {}), **(dask.config.get(f"distributed.nanny.{key}", default=None) or {})}
        cfg = {k: environ.get(k, str(v)) for k, v in cfg.items() if v is not None}
        if key == "pre-spawn-environ" and cfg.get("PYTHONHASHSEED") in (None, "0"):
            cfg["PYTHONHASHSEED"] = NANNY_HASH_SEED         # the nanny's, whatever ``environ`` says
        out.update(cfg)
    return out


def slots(client, floor: int = 1) -> int:
    """How many runs to have in the cluster at once: its worker threads (at least ``floor``)."""
    try:
        return max(floor, sum(client.nthreads().values()))
    except Exception:       # noqa: BLE001 (a scheduler that went away: the next wait says so)
        return floor


# ---------------------------------------------------------------------------------- the driver

def zygote_backends(tasks: dict):
    """``(backends, cwd)`` of the ``tasks`` (run id -> ``run_task``'s argument) that run in a
    zygote, the argument ``cluster`` takes; None when none does."""
    backends = sorted({t["backend"] for t in tasks.values() if t.get("launch") == "zygote"})
    if not backends:
        return None
    return backends, next((t.get("cwd") for t in tasks.values() if t.get("launch") == "zygote"), None)


@contextlib.contextmanager
def _registered(client, plugin):
    """``plugin`` registered on the cluster's workers (present and future), removed at the end."""
    if plugin is None:
        yield
        return
    client.register_plugin(plugin, name=plugin.name)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):     # a cluster already gone has nothing left to end
            client.unregister_worker_plugin(plugin.name)


def execute(client, folder: Path, manifest: dict, tasks: dict, *, retries: int, save, progress=True,
            floor: int = 1) -> dict:
    """Run every run of ``manifest`` that is not done; return the manifest.

    ``tasks``: run id -> ``run_task``'s argument. ``save(manifest)`` writes the manifest
    (called after every change of state). A failed attempt is retried while the run has had
    at most ``retries`` retries; then the run is ``failed`` with the reason. Ctrl-C (a
    KeyboardInterrupt here; with ``shared.interrupt.deferred`` around the call, SIGINT and
    SIGTERM are seen within two seconds) returns the runs in flight to ``pending`` and re-raises.
    """
    from distributed import wait  # noqa: PLC0415

    from shared import interrupt  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    runs = manifest["runs"]
    todo = [rid for rid, e in runs.items() if e["state"] != "done"]
    queue, flight = list(todo), {}
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"sweep {manifest['spec']}", unit="run",
               disable=not progress, file=sys.stderr)

    def submit():
        while queue and len(flight) < slots(client, floor):
            rid = queue.pop(0)
            e = runs[rid]
            e.update(state="running", attempts=e["attempts"] + 1)
            fut = client.submit(run_task, tasks[rid], key=f"run-{rid}-{e['attempts']}", pure=False, retries=0)
            flight[fut] = rid
        save(manifest)

    try:
        submit()
        while flight:
            interrupt.check()
            try:
                done, _ = wait(list(flight), timeout=2, return_when="FIRST_COMPLETED")
            except TimeoutError:
                continue
            for fut in done:
                rid = flight.pop(fut)
                e = runs[rid]
                try:
                    out = fut.result()
                except Exception as exc:        # noqa: BLE001 (KilledWorker, a lost connection, ...)
                    out = {"error": f"worker lost while running it ({type(exc).__name__}: {exc})"[:500]}
                e.update(worker=out.get("worker", e["worker"]), seconds=out.get("seconds"), error=out["error"],
                         launch=out.get("launch", e.get("launch")), zygote=out.get("zygote", e.get("zygote")))
                if out["error"] is None:
                    e["state"] = "done"
                    bar.update(1)
                elif e["attempts"] <= retries:
                    e["state"] = "pending"
                    queue.insert(0, rid)
                else:
                    e["state"] = "failed"
                    bar.update(1)
                    tqdm.write(f"failed: {e['folder']}: {e['error']}", file=sys.stderr)
                bar.set_postfix(failed=sum(x["state"] == "failed" for x in runs.values()))
            submit()
    except KeyboardInterrupt:
        for fut, rid in flight.items():
            fut.cancel()
            runs[rid].update(state="pending", error="interrupted: the sweep's driver stopped")
        save(manifest)
        raise
    finally:
        bar.close()
    return manifest
