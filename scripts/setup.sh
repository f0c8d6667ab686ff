#!/usr/bin/env bash
# Create .venv and install pesc with its test extras. CPU torch goes in first: a bare torch
# requirement would otherwise pull a multi-GB CUDA build on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.4,<3"
  else
    python -m pip install -q torch==2.13.0
  fi
fi
python -m pip install -q -e ".[test]"
echo "pesc is installed in .venv (activate it with: . .venv/bin/activate)"
