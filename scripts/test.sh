#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite (slow cases excluded; add -m slow for them),
# one pytest-xdist worker per core (at most 4), each test file on one worker (its fixtures built once).
set -euo pipefail
cd "$(dirname "$0")/.."
# with the optional SLURM extra (dask-jobqueue), whose job script tests/test_sweep_cluster.py checks
HPO_EXTRAS=slurm bash scripts/setup.sh
# the OpenCL device the GPU-path tests run on (root + apt; otherwise those tests skip, saying why)
bash scripts/opencl_setup.sh
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile "$@"
