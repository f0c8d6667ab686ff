"""A "trained" run folder made without the trainer, for export / push / generate tests.

Tiny dense model -> upcycled in memory -> peft LoRA with random (non-zero) lora_B on the
dense linears, routers and adapter_up perturbed -> saved exactly as the trainer saves a
checkpoint (`PeftModel.save_pretrained` + `pesc.checkpoint.run_files.save_trained_state`), plus a
`pesc_train_config.yaml` and a `trainer_state.json` for the model card.
"""

import json
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fake_trained_model(
    dense_dir: str | Path, *, num_experts: int = 4, top_k: int = 2, adapter_dim: int = 16, seed: int = 0
):
    """The in-memory "trained" peft model (float32, LoRA unmerged); the same arguments give the same model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import pesc
    from pesc.methods import get_method

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    model = pesc.upcycle(dense, num_experts=num_experts, top_k=top_k, adapter_dim=adapter_dim, seed=seed)
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if get_method("pesc").is_added(name):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
            elif "lora_B" in name:
                param.mul_(0.5)
    return peft_model


def save_fake_trained_run(
    run_dir: str | Path,
    dense_dir: str | Path,
    *,
    num_experts: int = 4,
    top_k: int = 2,
    adapter_dim: int = 16,
    step: int = 2,
    seed: int = 0,
    final: bool = False,
) -> Path:
    """Write `run_dir/checkpoint-{step}` (or `run_dir/final`) of `fake_trained_model`; returns the checkpoint folder."""
    from pesc.checkpoint.run_files import TRAIN_CONFIG_FILE, save_trained_state

    run_dir = Path(run_dir)
    peft_model = fake_trained_model(dense_dir, num_experts=num_experts, top_k=top_k, adapter_dim=adapter_dim, seed=seed)
    checkpoint = run_dir / ("final" if final else f"checkpoint-{step}")
    peft_model.save_pretrained(checkpoint)
    save_trained_state(peft_model, peft_model.get_base_model().config, checkpoint)
    (run_dir / TRAIN_CONFIG_FILE).write_text(
        f"base_model: {dense_dir}\n"
        "moe:\n"
        f"  num_experts: {num_experts}\n  top_k: {top_k}\n  adapter_dim: {adapter_dim}\n"
        "datasets:\n"
        "  - path: pesc:tiny_instruct.jsonl\n    type: messages\n"
        "  - path: tatsu-lab/alpaca\n    type: alpaca\n"
        f"output_dir: {run_dir}\n"
    )
    state = {
        "global_step": step,
        "epoch": 0.5,
        "log_history": [
            {"step": 1, "loss": 5.25, "learning_rate": 0.003},
            {"step": step, "loss": 4.5, "learning_rate": 0.003},
            {"step": step, "eval_loss": 4.75},
        ],
    }
    (checkpoint / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return checkpoint
