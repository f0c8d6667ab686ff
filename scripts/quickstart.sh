#!/usr/bin/env bash
# The whole pesc pipeline on a built-in tiny model, no downloads, a few minutes on 2 CPU cores:
# tiny dense model -> convert -> QLoRA train -> export -> reload with plain transformers -> generate.
# Usage: bash scripts/quickstart.sh [WORK_DIR]   (default runs/quickstart; must not exist yet)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/quickstart}
if [ -e "$WORK" ]; then
  echo "Error: $WORK already exists: remove it, or pass another folder: bash scripts/quickstart.sh runs/other" >&2
  exit 1
fi
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. a tiny dense Llama (random weights, ChatML tokenizer): $WORK/dense"
pesc tiny-model "$WORK/dense"

step "2. convert it to PESC (4 experts, top-2, adapter_dim 16): $WORK/pesc"
pesc convert "$WORK/dense" "$WORK/pesc" --config configs/tiny.yaml

step "3. at init the PESC model computes exactly the dense model"
pesc compare "$WORK/dense" "$WORK/pesc" --atol 1e-5

step "4. QLoRA instruction tuning (4-bit base, LoRA + full experts) on data/tiny_instruct.jsonl: $WORK/run"
pesc train configs/tiny.yaml --set base_model="$WORK/pesc" --set output_dir="$WORK/run"

step "5. export a sparse Hugging Face checkpoint: $WORK/export"
pesc export "$WORK/run" "$WORK/export"
pesc inspect "$WORK/export"

step "6. reload it with plain transformers, in a process where pesc cannot be imported"
python - "$WORK/export" <<'PY'
import sys
from pesc.testing.isolated import run_without_pesc
result = run_without_pesc(f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({sys.argv[1]!r}, trust_remote_code=True)
emit({{"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters())}})
""")
print(f"loaded {result['class']} with {result['params']:,} parameters, without pesc")
PY

step "7. generate (a tiny model trained for a minute: expect little sense)"
pesc generate "$WORK/export" --prompt "What is 2 + 3?" --max-new-tokens 24
echo
step "done: see $WORK/{dense,pesc,run,export}"
