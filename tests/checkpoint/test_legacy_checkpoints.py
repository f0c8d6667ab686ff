"""Checkpoints that pesc 0.1.0 wrote (tests/fixtures/checkpoints_0.1.0) still load and compute what they computed
then: with pesc (its registered classes read the old config.json names) and without it (the folder's model code
replaced by today's shipped files, which must read the old names on their own)."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pesc.methods import METHODS, register_auto_classes
from pesc.testing.isolated import checkpoint_outputs_without_pesc

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "checkpoints_0.1.0"
# The same float32 model on another CPU or thread count sums its dot products (length <= 64) in another order:
# each differs by a few ulps (~1e-7 relative), and two layers keep the logits (|logit| < 5) within 1e-5 of each
# other. 1e-4 leaves a margin and still fails on any change of what is computed (a dropped expert moves logits by
# more than 1e-2 here: the added tensors carry noise of scale 0.2).
ATOL = 1e-4


def expected(name):
    return load_file(FIXTURES / name / "expected_logits.safetensors")


def test_every_method_has_a_fixture():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loads_with_pesc_and_computes_the_same(name):
    register_auto_classes()
    want = expected(name)
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32).eval()
    assert type(model) is METHODS[name].model_class
    with torch.no_grad():
        logits = model(want["input_ids"]).logits
    torch.testing.assert_close(logits, want["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_todays_shipped_code_reads_the_old_config_without_pesc(name, tmp_path):
    folder = shutil.copytree(FIXTURES / name, tmp_path / name)
    for old_code in folder.glob("*.py"):
        old_code.unlink()
    for shipped in METHODS[name].shipped_files:
        shutil.copyfile(shipped, folder / shipped.name)
    want = expected(name)
    got = checkpoint_outputs_without_pesc(folder, want["input_ids"].tolist())
    assert got["class"] == METHODS[name].model_class.__name__
    torch.testing.assert_close(torch.tensor(got["logits"]), want["logits"], atol=ATOL, rtol=0)
