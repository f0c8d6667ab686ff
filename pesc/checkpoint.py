"""Reading a model folder's config: PESC or dense, with clear errors for everything else."""

import json
from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig

from pesc.errors import PescError
from pesc.modeling import PescConfig
from pesc.upcycling import pesc_config_from_dense


def read_config(path: str | Path) -> PreTrainedConfig:
    """The config of a local model folder (only config.json is read)."""
    path = Path(path)
    if not path.exists():
        raise PescError(f"{path} does not exist: give the folder of a Hugging Face model")
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise PescError(f"{path} is not a model folder: it has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PescError(f"{config_file} is not valid JSON ({error}); the checkpoint looks damaged") from None
    if raw.get("model_type") == PescConfig.model_type:
        return PescConfig.from_dict(raw)
    if "model_type" not in raw:
        raise PescError(f"{config_file} names no model_type, so its model family is unknown")
    try:
        return AutoConfig.for_model(**raw)
    except ValueError as error:
        raise PescError(f"{config_file}: {error}") from None


def resolve_pesc_config(config: PreTrainedConfig, **settings) -> PescConfig:
    """A PESC config as-is, or a dense config turned into one with the planned MoE settings."""
    if isinstance(config, PescConfig):
        return config
    try:
        return pesc_config_from_dense(config, **{k: v for k, v in settings.items() if v is not None})
    except ValueError as error:
        raise PescError(str(error)) from None
