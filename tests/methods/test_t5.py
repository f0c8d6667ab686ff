"""MoV and MoLoRA on T5 (arXiv 2309.05444's own setting): `pesc convert` of a tiny T5 v1.0 (ReLU `wi` / `wo`, tied
LM head), T5 v1.1 (gated-GELU `wi_0` / `wi_1` / `wo`, Flan-T5's layout) and mT5 checkpoint.

- At init the converted model is the dense T5 exactly: the logits of a batch with encoder padding and the greedy
  tokens (generated with the cache) are equal, with pesc's classes and, where pesc cannot be imported, with the
  checkpoint's own code through `AutoModelForSeq2SeqLM.from_pretrained(..., trust_remote_code=True)`.
- With perturbed added tensors the checkpoint's own code computes what pesc's classes compute, bit for bit, and
  generates (the formulas themselves: tests/methods/mov/test_mov_t5.py, tests/methods/molora/test_molora_t5.py).
- The sites are where the official code puts them, named by the T5 linears; methods without T5 sites refuse a T5
  in one line.
"""

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from pesc.convert import ConvertSettings, convert
from pesc.methods import METHODS, get_method, register_auto_classes
from pesc.testing.isolated import run_without_pesc
from pesc.testing.perturbed import save_perturbed_checkpoint
from pesc.testing.tiny_t5 import T5_VARIANTS, save_tiny_t5
from helpers import one_line_error, read_tensors

T5_METHODS = ("mov", "molora")
# MoLoRA's official T5 sites, by the decoder names `sites` takes (gate_proj is wi_0, or wi in T5 v1.0).
OFFICIAL_MOLORA_SITES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
SETTINGS = {"mov": {"num_experts": 4}, "molora": {"num_experts": 4, "sites": OFFICIAL_MOLORA_SITES}}
INPUT_IDS = [[13, 27, 5, 40, 9, 1, 0, 0], [7, 88, 61, 2, 19, 33, 50, 1]]
ATTENTION_MASK = [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8]  # the first row padded in the encoder
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    """{variant: tiny dense checkpoint} for T5 v1.0, v1.1 and mT5."""
    root = tmp_path_factory.mktemp("t5")
    return {variant: save_tiny_t5(root / variant, variant) for variant in T5_VARIANTS}


@pytest.fixture(scope="module")
def converted(t5_dirs, tmp_path_factory):
    """{(variant, method): converted checkpoint at init}."""
    root = tmp_path_factory.mktemp("t5-converted")
    out = {}
    for variant, dense in t5_dirs.items():
        for method in T5_METHODS:
            out[variant, method] = root / f"{variant}-{method}"
            convert(dense, out[variant, method], ConvertSettings(method, **SETTINGS[method]), echo=lambda _: None)
    return out


def outputs(folder) -> dict:
    """The logits (every decoder position, teacher-forced on the greedy tokens) and greedy tokens of `folder`."""
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = torch.tensor(INPUT_IDS), torch.tensor(ATTENTION_MASK)
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                use_cache=True)
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=tokens).logits
    return {"class": type(model).__name__, "logits": logits, "tokens": tokens}


@pytest.mark.parametrize("variant", T5_VARIANTS)
def test_converted_t5_is_the_dense_model_at_init(variant, t5_dirs, converted):
    register_auto_classes()
    dense = outputs(t5_dirs[variant])
    for method in T5_METHODS:
        moe = outputs(converted[variant, method])
        assert moe["class"] == get_method(method).seq2seq_model_class.__name__
        assert torch.equal(moe["tokens"], dense["tokens"]), (method, moe["tokens"], dense["tokens"])
        assert torch.equal(moe["logits"], dense["logits"]), method


