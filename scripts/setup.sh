#!/usr/bin/env bash
# Create .venv with CPython 3.11 and install the package (editable) with its pinned dependencies.
# HPO_EXTRAS=slurm (scripts/test.sh sets it) adds optional extras from setup.cfg.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=""
for c in python3.11 python3; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
    PY=$c; break
  fi
done
if [ -z "$PY" ]; then
  echo "error: Python 3.11 is required (theano-pymc needs numpy<1.24, which has no wheels for newer Pythons); install python3.11 and retry" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".${HPO_EXTRAS:+[$HPO_EXTRAS]}"
