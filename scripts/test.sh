#!/usr/bin/env bash
# The test command (README, CI): create .venv if needed, install the project with its dev
# extras, then lint, format-check, type-check and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k claim -x
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "==> installing queue_processor[dev]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

echo "==> ruff check"
.venv/bin/ruff check .
echo "==> ruff format --check"
.venv/bin/ruff format --check .
echo "==> mypy --strict queue_processor"
.venv/bin/mypy --strict queue_processor
echo "==> pytest"
.venv/bin/python -m pytest -W error "$@"
