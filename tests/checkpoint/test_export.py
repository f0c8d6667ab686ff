"""`pesc export`: the merged checkpoint computes what the trained model computes, in the §4 layout.

The reference is built here from the run's files with plain torch, not with pesc's loaders (which
export itself uses): the dense base's tensors, W + (lora_alpha / r) * B @ A for each LoRA target, and the
routers and adapters of `experts.safetensors`.

Tolerances (float32, tiny llama, logits of order 0.6, std 0.15):
- exported tensors vs the reference: bit-equal (the same float32 W + s * (B @ A) as peft's merge);
- exported model loaded without pesc vs a model holding the reference tensors: bit-equal logits;
- exported vs the in-memory trained model (`fake_trained_model`, LoRA unmerged): max |Δlogit| <= 1e-5
  (measured ~3e-7: only the order of float32 operations differs, (W + BA)x merged vs Wx + B(Ax));
- exported vs the trained model on its 4-bit NF4 base (as QLoRA trains it): the difference is
  the NF4 rounding of the base weights, so it is bounded by the rounding error of the base
  itself: max and mean |Δlogit| <= 2x those of dense-fp32 vs dense-NF4 on the same input
  (measured: 0.052 / 0.010 against 0.073 / 0.013 for the base alone).
"""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pesc.checkpoint.trained_run import load_trained_model
from pesc.cli import main
from pesc.export import export
from pesc.testing.isolated import run_without_pesc
from pesc.testing.trained_run import LORA_TARGETS, fake_trained_model

NUM_EXPERTS, TOP_K, ADAPTER_DIM = 4, 2, 16  # the shape of the `trained_run` fixture (conftest.py)
INPUT_IDS = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def expected_state(trained_run, tiny_llama_dir):
    """What export must write, computed with plain torch from the dense base and the checkpoint's files."""
    checkpoint = trained_run / "checkpoint-2"
    lora_config = json.loads((checkpoint / "adapter_config.json").read_text())
    scaling = lora_config["lora_alpha"] / lora_config["r"]
    state = {}
    for shard in sorted(Path(tiny_llama_dir).glob("*.safetensors")):
        state.update(load_file(shard))
    lora = load_file(checkpoint / "adapter_model.safetensors")
    for name, lora_a in lora.items():
        if ".lora_A." in name:
            target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            state[target] = state[target] + scaling * (lora[name.replace(".lora_A.", ".lora_B.")] @ lora_a)
    experts = load_file(checkpoint / "experts.safetensors")
    assert experts and not set(experts) & set(state)
    return {**state, **experts}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS).logits


@pytest.fixture(scope="module")
def reference_logits(trained_run, expected_state):
    from pesc.methods.pesc.configuration_pesc import PescConfig
    from pesc.methods.pesc.modeling_pesc import PescForCausalLM

    config = PescConfig.from_dict(json.loads((trained_run / "checkpoint-2" / "pesc_config.json").read_text()))
    model = PescForCausalLM(config)
    model.load_state_dict(expected_state, strict=True)
    return _logits(model)


