#!/usr/bin/env bash
# Set up the venv, then run the demo; extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."

export VENV="${VENV:-.venv}"
bash scripts/setup.sh
exec "$VENV/bin/python" examples/generate.py "$@"
