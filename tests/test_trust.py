"""No command runs Python code from a model folder unless the user passes --trust-remote-code.

The folders here carry modules that write a file when they are imported: that file appearing is the proof that
the folder's code ran.
"""

import json
import shutil

import pytest

from pesc.cli import main
from helpers import EVIL_MODULE, one_line_error, with_code


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "the-folder-code-ran"


@pytest.fixture
def custom_code_model(tiny_llama_dir, tmp_path, marker):
    """A model of a family transformers does not ship, whose code the folder carries."""
    return with_code(shutil.copytree(tiny_llama_dir, tmp_path / "custom"), marker, "evil-llama")


def _commands(model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return {
        "generate": ["generate", model, "--prompt", "hi", "--max-new-tokens", "2"],
        "compare": ["compare", model, model],
        "eval": ["eval", model, "--tasks", "hellaswag", "--out", tmp_path / "eval"],
        "routes": ["routes", model, "--data", data, "--out", tmp_path / "routes"],
    }


@pytest.mark.parametrize("command", ["generate", "compare", "eval", "routes"])
def test_a_folders_own_code_is_refused_without_the_flag(command, custom_code_model, marker, tmp_path, capsys):
    line = one_line_error(capsys, *_commands(custom_code_model, tmp_path)[command])
    assert "modeling_evil" in line and "--trust-remote-code" in line
    assert not marker.exists()


def test_the_flag_runs_the_folders_code(custom_code_model, marker, capsys):
    main(["generate", str(custom_code_model), "--prompt", "hi", "--max-new-tokens", "2", "--no-chat-template",
          "--trust-remote-code"])
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("trust", [False, True])
def test_a_pesc_checkpoint_loads_with_the_installed_pesc_never_its_shipped_files(exported, tmp_path, marker, capsys,
                                                                                  trust):
    """Even with the flag: pesc needs no code from a folder of its own methods, so a tampered file never runs."""
    folder = shutil.copytree(exported, tmp_path / "tampered")
    config = json.loads((folder / "config.json").read_text())
    for reference in config["auto_map"].values():
        module = reference.rsplit(".", 1)[0]
        (folder / f"{module}.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    args = ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "3", "--no-chat-template"]
    main(args + (["--trust-remote-code"] if trust else []))
    tampered_reply = capsys.readouterr().out
    main(["generate", str(exported), "--prompt", "hi", "--max-new-tokens", "3", "--no-chat-template"])
    assert capsys.readouterr().out == tampered_reply
    assert not marker.exists()


def test_a_family_transformers_ships_needs_no_code_from_the_folder(tiny_llama_dir, tmp_path, marker, capsys):
    folder = with_code(shutil.copytree(tiny_llama_dir, tmp_path / "llama"), marker, "llama")
    main(["compare", str(folder), str(tiny_llama_dir), "--atol", "0"])
    assert "= 0" in capsys.readouterr().out
    assert not marker.exists()
