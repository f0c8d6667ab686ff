"""Unreadable weights as one line: every command reads the headers of the weight files it is about to load.

transformers and peft fail on a truncated or corrupt file deep inside a load, with safetensors'
`SafetensorError` (neither ValueError nor OSError) or torch's RuntimeError, after the slow part has run.
Reading the safetensors headers (and a torch file's zip directory) first takes milliseconds, and the error
is the one `pesc convert` gives: the file, what is wrong, and what to do.
"""

import zipfile
from pathlib import Path

from pesc.checkpoint.headers import find_weight_files, read_safetensors_header
from pesc.errors import PescError

# Files torch.save writes into a training checkpoint (optimizer, scheduler, RNG state, training arguments).
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def check_model_weights(path: str | Path) -> None:
    """A local model folder's weights (index, shards, headers) are complete; a Hub id is left to the download."""
    folder = Path(path)
    if folder.is_dir():
        find_weight_files(folder)


def check_checkpoint_files(folder: str | Path) -> None:
    """Every safetensors and torch file in a training checkpoint folder is complete."""
    for file in sorted(Path(folder).iterdir()):
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            read_safetensors_header(file)
        elif file.suffix in _TORCH_SUFFIXES and not zipfile.is_zipfile(file):
            raise PescError(
                f"{file} is truncated or corrupt (not a complete torch file): save the checkpoint again, "
                "or remove its folder"
            )
