#!/usr/bin/env bash
# Create or refresh the project's virtual environment; safe to run any number of times.
#
#   bash scripts/setup.sh [EXTRA_REQUIREMENT...]     e.g. bash scripts/setup.sh "transformers==4.57.1"
#
# VENV (default .venv) names the environment. The installs are skipped while a stamp in the venv shows
# that pyproject.toml, this script and the extra requirements are unchanged since the last set-up.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
# The CPU build, which lies on local disk; a bare `torch` would pull the multi-GB CUDA build from PyPI.
# Installed first, so that the project's `torch>=2.4` is already satisfied and never replaced.
TORCH="torch==2.13.0+cpu"

stamp="$VENV/.kvpress-aqua-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $*"

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
if [[ -f "$stamp" && "$(<"$stamp")" == "$want" ]]; then
    exit 0
fi
echo "setting up $VENV${*:+ with $*}" >&2
rm -f "$stamp"
log="$VENV/setup.log"
pip_install() {
    # pip's output goes to the log, shown only when an install fails
    "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >>"$log" 2>&1 || {
        tail -n 40 "$log" >&2
        echo "setup failed: pip install $*" >&2
        return 1
    }
}
: >"$log"
pip_install "$TORCH"
pip_install -e ".[test]" "$@"
printf '%s\n' "$want" >"$stamp"
