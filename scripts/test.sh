#!/usr/bin/env bash
# Set up the venv, lint, then run the tests; extra arguments go to pytest (e.g. -m "not slow", -k loading).
# The tests run even when the lint fails; either failure fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

export VENV="${VENV:-.venv}"
bash scripts/setup.sh

lint=0
"$VENV/bin/ruff" check . || lint=$?
status=0
"$VENV/bin/python" -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "pytest collected no tests" >&2
    exit 1
fi
if [[ $lint -ne 0 ]]; then
    echo "ruff check failed" >&2
    exit 1
fi
exit "$status"
