"""The CLI tells each method's truth: its settings with its defaults, and no flag of another method."""

import re

import pytest

from pesc.cli import main
from pesc.methods import METHODS
from helpers import assert_clean_error, run_cli


def _help_flags(text: str) -> dict[str, str]:
    """{flag: its help text} from click's option listing (wrapped lines joined)."""
    flags, current = {}, None
    for line in text.split("Options:", 1)[1].splitlines():
        match = re.match(r"\s{2}(--[a-z0-9-]+)(.*)", line)
        if match:
            current = match[1]
            flags[current] = match[2]
        elif current and line.startswith(" " * 10):
            flags[current] += " " + line.strip()
    return {flag: " ".join(text.split()) for flag, text in flags.items()}


@pytest.mark.parametrize("command", ["convert", "inspect"])
@pytest.mark.parametrize("name", list(METHODS))
def test_help_with_a_method_lists_its_settings_with_its_defaults(name, command, capsys):
    main([command, "--method", name, "--help"])
    flags = _help_flags(capsys.readouterr().out)
    method = METHODS[name]
    own = {setting.flag: setting for setting in method.all_settings()}
    others = {s.flag for m in METHODS.values() for s in m.all_settings()} - set(own)
    assert not others & set(flags), f"{command} --method {name} offers another method's flags"
    for flag, setting in own.items():
        assert f"(default {setting.default}" in flags[flag], (flag, flags[flag])


def test_help_without_a_method_gives_each_methods_default(capsys):
    main(["convert", "--help"])
    num_experts = _help_flags(capsys.readouterr().out)["--num-experts"]
    for name, method in METHODS.items():
        default = next(s.default for s in method.settings if s.name == "num_experts")
        assert f"{name} {default}" in num_experts


@pytest.mark.parametrize("name", list(METHODS))
def test_a_flag_of_another_method_is_refused_in_one_line(name, tiny_llama_dir, tmp_path, capsys):
    own = {s.name for s in METHODS[name].all_settings()}
    foreign = next(s for m in METHODS.values() for s in m.all_settings() if s.name not in own)
    value = "1" if foreign.types != (str,) else str(foreign.default)
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", "--method", name, foreign.flag, value)
    assert_clean_error(code, err, f"{foreign.flag} is not a setting of method {name}")
    assert not (tmp_path / "out").exists()


def test_methods_name_lists_defaults_ranges_and_config_fields(capsys):
    main(["methods", "molora"])
    out = capsys.readouterr().out
    for setting in METHODS["molora"].settings:
        row = next(line for line in out.splitlines() if line.startswith(setting.flag + " "))
        assert str(setting.default) in row and (setting.field or "(not stored)") in row
