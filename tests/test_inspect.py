"""`pesc inspect`: parameter counts from config.json alone, in closed form."""

import json

from click.testing import CliRunner

from pesc.cli import cli

# meta-llama/Llama-2-7b-hf's config.json
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32000,
}


def closed_form(h=4096, inter=11008, layers=32, vocab=32000, experts=8, k=2, d=512):
    attention = 4 * h * h
    ffn = 3 * h * inter
    norms = 2 * h
    dense = vocab * h * 2 + layers * (attention + ffn + norms) + h
    per_expert = 2 * h * d
    router = experts * h
    total = dense + layers * (experts * per_expert + router)
    active = dense + layers * (k * per_expert + router)
    return dense, total, active, layers * (experts * per_expert + router)


def test_llama2_7b_lands_on_the_paper_counts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    dense, total, active, trainable = closed_form()
    assert summary["dense_params"] == dense == 6_738_415_616
    assert summary["total_params"] == total
    assert summary["active_params"] == active
    assert summary["trainable_params"] == trainable
    assert 7.7e9 < total < 8.0e9 and 6.9e9 < active < 7.1e9


def test_planned_settings_change_the_counts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json", "--num-experts", "4", "--top-k", "1", "--adapter-dim", "64"])
    summary = json.loads(result.output)
    dense, total, active, trainable = closed_form(experts=4, k=1, d=64)
    assert (summary["total_params"], summary["active_params"], summary["trainable_params"]) == (total, active, trainable)


def test_text_output_names_the_counts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 0
    assert "7.81B" in result.output and "7.01B" in result.output and "top-2" in result.output


def test_inspect_reads_a_pesc_checkpoint(tmp_path):
    import pesc
    from pesc.testing import build_tiny_dense

    model = pesc.upcycle(build_tiny_dense("llama"), num_experts=4, top_k=2, adapter_dim=8)
    model.save_pretrained(tmp_path)
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"])
    summary = json.loads(result.output)
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())
    assert summary["num_experts"] == 4 and summary["adapter_dim"] == 8


def test_bad_paths_give_one_line_errors(tmp_path, capsys):
    from pesc.cli import main
    import pytest

    for path, message in [(tmp_path / "missing", "does not exist"), (tmp_path, "no config.json")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", str(path)])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"Error: {path} ") and message in err[0], err
