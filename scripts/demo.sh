#!/usr/bin/env bash
# Set up the venv, then run the main job (`kvtool demo`); extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."

export VENV="${VENV:-.venv}"
bash scripts/setup.sh
exec "$VENV/bin/kvtool" demo "$@"
