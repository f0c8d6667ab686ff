"""`pesc push`: publish a model folder (exported or converted) to the Hugging Face Hub.

`create_repo(exist_ok=True)` then one `upload_folder` commit of the whole folder, minus
pesc's own marker files (`.pesc-export`, `.pesc-convert`). The `HfApi` is made by a
factory argument, so tests pass a fake and nothing reaches the network.
"""

import fnmatch
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pesc.atomic import MARKER_PREFIX
from pesc.errors import PescError, first_line

IGNORE_PATTERNS = [f"{MARKER_PREFIX}*", ".git/*", ".cache/*"]
# File names that usually hold credentials: left out of an upload unless named with --include-file. Hugging
# Face's own tokenizer files contain "token" and are model files.
SECRET_LOOKING = (".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "id_*", ".netrc", ".pypirc", ".npmrc",
                  ".git-credentials", "*credential*", "*secret*", "*token*", "*password*")
MODEL_FILES_NAMED_TOKEN = ("tokenizer*", "special_tokens_map.json", "added_tokens.json")
_LOGIN_HINT = "log in with `hf auth login`, set HF_TOKEN, or pass --token"


@dataclass(frozen=True)
class UploadPlan:
    folder: Path
    files: list[tuple[str, int]]  # (path relative to the folder, bytes), sorted by path
    card: str
    left_out: list[str]  # files that look like secrets, not uploaded

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def _ignored(relative: str) -> bool:
    first = relative.split("/", 1)[0]
    return first.startswith(MARKER_PREFIX) or first in (".git", ".cache")


def looks_secret(relative: str) -> bool:
    """A file whose name says it may hold a credential (.env, a key, a token file)."""
    name = relative.rsplit("/", 1)[-1].lower()
    if any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES_NAMED_TOKEN):
        return False
    return any(fnmatch.fnmatch(name, pattern) for pattern in SECRET_LOOKING)


def plan_upload(folder: str | Path, include: tuple[str, ...] = ()) -> UploadPlan:
    """Check that `folder` is a publishable model folder and list exactly the files an upload sends; files that
    look like secrets are left out unless `include` names them."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    if not folder.is_dir():
        raise PescError(f"{folder} is not a folder: give the model folder written by pesc export or pesc convert")
    if not (folder / "config.json").is_file():
        raise PescError(f"{folder} has no config.json: it is not a model folder (run pesc export first)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as error:
            raise PescError(f"{index} is not a valid weight index ({error})") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise PescError(f"{folder} is incomplete: the index names {missing[0]}, which is not there")
    elif not (folder / "model.safetensors").is_file():
        raise PescError(f"{folder} has no safetensors weights (model.safetensors or an index with shards)")
    readme = folder / "README.md"
    if not readme.is_file():
        raise PescError(f"{folder} has no README.md model card: export with pesc export, which writes one")
    try:
        card = ModelCard.load(readme, ignore_metadata_errors=False)
    except Exception as error:  # noqa: BLE001 - any parse failure of the card is a user-facing problem
        raise PescError(f"{readme} is not a valid model card ({first_line(error)})") from None
    from pesc.checkpoint.weights import check_model_weights

    check_model_weights(folder)  # a truncated shard is named before anything is sent
    files = sorted(
        (path.relative_to(folder).as_posix(), path.stat().st_size)
        for path in folder.rglob("*")
        if path.is_file() and not _ignored(path.relative_to(folder).as_posix())
    )
    names = {name for name, _ in files}
    unknown = sorted(set(include) - names)
    if unknown:
        raise PescError(f"--include-file {unknown[0]} is not a file of {folder} (give its path relative to the folder)")
    left_out = [name for name, _ in files if looks_secret(name) and name not in include]
    files = [(name, size) for name, size in files if name not in left_out]
    return UploadPlan(folder=folder, files=files, card=str(card), left_out=left_out)


def check_repo_id(repo_id: str) -> None:
    """USER/NAME, and a name the Hub accepts (huggingface_hub's own rules: no `..`, no `.git` end, length...)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if (repo_id or "").count("/") != 1:
        raise PescError(f"--repo-id must look like USER/NAME, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PescError(f"--repo-id is not a valid Hub repository id ({first_line(error)})") from None


def resolve_token(token: str | None) -> str:
    """--token, else HF_TOKEN, else the huggingface_hub login cache; a one-line error if none."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PescError(f"no Hugging Face token found: {_LOGIN_HINT}")
    return found


def _default_api(token: str):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    include_files: tuple[str, ...] = (),
    api_factory: Callable[[str], object] | None = None,
    echo: Callable[[str], None] = print,
) -> UploadPlan:
    """Create the repo (if needed) and upload the folder in one commit; `dry_run` only prints the plan."""
    check_repo_id(repo_id)
    plan = plan_upload(folder, tuple(include_files))
    for name in plan.left_out:
        echo(f"left out {name}: its name looks like a secret (pass --include-file {name} to upload it)")
    target = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    if dry_run:
        echo(f"dry run: would create {'private ' if private else ''}model repo {target} if missing and upload "
             f"{len(plan.files)} files, {human_bytes(plan.total_bytes)}:")
        width = max(len(human_bytes(size)) for _, size in plan.files)
        for name, size in plan.files:
            echo(f"  {human_bytes(size):>{width}}  {name}")
        echo("model card (README.md):")
        echo(plan.card)
        return plan

    api = (api_factory or _default_api)(resolve_token(token))
    message = commit_message or f"Upload PESC model {plan.folder.resolve().name} with pesc"
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(plan.folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=message,
            ignore_patterns=IGNORE_PATTERNS + plan.left_out,
        )
    except PescError:
        raise
    except Exception as error:  # noqa: BLE001 - network/auth errors of the Hub become one line
        from huggingface_hub.errors import HfHubHTTPError

        if not isinstance(error, (HfHubHTTPError, OSError, ValueError)):
            raise
        first = first_line(error)
        raise PescError(f"push to {repo_id} failed: {first}") from None
    echo(f"pushed {len(plan.files)} files ({human_bytes(plan.total_bytes)}) to https://huggingface.co/{repo_id}")
    return plan
