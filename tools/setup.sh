#!/usr/bin/env bash
# Create .venv (or refresh it) with the project and the pinned versions of tools/constraints.txt.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
# torch first and on its own: pip then takes the local 2.14.1 files instead of resolving a CUDA build.
.venv/bin/pip install --quiet -c tools/constraints.txt torch torchvision
.venv/bin/pip install --quiet -c tools/constraints.txt -e '.[dev]'
echo "residual installed in $(pwd)/.venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