def test_converted_t5_layout_and_config(t5_dirs, converted):
    """Encoder blocks hold self-attention and FFN sites, decoder blocks cross-attention sites too; the config maps
    the family to AutoModelForSeq2SeqLM; the dense tensors are the source's, unchanged."""
    names = set(read_tensors(converted["t5-v1.1", "mov"]))
    assert {n for n in names if ".block.1." in n and n.endswith(".vectors")} == {
        "encoder.block.1.layer.0.SelfAttention.mov_k.vectors", "encoder.block.1.layer.0.SelfAttention.mov_v.vectors",
        "encoder.block.1.layer.1.DenseReluDense.mov_act.vectors",
        "decoder.block.1.layer.0.SelfAttention.mov_k.vectors", "decoder.block.1.layer.0.SelfAttention.mov_v.vectors",
        "decoder.block.1.layer.1.EncDecAttention.mov_k.vectors",
        "decoder.block.1.layer.1.EncDecAttention.mov_v.vectors",
        "decoder.block.1.layer.2.DenseReluDense.mov_act.vectors",
    }
    dense = read_tensors(t5_dirs["t5-v1.1"])
    moe = read_tensors(converted["t5-v1.1", "mov"])
    assert all(torch.equal(moe[name], tensor) for name, tensor in dense.items())
    molora = set(read_tensors(converted["t5-v1.0", "molora"]))
    added = {n.split(".molora_")[1].split(".")[0] for n in molora if ".molora_" in n}
    assert added == {"q", "k", "v", "o", "wi", "wo"}  # v1.0's FFN: gate_proj is wi
    molora = set(read_tensors(converted["t5-v1.1", "molora"]))
    assert {n.split(".molora_")[1].split(".")[0] for n in molora if ".molora_" in n} == {"q", "k", "v", "o", "wi_0",
                                                                                         "wo"}
    assert any(n.startswith("decoder.block.0.layer.1.EncDecAttention.molora_q.") for n in molora)
    config = json.loads((converted["mt5", "mov"] / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_mov.MoVConfig",
                                  "AutoModelForSeq2SeqLM": "modeling_mov.MoVForConditionalGeneration"}
    assert config["architectures"] == ["MoVForConditionalGeneration"] and config["base_model_type"] == "mt5"


def test_t5_checkpoints_run_their_own_code_without_pesc(t5_dirs, converted, tmp_path):
    """Loaded without pesc (`trust_remote_code=True`): at init the dense model's logits exactly; with perturbed
    experts the greedy tokens and logits pesc's classes compute, exactly, and other logits than the dense model's."""
    perturbed = {}
    for variant, method in (("t5-v1.0", "molora"), ("mt5", "mov")):  # each method, each FFN layout once
        perturbed[variant, method] = save_perturbed_checkpoint(
            t5_dirs[variant], tmp_path / f"{variant}-{method}", method, scale=0.5, **SETTINGS[method])
    spec = {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "new_tokens": NEW_TOKENS,
            "decoder_ids": [[0, 41, 3, 77, 12], [0, 8, 8, 59, 30]],
            "dense": {variant: str(path) for variant, path in t5_dirs.items()},
            "converted": {f"{v}|{m}": str(path) for (v, m), path in converted.items()},
            "perturbed": {f"{v}|{m}": str(path) for (v, m), path in perturbed.items()}}
    result = run_without_pesc("""
        import json, torch
        from transformers import AutoModelForSeq2SeqLM
        spec = json.loads(%r)
        ids, mask = torch.tensor(spec["input_ids"]), torch.tensor(spec["attention_mask"])
        decoder_ids = torch.tensor(spec["decoder_ids"])
        def load(folder):
            return AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        def logits(model, decoder_ids):
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        result = {}
        dense = {variant: logits(load(folder), decoder_ids) for variant, folder in spec["dense"].items()}
        for name, folder in spec["converted"].items():  # at init (the tokens: pesc's classes, above)
            model = load(folder)
            result[name] = {"module": type(model).__module__,
                            "logits_equal": torch.equal(logits(model, decoder_ids), dense[name.split("|")[0]])}
        for name, folder in spec["perturbed"].items():
            model = load(folder)
            with torch.no_grad():
                tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec["new_tokens"],
                                        do_sample=False, use_cache=True)
            result[name + "|perturbed"] = {"module": type(model).__module__, "tokens": tokens.tolist(),
                                           "logits": logits(model, tokens).tolist()}
        emit(result)
    """ % json.dumps(spec))
    for (variant, method) in converted:
        entry = result[f"{variant}|{method}"]
        assert entry["module"].startswith("transformers_modules.")
        assert entry["logits_equal"], (variant, method)
    register_auto_classes()
    for (variant, method), folder in perturbed.items():
        entry = result[f"{variant}|{method}|perturbed"]
        assert entry["module"].startswith("transformers_modules.")
        here = outputs(folder)
        dense = outputs(t5_dirs[variant])
        assert entry["tokens"] == here["tokens"].tolist(), (variant, method)
        assert torch.equal(torch.tensor(entry["logits"]), here["logits"]), (variant, method)
        assert not torch.allclose(here["logits"][:, :1], dense["logits"][:, :1], atol=1e-3), (variant, method)


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(T5_METHODS)))
def test_methods_without_t5_sites_refuse_a_t5_in_one_line(name, t5_dirs, tmp_path, capsys):
    assert not get_method(name).seq2seq_model_class_path
    line = one_line_error(capsys, "convert", t5_dirs["t5-v1.1"], tmp_path / "out", "--method", name)
    assert "encoder-decoder" in line and "mov, molora" in line, line
    assert not (tmp_path / "out").exists()


