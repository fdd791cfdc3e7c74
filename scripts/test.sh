#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite (slow cases excluded; add -m slow for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
