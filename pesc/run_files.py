"""Files a training run writes beside peft's LoRA adapter, and that export reads back.

A training checkpoint folder (and a run's `final/` folder) holds:
- peft's `adapter_config.json` + `adapter_model.safetensors` (the LoRA on the dense linears);
- `pesc_experts.safetensors`: every router and expert adapter tensor, trained in full,
  under its checkpoint name (`model.layers.N.mlp.moe_adapter....`, DESIGN.md §4);
- `pesc_config.json`: the PescConfig of the model that was trained.
The run folder itself also holds `pesc_train_config.yaml`, the resolved training config.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pesc.errors import PescError
from pesc.modeling import PescConfig

EXPERTS_FILE = "pesc_experts.safetensors"
PESC_CONFIG_FILE = "pesc_config.json"
TRAIN_CONFIG_FILE = "pesc_train_config.yaml"
FINAL_DIR = "final"

_MOE_KEY = re.compile(r"(model\.layers\.\d+\.mlp\.moe_adapter\..*)$")


def expert_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Router and adapter tensors under their checkpoint names, whatever wraps the model (peft, DDP)."""
    state = {}
    for name, tensor in model.state_dict().items():
        match = _MOE_KEY.search(name.replace(".modules_to_save.default", "").replace(".original_module", ""))
        if match and ".lora_" not in name:
            state[match.group(1)] = tensor.detach().to("cpu").contiguous()
    if not state:
        raise PescError("the model has no PESC routers or adapters to save")
    return state


def save_trained_state(model: torch.nn.Module, config: PescConfig, directory: str | Path) -> None:
    """Write the experts file and the PESC config into a checkpoint folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(expert_state_dict(model), directory / EXPERTS_FILE, metadata={"format": "pt"})
    (directory / PESC_CONFIG_FILE).write_text(config.to_json_string(use_diff=False))


def load_expert_state(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / EXPERTS_FILE
    if not path.is_file():
        raise PescError(f"{directory} holds no {EXPERTS_FILE}: it is not a PESC training checkpoint")
    return load_file(path)


def load_trained_config(directory: str | Path) -> PescConfig:
    path = Path(directory) / PESC_CONFIG_FILE
    if not path.is_file():
        raise PescError(f"{directory} holds no {PESC_CONFIG_FILE}: it is not a PESC training checkpoint")
    return PescConfig.from_dict(json.loads(path.read_text()))


def numbered_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint-N folders, in step order."""
    folders = Path(run_dir).glob("checkpoint-*")
    steps = [(int(p.name.split("-")[1]), p) for p in folders if p.name.split("-")[1].isdigit()]
    return [p for _, p in sorted(steps)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's final folder if training finished, else its highest-numbered checkpoint-N, else None."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL_DIR / EXPERTS_FILE).is_file():
        return run_dir / FINAL_DIR
    steps = [p for p in numbered_checkpoints(run_dir) if (p / EXPERTS_FILE).is_file()]
    return steps[-1] if steps else None
