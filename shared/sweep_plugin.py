"""The Dask worker plugin that holds a worker's zygotes (``shared/sweep_zygote.py``).

``shared.sweep_exec.cluster`` gives ``Zygotes`` to the workers when a sweep's attempts run in
zygotes. An embedded cluster's workers are built with it, holding the addresses of the
machine's zygotes (``Zygotes.sharing``): each worker connects to them as its process comes
up (its attempts then fork from the one import of the machine), or starts zygotes of its
own where its runs' environment differs from theirs or they are gone. On a scheduler's or
SLURM's workers it is registered once the client connects (every worker, and workers that
join later), each starting zygotes of its own, and removed at the end, which ends the
zygotes; a worker that closes or dies ends them too (or its connections). The plugin is
the only owner of a worker's zygotes: an attempt (``sweep_exec.run_task``) borrows one and
gives it back.
"""
from __future__ import annotations

import os
import threading

from distributed import WorkerPlugin

from shared import sweep_exec, sweep_zygote

PLUGIN_NAME = "hpo-sweep-zygotes"


class Zygotes(WorkerPlugin):
    """A Dask worker plugin: the worker's zygotes (``shared/sweep_zygote.py``), one per
    backend, folder and environment, each running one attempt at a time: connections to the
    machine's zygotes (``machine``: backend -> (address, the environment it was started
    with)) or processes of the worker's own; started when the plugin is set up (for
    ``backends``, in folder ``cwd``) or at a first attempt, ended when it is torn down (the
    sweep's end, or the worker's)."""

    name = PLUGIN_NAME

    def __init__(self, backends=(), cwd=None, machine=None):
        self.backends, self.cwd = tuple(backends), cwd
        self.machine = dict(machine or {})      # backend -> (address, env) of the machine's zygotes

    def sharing(self, addresses: dict, env: dict) -> "Zygotes":
        """This plugin with the machine's zygotes at ``addresses`` (backend -> address, started
        with ``env``: ``sweep_zygote.machine_zygotes``)."""
        return Zygotes(self.backends, self.cwd, {b: (a, dict(env)) for b, a in addresses.items()})

    def setup(self, worker):
        self._lock, self._idle, self._closed = threading.Lock(), [], False
        env = sweep_exec.run_env(os.environ, sweep_exec._file_word(worker.name))
        cwd = sweep_exec.existing_folder(self.cwd)
        for backend in self.backends:           # their imports overlap the cluster's start
            self._idle.append(((backend, cwd, _env_key(env)), self._start(backend, cwd, env)))

    def _start(self, backend, cwd, env):
        """The worker's zygote of ``backend``: a connection to the machine's, where there is one
        started in ``cwd`` with the same environment as this worker's runs (their compile folder
        aside: each request carries the run's), else a process of the worker's own."""
        address, machine_env = self.machine.get(backend, (None, None))
        if address is not None and cwd == sweep_exec.existing_folder(self.cwd) and \
                _import_env(machine_env) == _import_env(env):
            try:
                return sweep_zygote.Zygote.connect(backend, address)
            except OSError:
                pass
        return sweep_zygote.Zygote(backend, cwd, env)

    def teardown(self, worker):
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for _, z in idle:
            z.close()

    def _take(self, key):
        with self._lock:
            for i, (k, z) in enumerate(self._idle):
                if k == key and z.alive():
                    return self._idle.pop(i)[1]
        return None

    def _give_back(self, key, z):
        with self._lock:
            if not self._closed and z.alive():
                self._idle.append((key, z))
                return
        z.close()

    def run(self, backend: str, argv: list, log, cwd, env: dict):
        """``backend``'s ``main(argv)`` in a fork of a zygote (output appended to ``log``):
        ``(return code, "machine" or "worker")``, the zygote the machine's or the worker's own;
        ``(None, None)`` when no zygote could start (the caller then runs a subprocess).
        ``sweep_zygote.ZygoteLost`` when the zygote died during the attempt."""
        key = (backend, cwd, _env_key(env))
        first = self._take(key) or self._start(backend, cwd, env)
        z = _ready(first)
        if z is None and first.proc is None:        # the machine's is gone: the worker's own
            z = _ready(sweep_zygote.Zygote(backend, cwd, env))
        if z is None:
            return None, None
        try:
            rc = z.run(argv, log, cwd or os.getcwd(), env)
        except BaseException:
            z.close()
            raise
        self._give_back(key, z)
        return rc, "worker" if z.proc is not None else "machine"


def _ready(z):
    """``z`` once it has imported its modules; None (``z`` closed) when it ended first."""
    try:
        z.wait_ready()
    except sweep_zygote.ZygoteLost:
        z.close()
        return None
    return z


def _env_key(env: dict) -> tuple:
    return tuple(sorted(env.items()))


def _import_env(env: dict) -> dict:
    """What of a run's environment a zygote's imports may have read: all of it but the compile
    folder (each request sets the run's) and Dask's own markers (``__DASK_PARENT_PID``)."""
    return {k: v for k, v in env.items() if k != sweep_exec.ENV_CACHE and not k.startswith("__DASK_")}
