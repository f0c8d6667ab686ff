"""Recipe YAML files (configs/*.yaml): the `moe:` section that `pesc convert --config` reads.

A recipe holds several top-level sections (the MoE settings under `moe:`, training
settings under their own keys). Each command reads only its own section and ignores the
others; inside its section an unknown key is an error that names it, so a typo never
silently falls back to a default.
"""

from pathlib import Path

from pesc.errors import PescError

MOE_KEYS = ("num_experts", "top_k", "adapter_dim", "moe_scaling", "router_aux_loss_coef", "adapter_dropout", "seed")


def load_recipe(path: str | Path) -> dict:
    """The whole recipe as a mapping (clear errors for a missing file or bad YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PescError(f"recipe {path} does not exist: give the path of a YAML file such as configs/camelidae-8x7b.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        detail = " ".join(str(error).split())
        raise PescError(f"recipe {path} is not valid YAML ({detail}): fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PescError(f"recipe {path} must be a mapping of sections (moe:, ...), not a {type(data).__name__}")
    return data


def load_moe_settings(path: str | Path) -> dict:
    """The `moe:` section of a recipe, checked for unknown keys; other sections are ignored."""
    data = load_recipe(path)
    if "moe" not in data:
        raise PescError(f"recipe {path} has no `moe:` section: put num_experts, top_k, adapter_dim, ... under `moe:`")
    moe = data["moe"] or {}
    if not isinstance(moe, dict):
        raise PescError(f"recipe {path}: `moe:` must be a mapping of settings, not a {type(moe).__name__}")
    unknown = sorted(str(key) for key in moe if key not in MOE_KEYS)
    if unknown:
        raise PescError(
            f"recipe {path}: unknown key(s) in moe: {', '.join(unknown)} (known: {', '.join(MOE_KEYS)})"
        )
    return dict(moe)
