"""docs/methods.md's tables of defaults say what the config classes hold (the one source of each default): a
default changed in code and not in the docs fails here. Rows in words ("the seven projections") are not read."""

import re
from pathlib import Path

import pytest

from pesc.methods import METHODS

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def documented_defaults(label: str) -> dict[str, str]:
    """{setting: the default cell} of the table under `## <label>`."""
    section = re.search(rf"^## {re.escape(label)}\n(.*?)(?=^## )", DOC.read_text(), re.S | re.M)
    assert section, f"docs/methods.md has no section '## {label}'"
    return dict(re.findall(r"^\| `(\w+)` \| (.+?) \|$", section.group(1), re.M))


def read_cell(cell: str):
    """The cell's value where it is a literal (a number, a bool, None, names in backticks), else None."""
    head = cell.split(" (")[0].strip()
    if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", head):
        return float(head)
    if head in ("true", "false", "None"):
        return {"true": True, "false": False, "None": None}[head]
    names = re.findall(r"`(\w+)`", head)
    if names and re.fullmatch(r"(`\w+`(, )?)+", head):
        return names if len(names) > 1 or "," in head else names[0]
    return "words"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_documented_defaults_are_the_config_classes(name):
    method = METHODS[name]
    documented = documented_defaults(method.label)
    settings = {setting.name: setting for setting in method.settings}
    checked = 0
    for setting_name, cell in documented.items():
        assert setting_name in settings, f"{name}: docs/methods.md lists {setting_name!r}, not a setting of the method"
        value = read_cell(cell)
        if value == "words":
            continue
        default = settings[setting_name].default
        if isinstance(value, float):
            assert isinstance(default, (int, float)) and float(default) == value, (name, setting_name, cell, default)
        elif isinstance(value, list):
            assert list(default) == value, (name, setting_name, cell, default)
        else:
            assert default == value, (name, setting_name, cell, default)
        checked += 1
    assert checked >= 1, f"{name}: no default of docs/methods.md could be read"
