"""Checkpoints that pesc 0.1.0 wrote (tests/fixtures/checkpoints_0.1.0) still load with pesc (its registered classes
read the old config.json names) and compute what they computed then. Without pesc, with today's shipped files in
the folder: tests/methods/test_config_names.py."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pesc.methods import METHODS, register_auto_classes

from helpers import LEGACY_ATOL, LEGACY_CHECKPOINTS


def expected(name):
    return load_file(LEGACY_CHECKPOINTS / name / "expected_logits.safetensors")


def test_every_method_has_a_fixture():
    assert sorted(p.name for p in LEGACY_CHECKPOINTS.iterdir() if p.is_dir()) == sorted(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loads_with_pesc_and_computes_the_same(name):
    register_auto_classes()
    want = expected(name)
    model = AutoModelForCausalLM.from_pretrained(LEGACY_CHECKPOINTS / name, dtype=torch.float32).eval()
    assert type(model) is METHODS[name].model_class
    with torch.no_grad():
        logits = model(want["input_ids"]).logits
    torch.testing.assert_close(logits, want["logits"], atol=LEGACY_ATOL, rtol=0)
