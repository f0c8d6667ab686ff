"""Every shipped file a checkpoint needs reaches transformers' module cache on every supported release.

From a local checkpoint folder, transformers before 5.12 (4.46.3, 5.0, 5.3) copies into its module cache only
the file an `auto_map` entry names and the files that file imports relatively itself, then imports it, which
needs every file its imports reach (they import each other). So the files that the config's and the model's
entry files reach must be among the ones they name themselves. Checked here from the source, as that loader
reads it (its own regular expressions); tests/modeling/test_compat.py loads the checkpoints on those releases (slow).
"""

import re
import shutil
from pathlib import Path

import pytest

from pesc.methods import METHODS, get_method

# transformers 4.46.3's dynamic_module_utils.get_relative_imports, verbatim
_IMPORT = re.compile(r"^\s*import\s+\.(\S+)\s*$", flags=re.MULTILINE)
_FROM_IMPORT = re.compile(r"^\s*from\s+\.(\S+)\s+import", flags=re.MULTILINE)


def named(folder: Path, file: str) -> set[str]:
    """The files `file` imports relatively itself."""
    text = (folder / file).read_text()
    return {f"{name}.py" for name in _IMPORT.findall(text) + _FROM_IMPORT.findall(text)}


def reached(folder: Path, file: str) -> set[str]:
    """`file` and every file its relative imports reach, transitively."""
    found, todo = set(), [file]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo += named(folder, current)
    return found


def copied_by_old_loader(folder: Path, entries: list[str]) -> set[str]:
    """What transformers < 5.12 copies from a local folder while loading `entries` in turn (config first)."""
    return set(entries).union(*(named(folder, entry) for entry in entries))


def test_the_check_sees_a_file_reached_only_through_another(tmp_path):
    (tmp_path / "entry.py").write_text("from .middle import MIDDLE\n")
    (tmp_path / "middle.py").write_text("from .leaf import LEAF\n\nMIDDLE = LEAF\n")
    (tmp_path / "leaf.py").write_text("LEAF = 1\n")
    assert reached(tmp_path, "entry.py") == {"entry.py", "middle.py", "leaf.py"}
    assert copied_by_old_loader(tmp_path, ["entry.py"]) == {"entry.py", "middle.py"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_old_transformers_copies_every_file_a_checkpoint_loads(name, tmp_path):
    method = get_method(name)
    for path in method.shipped_files:  # the checkpoint's layout: every shipped file in one folder
        shutil.copyfile(path, tmp_path / path.name)
    entries = [f"{path.split('.')[0]}.py" for path in (method.config_class_path, method.model_class_path,
                                                        method.auto_model_class_path)]  # fmt: skip
    needed = set().union(*(reached(tmp_path, entry) for entry in entries))
    missing = needed - copied_by_old_loader(tmp_path, entries)
    assert not missing, f"{name}: import these in its entry files too: {sorted(missing)}"
