"""Files a training run writes beside peft's LoRA adapter, and that export, eval and routes read back (trained_run).

A training checkpoint folder (and a run's `final/` folder) holds:
- peft's `adapter_config.json` + `adapter_model.safetensors` (the LoRA on the dense linears);
- `experts.safetensors`: every tensor of the modules the method added (PESC: routers and expert
  adapters), trained in full, under its checkpoint name (`model.layers.N.mlp.moe_adapter....`,
  docs/model.md). Runs made before the method interface call it `pesc_experts.safetensors`: still read;
- `pesc_config.json`: the config (of the run's method) of the model that was trained.
The run folder itself also holds `pesc_train_config.yaml`, the resolved training config.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pesc.errors import PescError
from pesc.methods import method_for_model_type, method_of

EXPERTS_FILE = "experts.safetensors"
LEGACY_EXPERTS_FILE = "pesc_experts.safetensors"  # written by runs before the method interface
PESC_CONFIG_FILE = "pesc_config.json"
TRAIN_CONFIG_FILE = "pesc_train_config.yaml"
FINAL_DIR = "final"


def experts_path(directory: str | Path) -> Path | None:
    """The checkpoint's experts file (today's name, else the name older runs wrote), or None."""
    for name in (EXPERTS_FILE, LEGACY_EXPERTS_FILE):
        path = Path(directory) / name
        if path.is_file():
            return path
    return None


def expert_state_dict(model: torch.nn.Module, method) -> dict[str, torch.Tensor]:
    """The added tensors under their checkpoint names, whatever wraps the model (peft, DDP)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if method.is_added(name):
            state[method.checkpoint_name(name)] = tensor.detach().to("cpu").contiguous()
    if not state:
        raise PescError(f"the model has no {method.label} modules to save")
    return state


def save_trained_state(model: torch.nn.Module, config, directory: str | Path) -> None:
    """Write the experts file and the method's config into a checkpoint folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = expert_state_dict(model, method_of(config))
    save_file(state, directory / EXPERTS_FILE, metadata={"format": "pt"})
    (directory / PESC_CONFIG_FILE).write_text(config.to_json_string(use_diff=False))


def load_expert_state(directory: str | Path) -> dict[str, torch.Tensor]:
    path = experts_path(directory)
    if path is None:
        raise PescError(f"{directory} holds no {EXPERTS_FILE}: it is not a pesc training checkpoint")
    return load_file(path)


def load_trained_config(directory: str | Path):
    path = Path(directory) / PESC_CONFIG_FILE
    if not path.is_file():
        raise PescError(f"{directory} holds no {PESC_CONFIG_FILE}: it is not a pesc training checkpoint")
    raw = json.loads(path.read_text())
    method = method_for_model_type(raw.get("model_type"))
    if method is None:
        raise PescError(f"{path} names model_type {raw.get('model_type')!r}, which no registered method makes")
    return method.config_class.from_dict(raw)


def checkpoint_step(folder: Path) -> int | None:
    """N of a checkpoint-N folder (the step it was saved at); None for any other name."""
    number = folder.name.removeprefix("checkpoint-")
    return int(number) if number != folder.name and number.isdigit() else None


def numbered_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint-N folders, in step order."""
    steps = [(checkpoint_step(p), p) for p in Path(run_dir).glob("checkpoint-*")]
    return [p for _, p in sorted((step, p) for step, p in steps if step is not None)]


def is_training_run(path: str | Path) -> bool:
    """True for a folder `pesc train` wrote: it holds the resolved training config or a training checkpoint."""
    return (Path(path) / TRAIN_CONFIG_FILE).is_file() or latest_checkpoint(path) is not None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's final folder if training finished, else its highest-numbered checkpoint-N, else None."""
    run_dir = Path(run_dir)
    if experts_path(run_dir / FINAL_DIR) is not None:
        return run_dir / FINAL_DIR
    steps = [p for p in numbered_checkpoints(run_dir) if experts_path(p) is not None]
    return steps[-1] if steps else None
