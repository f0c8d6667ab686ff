"""Write an output folder all at once: build it beside its final path, then rename it into place.

Used by every command that writes a model folder (`export`, `convert`), so that an
interrupted or failed run never leaves a half-written folder at OUT, and so that
`--force` only ever replaces a folder pesc itself wrote (a PESC model folder).
"""

import errno
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from pesc.errors import PescError

_TMP_TAG = ".pesc-tmp-"
# A small JSON file pesc leaves in every folder it writes (`.pesc-export`, `.pesc-convert`, `.pesc-from-gguf`):
# the proof that `--force` may replace the folder. `pesc push` does not upload it.
MARKER_PREFIX = ".pesc-"
IMPORT_MARKER = ".pesc-import"  # what `pesc import <format>` writes, whichever method imports
KNOWN_MARKERS = (".pesc-export", ".pesc-convert", ".pesc-from-gguf", IMPORT_MARKER)


def write_marker(folder: str | Path, name: str, info: dict) -> None:
    """Write pesc's marker `name` (e.g. ".pesc-export") with deterministic JSON content."""
    if not name.startswith(MARKER_PREFIX):
        raise ValueError(f"marker names start with {MARKER_PREFIX}")
    (Path(folder) / name).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def is_pesc_model_dir(path: str | Path) -> bool:
    """True for a folder a pesc command wrote: it holds one of pesc's markers."""
    return any((Path(path) / marker).is_file() for marker in KNOWN_MARKERS)


def check_output_dir(
    out: str | Path,
    force: bool,
    sources: tuple[str | Path, ...] = (),
    *,
    allow_empty: bool = False,
    has_force: bool = True,
) -> Path:
    """Refuse an OUT that exists (unless --force and pesc wrote it), that holds one of the inputs or lies inside one.

    With `allow_empty`, an existing empty folder is accepted as if it did not exist; `has_force`
    False words the refusal for a command without a --force flag.
    Call it before any heavy work, so that a bad OUT fails in a second.
    """
    out = Path(out)
    resolved = out.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise PescError(f"{out} holds the input {source}: choose an output folder outside it")
        if source in resolved.parents:
            raise PescError(f"{out} is inside the input {source}: choose an output folder outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise PescError(f"{out} exists and is not a folder: choose another output path")
        empty = not any(out.iterdir())
        if not force and not (allow_empty and empty):
            remedy = "pass --force to replace it" if has_force else "remove it first"
            raise PescError(f"{out} already exists: choose another output folder, or {remedy}")
        if not empty and not is_pesc_model_dir(out):
            raise PescError(
                f"{out} exists and was not written by pesc, so --force will not replace it: "
                "choose another output folder or remove it yourself"
            )
    ancestor = nearest_existing(out.parent)
    if not ancestor.is_dir():
        raise PescError(f"{ancestor} is a file, so {out} cannot be created under it: choose another output folder")
    return out


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest ancestor that does."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def make_parent_folders(out: str | Path) -> list[Path]:
    """Create OUT's missing parent folders (like `mkdir -p`); return them, deepest first, for `remove_if_empty`."""
    created = []
    parent = Path(out).parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return created


def remove_if_empty(folders: list[Path]) -> None:
    """Undo `make_parent_folders` after a failure, leaving any folder something else wrote into."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, *, allow_empty: bool = False, has_force: bool = True,
                      sources: tuple[str | Path, ...] = ()):
    """Yield an empty temporary folder beside `out`; on success it becomes `out`, on any error it is removed.

    With `force` (or `allow_empty` for an empty folder), an existing `out` (checked by
    `check_output_dir`) is replaced only after the new folder is complete. Any error, Ctrl-C
    included, removes the temporary folder; a full disk or another OSError becomes a PescError.
    Missing parent folders of `out` are created, and removed again if the command fails. `sources` (the
    command's local inputs) are checked before the temporary folder is made, so none is written into.
    """
    out = Path(out)
    recover_leftovers(out.parent)
    check_output_dir(out, force, tuple(s for s in sources if Path(s).exists()), allow_empty=allow_empty,
                     has_force=has_force)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}"
    parents: list[Path] = []
    try:
        parents = make_parent_folders(out)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as error:
        remove_if_empty(parents)
        raise PescError(f"cannot write into {out.parent} ({error.strerror or error}): choose another OUT") from None
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}{_TMP_TAG}old-{os.getpid()}"
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)  # put the folder being replaced back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(parents)
        if is_disk_full(error):
            raise PescError(f"disk full while writing {out}: nothing was left behind; free some space") from None
        if isinstance(error, OSError):
            raise PescError(
                f"could not write {out} ({error.strerror or error}): nothing was left behind; check that "
                f"{out.parent} is writable"
            ) from None
        raise


def is_disk_full(error: BaseException) -> bool:
    """A full disk, however the writer reports it: OSError ENOSPC, or safetensors' and torch's own errors, which
    are not OSErrors and only carry the OS message ("os error 28", "No space left on device")."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    text = str(error)
    return "os error 28" in text or os.strerror(errno.ENOSPC) in text


_LEFTOVER = re.compile(rf"^\.(?P<name>.+){re.escape(_TMP_TAG)}(?P<old>old-)?(?P<pid>\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def recover_leftovers(parent: Path, echo=None) -> None:
    """Clean up after pesc processes that died mid-write (SIGKILL, a crash) in `parent`: their temporary folders
    are removed, and a folder being replaced when they died (`old-`) is put back when its OUT is missing, so an
    interrupted --force never loses the previous output."""
    echo = echo or (lambda message: print(message, file=sys.stderr))
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None or not entry.is_dir() or _process_alive(int(match["pid"])):
            continue
        out = parent / match["name"]
        try:
            if match["old"] and not out.exists():
                entry.rename(out)
                echo(f"restored {out}, which an interrupted pesc process (pid {match['pid']}) was replacing")
            else:
                shutil.rmtree(entry)
                echo(f"removed {entry}, left by an interrupted pesc process (pid {match['pid']})")
        except OSError as error:
            echo(f"could not remove {entry}, left by an interrupted pesc process ({error.strerror or error}): "
                 f"remove it with: rm -rf '{entry}'")
