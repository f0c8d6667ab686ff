"""Whether loading a model folder may run Python code that the folder (or the Hub repo it points to) carries.

transformers runs a folder's own modules when config.json (or tokenizer_config.json) names them in `auto_map` and
`trust_remote_code=True` is passed. pesc never passes it on its own: a checkpoint of a pesc method loads through the
classes of the installed pesc, a model family transformers knows needs no code from the folder, and anything else
is refused in one line unless the user says `--trust-remote-code`, as transformers itself asks.
"""

import json
from pathlib import Path

from pesc.errors import PescError

TRUST_FLAG = "--trust-remote-code"
CODE_FILES = ("config.json", "tokenizer_config.json")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # unreadable files are the loaders' to report
    return data if isinstance(data, dict) else {}


def code_modules(folder: str | Path) -> list[str]:
    """The modules the folder's auto_map entries name (`modeling_x`, or `user/repo--modeling_x` on the Hub)."""
    modules = []
    for name in CODE_FILES:
        auto_map = _read_json(Path(folder) / name).get("auto_map") or {}
        if not isinstance(auto_map, dict):
            continue
        for reference in auto_map.values():
            for item in reference if isinstance(reference, list) else [reference]:
                if isinstance(item, str):
                    module = item.rsplit(".", 1)[0]
                    if module not in modules:
                        modules.append(module)
    return modules


def _family_transformers_ships(model_type) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def remote_code_allowed(folder: str | Path, trust_remote_code: bool = False) -> bool:
    """The `trust_remote_code` value to load `folder` with; a one-line refusal when it needs code not trusted.

    A pesc method's checkpoint always loads with pesc's installed classes (False), whatever the flag: pesc needs
    no code from the folder. A dense family transformers knows loads its own classes unless the user trusts
    the folder's code."""
    from pesc.methods import method_for_model_type

    model_type = _read_json(Path(folder) / "config.json").get("model_type")
    if method_for_model_type(model_type) is not None:
        return False
    if trust_remote_code:
        return True
    tokenizer_config = _read_json(Path(folder) / "tokenizer_config.json")
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    tokenizer_needs_code = bool(tokenizer_config.get("auto_map")) and not _known_tokenizer(tokenizer_class)
    modules = code_modules(folder)
    if modules and (not _family_transformers_ships(model_type) or tokenizer_needs_code):
        raise PescError(
            f"{folder} asks to run its own Python code ({', '.join(modules)}, named in auto_map): pesc runs a model "
            f"folder's code only with {TRUST_FLAG}; pass it if you trust where this folder came from"
        )
    return False


def _known_tokenizer(name) -> bool:
    """A tokenizer class transformers ships (then a tokenizer auto_map is not needed to load it)."""
    import transformers

    return isinstance(name, str) and (hasattr(transformers, name) or hasattr(transformers, name.removesuffix("Fast")))
