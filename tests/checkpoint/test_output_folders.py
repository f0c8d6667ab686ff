"""Every command that writes an output folder creates its missing parents, and removes them again on failure."""

import json

from helpers import SMALL, assert_clean_error, run_cli


def test_tiny_model_creates_missing_parents(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "dense"
    code, _, err = run_cli(capsys, "tiny-model", out)
    assert code == 0, err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_convert_creates_missing_parents(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "pesc"
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, out, *SMALL)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["model_type"] == "pesc"


def test_export_creates_missing_parents(trained_run, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "export"
    code, _, err = run_cli(capsys, "export", trained_run, out)
    assert code == 0, err
    assert (out / "modeling_pesc.py").is_file()


def test_failed_command_removes_the_parents_it_created(tmp_path, capsys):
    source = tmp_path / "no-weights"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    code, _, err = run_cli(capsys, "convert", source, tmp_path / "a" / "b" / "pesc", *SMALL)
    assert code != 0
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-weights"]


def test_parent_that_is_a_file_is_one_line_error(tiny_llama_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, blocker / "sub" / "pesc", *SMALL)
    assert_clean_error(code, err, f"{blocker} is a file")
