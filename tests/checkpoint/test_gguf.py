"""GGUF input: `pesc from-gguf` and `pesc convert X.gguf`, checked against transformers' own GGUF loading."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pesc.testing.tiny_gguf import save_tiny_gguf
from helpers import assert_clean_error, run_cli


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    """The GGUF model as transformers itself loads it: the independent reference."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    return model.eval(), tokenizer


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_from_gguf_writes_the_dequantized_weights_exactly(tiny_gguf, reference, tmp_path, capsys):
    out = tmp_path / "not" / "yet" / "dense"  # missing parents are created
    code, stdout, err = run_cli(capsys, "from-gguf", tiny_gguf, out)
    assert code == 0, err
    assert f"wrote     {out}: llama" in stdout
    model, tokenizer = reference
    written = load_file(out / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if k in written}
    assert set(written) == set(expected) and written  # the tied lm_head may be left out, as save_pretrained does
    assert all(torch.equal(written[k], expected[k]) for k in written)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert json.loads((out / ".pesc-from-gguf").read_text())["source"] == str(tiny_gguf)
    reloaded = AutoTokenizer.from_pretrained(out)
    text = "What is two plus two?"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.chat_template == tokenizer.chat_template


def test_convert_takes_a_gguf_source_and_is_exact_at_init(tiny_gguf, reference, tmp_path, capsys):
    out = tmp_path / "pesc"
    code, stdout, err = run_cli(capsys, "convert", tiny_gguf, out, "--num-experts", 4, "--adapter-dim", 8)
    assert code == 0, err
    assert str(tiny_gguf) in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pesc"]  # the dequantized folder is gone
    marker = json.loads((out / ".pesc-convert").read_text())
    assert marker["source"] == str(tiny_gguf)
    converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(converted).__name__ == "PescForCausalLM"
    ids = torch.tensor([[5, 17, 42, 99, 200, 3, 64]])
    assert torch.equal(_logits(converted, ids), _logits(reference[0], ids))


def test_missing_gguf_file_is_one_line_error(tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "from-gguf", tmp_path / "nope.gguf", tmp_path / "a" / "out")
    assert_clean_error(code, err, "nope.gguf does not exist")
    assert stdout == "" and sorted(tmp_path.iterdir()) == []


def test_not_a_gguf_file_is_one_line_error(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    code, _, err = run_cli(capsys, "from-gguf", fake, tmp_path / "out")
    assert_clean_error(code, err, "is not a GGUF file")
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "convert", fake, tmp_path / "out")
    assert_clean_error(code, err, "is not a GGUF file")
    code, _, err = run_cli(capsys, "convert", tmp_path / "missing.gguf", tmp_path / "out")
    assert_clean_error(code, err, "missing.gguf does not exist")
    other = tmp_path / "weights.txt"
    other.write_text("")
    code, _, err = run_cli(capsys, "convert", other, tmp_path / "out")
    assert_clean_error(code, err, "neither a model folder nor a GGUF file")
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_is_named(tiny_gguf, tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    code, _, err = run_cli(capsys, "from-gguf", tiny_gguf, tmp_path / "a" / "out")
    assert_clean_error(code, err, "needs the gguf package", "pip install gguf")
    assert not (tmp_path / "a").exists()  # the parent it created is removed again