def _isolated_logits(folder: Path) -> torch.Tensor:
    result = run_without_pesc(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        torch.set_num_threads(2)  # as conftest sets it for the reference: the same kernels, bit for bit
        ids = torch.tensor({INPUT_IDS.tolist()})
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        emit({{"module": type(model).__module__, "logits": logits.tolist()}})
        """,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
    )
    assert "pesc" not in result["module"].split(".")[0], result["module"]  # the folder's shipped code ran
    return torch.tensor(result["logits"])


def test_exported_tensors_are_base_plus_lora_and_the_trained_experts(exported, expected_state, tiny_llama_dir):
    written = {}
    for shard in sorted(exported.glob("*.safetensors")):
        written.update(load_file(shard))
    assert written.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert written[name].dtype == torch.float32 and torch.equal(written[name], tensor), name
    # not the dense model: every LoRA target moved, the rest is the base's bit for bit
    dense = load_file(Path(tiny_llama_dir) / "model.safetensors")
    lora_targets = {n for n in dense if n.rsplit(".", 2)[-2] in LORA_TARGETS}
    assert len(lora_targets) == 7 * 2
    assert {n for n in dense if not torch.equal(written[n], dense[n])} == lora_targets


def test_exported_model_matches_trained_model_without_pesc(exported, reference_logits, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    logits = _isolated_logits(exported)
    assert torch.equal(logits, reference_logits)
    trained = fake_trained_model(tiny_llama_dir, num_experts=NUM_EXPERTS, top_k=TOP_K, adapter_dim=ADAPTER_DIM)
    assert (logits - _logits(trained)).abs().max() <= 1e-5
    dense_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
    assert (logits - dense_logits).abs().max() > 0.1  # trained, not dense: logits of order 0.6 moved by 0.83


def test_exported_model_agrees_with_4bit_training_model(trained_run, tiny_llama_dir, exported):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from pesc.methods import register_auto_classes

    register_auto_classes()

    def nf4(**extra):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            **extra,
        )

    quantized, _, _ = load_trained_model(
        trained_run, quantization_config=nf4(llm_int8_skip_modules=[".*moe_adapter", "lm_head"])
    )
    assert type(quantized.get_base_model().model.layers[0].mlp.gate_proj.base_layer).__name__ == "Linear4bit"
    merged = AutoModelForCausalLM.from_pretrained(exported).eval()
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    dense_nf4 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=nf4()).eval()
    with torch.no_grad():
        diff = (quantized(input_ids=INPUT_IDS).logits.float() - merged(input_ids=INPUT_IDS).logits).abs()
        base_rounding = (dense(input_ids=INPUT_IDS).logits - dense_nf4(input_ids=INPUT_IDS).logits.float()).abs()
    assert diff.max() <= 2 * base_rounding.max(), (diff.max(), base_rounding.max())
    assert diff.mean() <= 2 * base_rounding.mean(), (diff.mean(), base_rounding.mean())
    assert diff.max() > 1e-4  # the 4-bit model really is a different (rounded) model


def _header(path: Path) -> dict:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def test_exported_layout_is_camelidae(exported):
    files = sorted(p.name for p in exported.iterdir())
    for name in (
        "config.json",
        "configuration_pesc.py",
        "modeling_pesc.py",
        "generation_config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ):
        assert name in files, files
    assert not any(name.endswith(".bin") for name in files)
    from pesc.methods import get_method

    shipped = get_method("pesc").shipped_files
    assert {path.name for path in shipped} >= {"configuration_pesc.py", "modeling_pesc.py", "moe_causal_lm.py"}
    for code in shipped:
        assert (exported / code.name).read_bytes() == code.read_bytes()

    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "pesc" and config["base_model_type"] == "llama"
    assert config["architectures"] == ["PescForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pesc.PescConfig",
        "AutoModel": "modeling_pesc.PescModel",
        "AutoModelForCausalLM": "modeling_pesc.PescForCausalLM",
    }
    moe_fields = (config["num_experts"], config["num_experts_per_tok"], config["adapter_dim"])
    assert moe_fields == (NUM_EXPERTS, TOP_K, ADAPTER_DIM)
    for field in ("moe_scaling", "moe_dtype", "output_router_logits", "router_aux_loss_coef", "hidden_size"):
        assert field in config
    assert config["moe_dtype"] == "float32" and config["dtype"] == "float32"
    assert "quantization_config" not in config and config["use_cache"] is True

    index = json.loads((exported / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    expected_moe = set()
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"{prefix}.{proj}.weight" in names
        expected_moe.add(f"{prefix}.moe_adapter.router.weight")
        for expert in range(NUM_EXPERTS):
            for part in ("adapter_down", "adapter_up"):
                expected_moe.add(f"{prefix}.moe_adapter.experts.expert_{expert}.{part}.weight")
    assert {n for n in names if ".moe_adapter." in n} == expected_moe
    assert not any("lora" in n or "base_layer" in n or n.endswith(".bias") and "moe" in n for n in names)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        header = _header(exported / shard)
        assert header.pop("__metadata__") == {"format": "pt"}
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        with safe_open(exported / shard, "pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                if name.endswith("router.weight"):
                    assert shape == (NUM_EXPERTS, hidden)
                elif name.endswith("adapter_down.weight"):
                    assert shape == (ADAPTER_DIM, hidden)
                elif name.endswith("adapter_up.weight"):
                    assert shape == (hidden, ADAPTER_DIM)
    assert index["metadata"]["total_size"] == total

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


def test_model_card_metadata_and_content(exported):
    from huggingface_hub import ModelCard, metadata_load

    card = ModelCard.load(exported / "README.md")
    assert {"moe", "pesc", "mixture-of-experts", "llama"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert card.data.datasets == ["tatsu-lab/alpaca"]
    assert metadata_load(exported / "README.md")["pipeline_tag"] == "text-generation"
    text = card.text
    assert "tiny_instruct.jsonl" in text and "total parameters" in text and "final_eval_loss | 4.75" in text
    assert "LoRA rank 4" in text


def test_export_twice_is_byte_identical_and_force_replaces_only_pesc_folders(trained_run, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "pesc-tiny", tmp_path / "b" / "pesc-tiny"
    export(trained_run, first, log=lambda message: None)  # default bfloat16
    export(trained_run / "checkpoint-2", second, log=lambda message: None)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    assert json.loads(before["config.json"])["dtype"] == "bfloat16"
    with safe_open(first / "model-00001-of-00001.safetensors", "pt") as handle:
        assert {handle.get_slice(n).get_dtype() for n in handle.keys()} == {"BF16"}
    after = {p.name: p.read_bytes() for p in second.iterdir()}
    assert before.keys() == after.keys()
    assert [name for name in before if before[name] != after[name]] == []

    main(["export", str(trained_run), str(first), "--force"])
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["pesc-tiny"]  # no temporary folder left


def _fails(args, capsys) -> str:
    """Run the CLI expecting a user error: exit status != 0 and one `Error:` line, the last one (progress
    lines may come before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and sum(line.startswith("Error") for line in lines) == 1, lines
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_error_run_without_checkpoints(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    err = _fails(["export", str(tmp_path / "run"), str(tmp_path / "out")], capsys)
    assert "no training checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_error_base_with_other_hidden_size(trained_run, tmp_path, capsys):
    from pesc.testing import save_tiny_dense

    other = save_tiny_dense(tmp_path / "other", "llama", hidden_size=32)
    err = _fails(["export", str(trained_run), str(tmp_path / "out"), "--base", str(other)], capsys)
    assert "does not match the adapters" in err and "hidden_size is 32 in the base but 64" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_error_pesc_base_with_other_num_experts(trained_run, tiny_llama_dir, tmp_path, capsys):
    from pesc.methods.pesc.upcycling import upcycle

    upcycle(str(tiny_llama_dir), num_experts=8, adapter_dim=ADAPTER_DIM).save_pretrained(tmp_path / "pesc8")
    err = _fails(["export", str(trained_run), str(tmp_path / "out"), "--base", str(tmp_path / "pesc8")], capsys)
    assert "does not match the adapters" in err and "num_experts is 8 in the base but 4" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pesc8"]


def test_error_experts_file_incomplete(trained_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(trained_run / "checkpoint-2", checkpoint)
    experts = load_file(checkpoint / "experts.safetensors")
    experts.pop("model.layers.1.mlp.moe_adapter.router.weight")
    save_file(experts, checkpoint / "experts.safetensors")
    err = _fails(["export", str(checkpoint), str(tmp_path / "out")], capsys)
    assert "does not match the adapters" in err and "model.layers.1.mlp.moe_adapter.router.weight" in err
    assert not (tmp_path / "out").exists()


def test_error_out_exists(trained_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    err = _fails(["export", str(trained_run), str(out)], capsys)
    assert "already exists" in err and "--force" in err
    err = _fails(["export", str(trained_run), str(out), "--force"], capsys)
    assert "not written by pesc" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
