"""YAML files (configs/*.yaml): the `method:` key and `moe:` section that `pesc convert --config` reads.

One file holds several top-level sections (the method's settings under `moe:`, training
settings under their own keys). Each command reads only its own section and ignores the
others; inside its section an unknown key is an error that names it, so a typo never
silently falls back to a default.
"""

from pathlib import Path

from pesc.errors import PescError


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


def load_moe_settings(path: str | Path, method_name: str | None = None) -> dict:
    """The `moe:` section, checked against the settings of `method_name` (a --method flag), else of the file's
    `method:`, else of pesc; other sections are ignored."""
    from pesc.methods import get_method

    data = load_recipe(path)
    if "moe" not in data:
        raise PescError(f"recipe {path} has no `moe:` section: put num_experts, top_k, adapter_dim, ... under `moe:`")
    moe = data["moe"] or {}
    if not isinstance(moe, dict):
        raise PescError(f"recipe {path}: `moe:` must be a mapping of settings, not a {type(moe).__name__}")
    file_method = data.get("method")
    if file_method is not None and not isinstance(file_method, str):
        raise PescError(f"recipe {path}: `method:` must be a method name such as pesc, not {file_method!r}")
    method = get_method(method_name or file_method)
    known = [s.name for s in method.all_settings()]
    unknown = sorted(str(key) for key in moe if key not in known)
    if unknown:
        raise PescError(
            f"recipe {path}: unknown key(s) in moe: {', '.join(unknown)} (known: {', '.join(known)})"
        )
    return dict(moe)
