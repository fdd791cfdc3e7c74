"""Test-session settings that must be in place before a test module imports Theano or numpy.

Under pytest-xdist (``scripts/test.sh`` runs ``-n auto --dist loadfile``) each worker gets

- its own Theano compile directory, ``<cache>/pytest-<worker>``: Theano holds one
  file lock on a compile directory while gcc builds a module, so workers sharing one
  would compile one module at a time (gcc is most of a cold suite's time);
- one BLAS thread (unless the caller chose): two workers on two cores, each with a
  spinning two-thread OpenBLAS, would oversubscribe the machine.

A run without workers is left as it is (the user's cache, the user's BLAS threads).
"""
from __future__ import annotations

import os

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:   # before anything imports numpy (OpenBLAS reads its thread count when loaded)
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

from gpu_ver import config  # noqa: E402 (after the thread settings)

if _WORKER:
    os.environ[config.ENV_CACHE] = os.path.join(config.default_cache_dir(), f"pytest-{_WORKER}")
