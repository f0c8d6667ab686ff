"""QLoRA instruction tuning of PESC models (`pesc train`): config, model, Trainer, run."""

from pesc.training.config import load_config, validate
from pesc.training.run import train

__all__ = ["load_config", "train", "validate"]
