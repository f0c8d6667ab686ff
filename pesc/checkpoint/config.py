"""Reading a model folder's config: a method's (PESC, ...) or dense, with clear errors for everything else."""

import json
from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig

from pesc.errors import PescError, first_line
from pesc.methods import get_method, method_for_model_type


def read_config(path_or_id: str | Path, trust_remote_code: bool = False) -> PreTrainedConfig:
    """The config of a local model folder (only config.json is read), or of a Hub model id."""
    path = Path(path_or_id)
    if not path.exists():
        if str(path_or_id).startswith(("/", ".", "~")) or str(path_or_id).count("/") != 1:
            raise PescError(f"{path} does not exist: give the folder of a Hugging Face model")
        return _read_hub_config(str(path_or_id), trust_remote_code)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise PescError(f"{path} is not a model folder: it has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PescError(f"{config_file} is not valid JSON ({error}); the checkpoint looks damaged") from None
    if not isinstance(raw, dict):
        raise PescError(f"{config_file} is not a JSON object of settings; the checkpoint looks damaged")
    for key in _POSITIVE_SIZES:
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PescError(f"{config_file}: {key} must be a positive integer, got {value!r}")
    method = method_for_model_type(raw.get("model_type"))
    if method is None and "model_type" not in raw:
        raise PescError(f"{config_file} names no model_type, so its model family is unknown")
    try:
        return method.config_class.from_dict(raw) if method is not None else AutoConfig.for_model(**raw)
    except (ValueError, TypeError) as error:  # transformers' strict field checks raise TypeError subclasses
        raise PescError(f"{config_file}: {first_line(error)}") from None


# The sizes every decoder's config.json has: a bad one would fail deep inside a model build.
_POSITIVE_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _read_hub_config(repo_id: str, trust_remote_code: bool) -> PreTrainedConfig:
    try:
        config = AutoConfig.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise PescError(f"{repo_id} is neither a local folder nor a reachable Hub model ({first_line(error)})") from None
    method = method_for_model_type(config.model_type)
    return method.config_class.from_dict(config.to_dict()) if method is not None else config


def resolve_method_config(config: PreTrainedConfig, method_name: str | None = None, settings: dict | None = None,
                          where: str = "") -> PreTrainedConfig:
    """A method's config as-is, or a dense config turned into `method_name`'s with the planned settings."""
    method = method_for_model_type(config.model_type)
    if method is not None:
        if method_name is not None and method_name != method.name:
            raise PescError(f"the model is a {method.name} checkpoint, not {method_name}: drop --method or give "
                            "a dense model")
        return config
    method = get_method(method_name)
    values = method.resolve_settings({k: v for k, v in (settings or {}).items() if v is not None}, where)
    try:
        return method.config_from_dense(config, values)
    except ValueError as error:
        raise PescError(str(error)) from None
