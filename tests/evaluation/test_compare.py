"""`pesc compare`: 0 for the same function, a non-zero exit when the models differ beyond --atol."""

import pytest
import torch

import pesc
from pesc.cli import main


def test_upcycled_equals_dense_and_perturbed_does_not(tiny_llama_dir, tmp_path, capsys):
    model = pesc.upcycle(tiny_llama_dir, num_experts=4, adapter_dim=8)
    model.save_pretrained(tmp_path / "same")
    main(["compare", str(tiny_llama_dir), str(tmp_path / "same"), "--atol", "1e-5"])
    assert "= 0" in capsys.readouterr().out

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name:
                param.normal_()
    model.save_pretrained(tmp_path / "changed")
    with pytest.raises(SystemExit) as changed:
        main(["compare", str(tiny_llama_dir), str(tmp_path / "changed"), "--atol", "1e-5"])
    assert changed.value.code == 1
    assert "more than --atol" in capsys.readouterr().err
