#!/usr/bin/env bash
# Create .venv (or $VENV) and install nnfit into it, with the test tools when called with "dev".
# torch is installed first as a CPU build where none is present, so that the open
# requirement torch>=2.4 in pyproject.toml does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${1:-}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip install -q --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
    || pip install -q --disable-pip-version-check "torch>=2.4"
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
pip install -q --disable-pip-version-check -e "$spec"
