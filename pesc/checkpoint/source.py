"""Where a source model comes from: a local folder, a folder inside the Hugging Face cache, or a Hub id
downloaded on the spot; and what can be known of it before torch and transformers are imported."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pesc.atomic import check_output_dir
from pesc.checkpoint.headers import SourceFile, find_weight_files
from pesc.errors import PescError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_source(src: str) -> tuple[Path, str | None]:
    """A local model folder for SRC, and the Hub id it came from (None for a local folder)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PescError(f"{src} is neither a model folder nor a GGUF file: give the folder that holds config.json")
        return path, _hub_id_from_cache_path(path)
    if _HUB_ID.fullmatch(src) and not src.startswith((".", "~")):
        return _download(src), src
    raise PescError(f"{src} does not exist: give a local model folder or a Hugging Face Hub model id")


def _hub_id_from_cache_path(path: Path) -> str | None:
    """`org/name` for a folder inside the Hugging Face cache (models--org--name/snapshots/<rev>)."""
    for part in path.resolve().parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return None


def _download(repo_id: str) -> Path:
    """A Hub snapshot: config, tokenizer and safetensors (pickle .bin only when there is no safetensors)."""
    common = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "LICENSE*", "USE_POLICY*"]
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=[*common, "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=[*common, "*.bin"]))
    except Exception as error:  # noqa: BLE001 - offline, network, auth, not found: all one user message
        detail = " ".join(str(error).split())[:160] or type(error).__name__
        raise PescError(
            f"{repo_id} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {detail}): download it first (hf download {repo_id}) or pass a local folder"
        ) from None
    return folder



@dataclass
class EarlySources:
    """The source folder and, where the cheap checks vouch for them, its weight files."""

    folder: Path
    hub_id: str | None
    files: list[SourceFile] | None  # None: leave reading them (and their errors) to the plan


def early_sources(src: str, out: Path, force: bool) -> EarlySources:
    """Resolve SRC, check OUT and read the weight headers, all in plain Python (no torch).

    The base shards can then start copying while the plan's checks import torch and
    transformers (seconds). Anything unusual (no or unreadable config.json, an already
    PESC config, a header error) yields `files=None`, so that the plan reports it
    exactly as it would have.
    """
    folder, hub_id = resolve_source(src)
    check_output_dir(out, force, (folder,))
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return EarlySources(folder, hub_id, None)
    if model_type is None or str(model_type).split("_")[0] == "pesc":  # methods' model_types: pesc, pesc_<m>
        return EarlySources(folder, hub_id, None)
    try:
        files = find_weight_files(folder)
    except PescError:
        return EarlySources(folder, hub_id, None)
    return EarlySources(folder, hub_id, files)

