"""`pesc import camelidae`: checkpoints in the published Camelidae / Qwen2idae format become pesc checkpoints.

The fixture writes a trained pesc model the way the Camelidae releases are laid out: config.json with
`model_type: camelidae` (or qwen2idae), the MoE fields `num_experts, topk, adapter_dim, moe_scaling,
moe_dtype, output_router_logits`, the official auto_map, and the same tensor names, as a pickle
`pytorch_model.bin` or as safetensors. The import must compute exactly what the model that wrote it computes.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pesc.testing import save_tiny_dense
from pesc.testing.trained_run import save_fake_trained_run
from helpers import MOE_SCALING, assert_clean_error, run_cli, write_published


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained_export(request, tmp_path_factory):
    """A pesc export with trained (non-zero) experts and LoRA merged in, and in memory the model it is as a
    published release (`write_published`): its tensors at moe_scaling MOE_SCALING."""
    from pesc.export import export

    root = tmp_path_factory.mktemp(f"published-{request.param}")
    dense = save_tiny_dense(root / "dense", request.param)
    save_fake_trained_run(root / "run", dense, num_experts=4, top_k=2, adapter_dim=8)
    export(str(root / "run"), root / "export", dtype="float32", log=lambda message: None)
    model = AutoModelForCausalLM.from_pretrained(root / "export", trust_remote_code=True, dtype=torch.float32,
                                                 moe_scaling=MOE_SCALING)
    return request.param, root / "export", model.eval()


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_import_computes_what_the_published_model_computes(trained_export, weights, tmp_path, capsys):
    family, export_dir, model = trained_export
    published = write_published(export_dir, tmp_path / "published", family, weights)
    out = tmp_path / "imported"
    code, stdout, err = run_cli(capsys, "import", "camelidae", published, out)
    assert code == 0, err
    assert f"({family} layers), 4 experts, top-2, adapter_dim 8, moe_scaling {MOE_SCALING}" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "pesc" and config["base_model_type"] == family
    moe_fields = (config["num_experts"], config["num_experts_per_tok"], config["adapter_dim"], config["moe_scaling"])
    assert moe_fields == (4, 2, 8, MOE_SCALING) and "topk" not in config  # the release's topk, under pesc's name
    assert not list(out.glob("*.bin")) and (out / "modeling_pesc.py").is_file() and (out / ".pesc-import").is_file()
    imported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 130, 7], [8, 200, 33, 71, 12, 150]])
    default_scaling = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(imported(input_ids=ids).logits, model(input_ids=ids).logits)
        # the experts add enough that the scaling shows: an import at the default 0.25 would not be equal above
        assert not torch.allclose(default_scaling.eval()(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)
    assert torch.equal(imported.state_dict()["model.layers.1.mlp.moe_adapter.experts.expert_2.adapter_up.weight"],
                       model.state_dict()["model.layers.1.mlp.moe_adapter.experts.expert_2.adapter_up.weight"])


def test_bad_inputs_are_one_line_errors_and_write_nothing(trained_export, tiny_llama_dir, tmp_path, capsys):
    family, export_dir, _ = trained_export
    code, _, err = run_cli(capsys, "import", "camelidae", tiny_llama_dir, tmp_path / "a")
    assert_clean_error(code, err, "is not a Camelidae or Qwen2idae checkpoint", "'llama'")
    code, _, err = run_cli(capsys, "import", "camelidae", export_dir, tmp_path / "b")
    assert_clean_error(code, err, "already a pesc checkpoint")
    published = write_published(export_dir, tmp_path / "published", family, "safetensors")
    config = json.loads((published / "config.json").read_text())
    (published / "config.json").write_text(json.dumps({**config, "adapter_dim": 16}))
    code, _, err = run_cli(capsys, "import", "camelidae", published, tmp_path / "c")
    assert_clean_error(code, err, "weights don't match config.json", "adapter_down")
    (published / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "topk"}))
    code, _, err = run_cli(capsys, "import", "camelidae", published, tmp_path / "d")
    assert_clean_error(code, err, "lacks topk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["published"]


def test_transformers_4_config_fields_carry_over(trained_export, tmp_path, capsys):
    family, export_dir, _ = trained_export
    published = write_published(export_dir, tmp_path / "published", family, "safetensors")
    config = json.loads((published / "config.json").read_text())
    (published / "config.json").write_text(json.dumps({**config, "rope_theta": 12345.0, "moe_dtype": "float32"}))
    code, _, err = run_cli(capsys, "import", "camelidae", published, tmp_path / "out")
    assert code == 0, err
    imported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert imported["rope_parameters"]["rope_theta"] == 12345.0
    assert imported["moe_dtype"] == "float32" and imported["dtype"] == "float32"
