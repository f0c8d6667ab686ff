"""save_pretrained output is a self-contained Hugging Face checkpoint: it loads without pesc."""

import json

import torch

import pesc
from pesc.testing import build_tiny_dense
from pesc.testing.isolated import run_without_pesc

IDS = [[5, 17, 42, 8, 99, 3, 61, 7], [1, 2, 3, 4, 5, 6, 7, 8]]


def test_saved_model_loads_in_a_process_without_pesc(tmp_path):
    model = pesc.upcycle(build_tiny_dense("qwen2"), num_experts=4, top_k=2, adapter_dim=8, seed=1).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name:
                param.normal_(std=0.5)
        expected = model(torch.tensor(IDS)).logits
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "pesc" and config["base_model_type"] == "qwen2"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pesc.PescConfig",
        "AutoModel": "modeling_pesc.PescModel",
        "AutoModelForCausalLM": "modeling_pesc.PescForCausalLM",
    }
    fields = {"num_experts", "num_experts_per_tok", "adapter_dim", "moe_scaling", "moe_dtype", "router_aux_loss_coef"}
    assert fields <= set(config)
    assert (tmp_path / "modeling_pesc.py").is_file() and (tmp_path / "configuration_pesc.py").is_file()

    result = run_without_pesc(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
            refused = False
        except ValueError:
            refused = True
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.tensor({IDS})).logits
        emit({{"class": type(model).__name__, "refused": refused, "logits": logits.tolist()}})
        """
    )
    assert result["class"] == "PescForCausalLM"
    assert result["refused"], "loading a PESC checkpoint without remote code must fail loudly"
    # Same float32 ops in the same order on the same machine: bit-identical.
    assert torch.equal(torch.tensor(result["logits"]), expected)


def test_from_pretrained_round_trip_in_process(tmp_path):
    model = pesc.upcycle(build_tiny_dense("llama"), num_experts=2, adapter_dim=4).eval()
    model.save_pretrained(tmp_path)
    loaded = pesc.PescForCausalLM.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
