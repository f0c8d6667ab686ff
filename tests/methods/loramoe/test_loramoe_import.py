"""Official LoRAMoE adapters (Ablustrund/LoRAMoE's patched peft: adapter_config.json + adapter_model.bin,
per-expert `lora_A{i}` / `lora_B{i}` and `lora_route` tensors) read as pesc LoRAMoE tensors.

The adapter is built here by hand in the official format, with random non-zero B, and the imported
site must compute what the official Linear.forward computes, written here expert by expert in float64.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pesc.errors import PescError
from pesc.methods.loramoe.official_import import expert_tensor_name, read_official_adapter
from pesc.methods.loramoe.modeling_loramoe import LoramoeExperts
from pesc.testing import build_tiny_dense
from pesc.testing.tiny import TINY_SHAPE
from helpers import LORAMOE_SITES, official_state, write_adapter


@pytest.fixture(scope="module")
def base():
    """A tiny llama (hidden 64, intermediate 128, 2 layers) in float64."""
    return build_tiny_dense("llama").double().eval()


def official_forward(state, layer_idx, site, x, base_linear, num_experts=4, rank=4, alpha=32):
    """The official Linear.forward in eval mode, one expert at a time:
    result = W0 x; p = softmax(lora_route(x)); result += p_i * lora_B{i}(lora_A{i}(x)) * alpha / r."""
    prefix = f"base_model.model.model.layers.{layer_idx}.mlp.{site}"
    result = base_linear(x)
    route_weight = torch.softmax(x @ state[f"{prefix}.lora_route.weight"].T, dim=-1)
    for i in range(num_experts):
        a, b = state[f"{prefix}.lora_A{i}.weight"], state[f"{prefix}.lora_B{i}.weight"]
        result = result + route_weight[:, i : i + 1] * ((x @ a.T) @ b.T) * (alpha / rank)
    return result


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_imported_sites_compute_what_the_official_code_computes(base, tmp_path, weights):
    state = official_state(base)
    adapter = read_official_adapter(write_adapter(tmp_path / "adapter", state, weights), base.config, "the base")  # fmt: skip
    assert adapter.settings == {
        "num_experts": 4, "expert_rank": 4, "expert_alpha": 32, "expert_dropout": 0.05, "lbc_delta": 0.1,
        "lbc_loss_coef": 0.1, "sites": ["gate_proj", "up_proj", "down_proj"],
    }  # fmt: skip
    assert len(adapter.tensors) == 2 * 3 * 3
    x = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for layer_idx, layer in enumerate(base.model.layers):
        for site in LORAMOE_SITES:
            linear = getattr(layer.mlp, site)
            inputs = x if site != "down_proj" else torch.randn(5, 128, dtype=torch.float64)
            module = LoramoeExperts(linear.in_features, linear.out_features, 4, 4, 32, 0.0).double().eval()
            module.load_state_dict({
                f"{part}.weight": adapter.tensors[expert_tensor_name(layer_idx, site, part)]
                for part in ("router", "experts_A", "experts_B")
            })  # fmt: skip
            with torch.no_grad():
                ours = module(inputs, linear(inputs))[0]
                official = official_forward(state, layer_idx, site, inputs, linear)
            torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-12)
            assert (official - linear(inputs)).abs().max() > 0.1  # the experts matter


def test_pesc_names_sit_beside_the_linear(base, tmp_path):
    adapter = read_official_adapter(write_adapter(tmp_path / "a", official_state(base)), base.config, "b")
    assert expert_tensor_name(1, "down_proj", "experts_B") == "model.layers.1.mlp.loramoe_down_proj.experts_B.weight"
    assert adapter.tensors[expert_tensor_name(0, "gate_proj", "experts_A")].shape == (4 * 4, 64)
    assert adapter.tensors[expert_tensor_name(0, "down_proj", "experts_B")].shape == (64, 4 * 4)


def test_official_script_settings_are_kept_and_missing_ones_defaulted(base, tmp_path):
    """The public run_loramoe.sh sets blc_alpha = blc_weight = 0: an import keeps what the adapter was trained with."""
    folder = write_adapter(tmp_path / "a", official_state(base), blc_alpha=0.0, blc_weight=0.0, lora_dropout=None)
    settings = read_official_adapter(folder, base.config, "b").settings
    assert (settings["lbc_delta"], settings["lbc_loss_coef"], settings["expert_dropout"]) == (0.0, 0.0, 0.05)


def _error(folder, base, *phrases):
    with pytest.raises(PescError) as raised:
        read_official_adapter(folder, base.config, "the base")
    message = str(raised.value)
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message, message


def test_plain_lora_adapter_is_refused(base, tmp_path):
    folder = write_adapter(tmp_path / "a", official_state(base), lora_nums=None)
    _error(folder, base, "plain LoRA adapter", "no lora_nums", "peft")


def test_adapter_of_another_base_is_refused(base, tmp_path):
    other = LlamaForCausalLM(LlamaConfig(**{**TINY_SHAPE, "hidden_size": 32, "vocab_size": 256}))  # narrower
    folder = write_adapter(tmp_path / "a", official_state(other))
    _error(folder, base, "lora_route.weight has shape [4, 32]", "another base model (meta-llama/Llama-2-7b-hf)")
    deeper = LlamaForCausalLM(LlamaConfig(**{**TINY_SHAPE, "num_hidden_layers": 3, "vocab_size": 256}))
    folder = write_adapter(tmp_path / "b", official_state(deeper))
    _error(folder, base, "experts for layer 2", "has 2 layers", "another base model")


def test_missing_tensors_are_named(base, tmp_path):
    state = official_state(base)
    del state["base_model.model.model.layers.1.mlp.up_proj.lora_B3.weight"]
    _error(write_adapter(tmp_path / "a", state), base, "lacks base_model.model.model.layers.1.mlp.up_proj.lora_B3.weight",
           "incomplete")  # fmt: skip
    state = {k: v for k, v in official_state(base).items() if ".layers.1." not in k}
    _error(write_adapter(tmp_path / "b", state), base, "layers.1.mlp.gate_proj.lora_route.weight", "(and 8 more)",
           "no experts for that layer")  # fmt: skip
    state = {k: v for k, v in official_state(base).items() if ".down_proj." not in k}
    _error(write_adapter(tmp_path / "c", state), base, "targets gate_proj, up_proj, down_proj", "holds experts on gate_proj, up_proj")


def test_odd_lora_nums_with_the_constraint_on_is_refused(base, tmp_path):
    state = official_state(base, num_experts=5)
    _error(write_adapter(tmp_path / "a", state, lora_nums=5), base, "odd lora_nums (5)", "blc_weight 0.1")
    adapter = read_official_adapter(write_adapter(tmp_path / "b", state, lora_nums=5, blc_weight=0.0), base.config,
                                    "b")  # fmt: skip
    assert adapter.settings["num_experts"] == 5


def test_other_bad_folders_get_one_line(base, tmp_path):
    (tmp_path / "empty").mkdir()
    _error(tmp_path / "empty", base, "no adapter_config.json")
    folder = write_adapter(tmp_path / "a", official_state(base))
    (folder / "adapter_model.bin").unlink()
    _error(folder, base, "no adapter_model.bin")
    state = official_state(base)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A0.weight"] = state.pop(
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A0.weight"
    )
    state["base_model.model.lm_head.weight"] = torch.zeros(1)
    _error(write_adapter(tmp_path / "b", state), base, "lm_head.weight", "not a LoRAMoE router or expert")
    state = official_state(base)
    state["base_model.model.model.layers.0.mlp.up_proj.lora_A4.weight"] = torch.zeros(4, 64)
    _error(write_adapter(tmp_path / "c", state), base, "lora_A4", "lora_nums 4")
    folder = write_adapter(tmp_path / "d", official_state(base), r=0)
    _error(folder, base, "r must be a positive integer")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "adapter_config.json").write_text("{not json")
    _error(tmp_path / "e", base, "not valid JSON")
