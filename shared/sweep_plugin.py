"""The Dask worker plugin that holds a worker's zygote processes (``shared/sweep_zygote.py``).

``shared.sweep_exec.cluster`` gives ``Zygotes`` to the workers when a sweep's attempts run in
zygotes: an embedded cluster's workers are built with it (each starts its zygotes as its
process comes up, before it registers with the scheduler, so the zygotes' imports overlap
the cluster's start); on a scheduler's or SLURM's workers it is registered once the client
connects (every worker, and workers that join later) and removed at the end, which ends the
zygotes; a worker that closes or dies ends them too. The plugin is the only
owner of the zygotes: an attempt (``sweep_exec.run_task``) borrows one and gives it back.
"""
from __future__ import annotations

import os
import threading

from distributed import WorkerPlugin

from shared import sweep_exec, sweep_zygote

PLUGIN_NAME = "hpo-sweep-zygotes"


class Zygotes(WorkerPlugin):
    """A Dask worker plugin: the worker's zygote processes (``shared/sweep_zygote.py``), one
    per backend, folder and environment, each running one attempt at a time; started when
    the plugin is set up (for ``backends``, in folder ``cwd``) or at a first attempt, ended
    when it is torn down (the sweep's end, or the worker's)."""

    name = PLUGIN_NAME

    def __init__(self, backends=(), cwd=None):
        self.backends, self.cwd = tuple(backends), cwd

    def setup(self, worker):
        self._lock, self._idle, self._closed = threading.Lock(), [], False
        env = sweep_exec.run_env(os.environ, sweep_exec._file_word(worker.name))
        cwd = self.cwd if self.cwd and os.path.isdir(self.cwd) else None
        for backend in self.backends:           # their imports overlap the cluster's start
            self._idle.append(((backend, cwd, _env_key(env)), sweep_zygote.Zygote(backend, cwd, env)))

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
        """``backend``'s ``main(argv)`` in a fork of a zygote (output appended to ``log``); its
        return code, or None when no zygote could start (the caller then runs a subprocess).
        ``sweep_zygote.ZygoteLost`` when the zygote died during the attempt."""
        key = (backend, cwd, _env_key(env))
        z = self._take(key) or sweep_zygote.Zygote(backend, cwd, env)
        try:
            z.wait_ready()
        except sweep_zygote.ZygoteLost:
            z.close()
            return None
        try:
            rc = z.run(argv, log, cwd or os.getcwd())
        except BaseException:
            z.close()
            raise
        self._give_back(key, z)
        return rc


def _env_key(env: dict) -> tuple:
    return tuple(sorted(env.items()))