def test_molora_refuses_a_site_that_t5_v1_0_has_not(t5_dirs, tmp_path, capsys):
    line = one_line_error(capsys, "convert", t5_dirs["t5-v1.0"], tmp_path / "out", "--method", "molora",
                          "--sites", "q_proj,up_proj")
    assert "up_proj" in line and "wi_1" in line, line
    assert not (tmp_path / "out").exists()


# google/flan-t5-base's config.json (T5 v1.1 layout: gated-GELU FFN, an LM head of its own): 247,577,856 parameters
FLAN_T5_BASE = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 768,
                "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
                "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
                "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
                "num_decoder_layers": 12, "num_heads": 12, "num_layers": 12, "output_past": True, "pad_token_id": 0,
                "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
                "tie_word_embeddings": False, "torch_dtype": "float32", "vocab_size": 32128}  # fmt: skip


def t5_closed_form(method: str, d=768, d_ff=2048, heads=12, d_kv=64, layers=12, vocab=32128, buckets=32, experts=10,
                   rank=4) -> tuple[int, int]:
    """(dense, added) parameters of a T5 v1.1 with MoV-E or MoLoRA-E (rank r, the official sites), in closed form."""
    inner = heads * d_kv
    attention, ffn = 4 * d * inner, 3 * d * d_ff
    encoder_block, decoder_block = attention + ffn + 2 * d, 2 * attention + ffn + 3 * d
    dense = 2 * vocab * d + layers * (encoder_block + decoder_block) + 2 * (buckets * heads + d)
    if method == "mov":  # per key / value site: router [E, d_kv] and vectors [heads, E, d_kv]; FFN: [E, d_ff] twice
        kv_site, ffn_site = experts * d_kv + heads * experts * d_kv, 2 * experts * d_ff
        added = layers * ((2 * kv_site + ffn_site) + (4 * kv_site + ffn_site))
    else:  # per linear (in, out): router [E, in], A [E r, in], B [out, E r]
        def site(n_in, n_out):
            return experts * n_in + experts * rank * (n_in + n_out)
        attention_sites, ffn_sites = 4 * site(d, inner), site(d, d_ff) + site(d_ff, d)
        added = layers * ((attention_sites + ffn_sites) + (2 * attention_sites + ffn_sites))
    return dense, added


@pytest.mark.parametrize("method, flags", [("mov", []), ("molora", ["--sites", ",".join(OFFICIAL_MOLORA_SITES)])])
def test_inspect_counts_a_t5_in_closed_form(method, flags, tmp_path):
    from click.testing import CliRunner

    from pesc.cli import cli

    (tmp_path / "config.json").write_text(json.dumps(FLAN_T5_BASE))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--method", method, "--json", *flags])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    dense, added = t5_closed_form(method)
    assert summary["dense_params"] == dense == 247_577_856
    assert summary["trainable_params"] == added == {"mov": 1_582_080, "molora": 16_035_840}[method]
    assert summary["total_params"] == summary["active_params"] == dense + added  # every expert is mixed
