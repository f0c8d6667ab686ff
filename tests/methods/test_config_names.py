"""One naming of config.json across the methods (#25): the Hugging Face MoE names (`num_experts`,
`num_experts_per_tok`, `router_aux_loss_coef`, `sites` as a list), the names pesc 0.1.0 wrote still read (with
pesc and without it), and one source of every setting's default and range: the shipped config class.

The 0.1.0 checkpoints are tests/fixtures/checkpoints_0.1.0/<method>/, read and never rewritten."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pesc.checkpoint.config import read_config
from pesc.cli import main
from pesc.errors import PescError
from pesc.methods import METHODS
from pesc.testing.isolated import run_without_pesc
from helpers import LEGACY_ATOL, LEGACY_CHECKPOINTS, assert_clean_error, run_cli

OLD_NAMES = {"topk", "router_topk", "molora_sites"}
# The 0.1.0 checkpoints are converted with --num-experts 4 (fixtures README); the sites and top-k are the defaults.
OLD_EXPERTS = 4
# What each 0.1.0 config.json says, read under the new names: (num_experts_per_tok, sites or None).
READ_AS = {
    "pesc": (2, None),  # topk 2
    "loramoe": (OLD_EXPERTS, ["gate_proj", "up_proj", "down_proj"]),  # dense: every expert
    "mov": (OLD_EXPERTS, None),  # dense: every expert
    # router_topk 0, molora_sites
    "molora": (OLD_EXPERTS, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "moelora": (2, ["q_proj", "v_proj"]),  # topk 2, sites "q_proj,v_proj"
}
WITH_AUX_LOSS = {"pesc", "moelora"}  # the methods with a router load-balancing loss (aux_loss)
# Where a fresh conversion's default differs from 0.1.0's (#26): MoLoRA's official sites, no up_proj
FRESH_SITES = {"molora": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]}


def old_config(name: str) -> dict:
    return json.loads((LEGACY_CHECKPOINTS / name / "config.json").read_text())


@pytest.fixture(scope="module")
def converted(tiny_llama_dir, tmp_path_factory):
    """{method: the config.json `pesc convert` writes today, with the method's defaults}."""
    root = tmp_path_factory.mktemp("names")
    written = {}
    for name in READ_AS:
        small = ["--adapter-dim", 8] if name == "pesc" else []
        main([str(a) for a in ("convert", tiny_llama_dir, root / name, "--method", name, "--num-experts", 4, *small)])
        written[name] = json.loads((root / name / "config.json").read_text())
    return written


def test_the_fixtures_hold_every_old_name():
    """The 0.1.0 files carry what the readers below must map (a fixture without them would prove nothing)."""
    assert old_config("pesc")["topk"] == 2 and old_config("moelora")["topk"] == 2
    assert old_config("molora")["router_topk"] == 0 and "molora_sites" in old_config("molora")
    assert old_config("moelora")["sites"] == "q_proj,v_proj"
    assert all("num_experts_per_tok" not in old_config(name) for name in READ_AS)


@pytest.mark.parametrize("name", list(READ_AS))
def test_a_fresh_config_json_has_the_new_names_only(name, converted):
    config, config_class = converted[name], METHODS[name].config_class
    assert not OLD_NAMES & set(config), sorted(OLD_NAMES & set(config))
    own = set(config_class.common_defaults) | set(config_class.method_defaults)
    assert own <= set(config), sorted(own - set(config))
    top_k, sites = READ_AS[name]  # the defaults of a 4-expert conversion: what 0.1.0's fixtures hold too, but
    sites = FRESH_SITES.get(name, sites)
    assert (config["num_experts"], config["num_experts_per_tok"], config.get("sites")) == (OLD_EXPERTS, top_k, sites)
    assert ("router_aux_loss_coef" in config) == (name in WITH_AUX_LOSS)


@pytest.mark.parametrize("name", list(READ_AS))
def test_an_old_config_json_loads_under_the_new_names_with_pesc(name, tmp_path):
    config = METHODS[name].config_class.from_dict(old_config(name))
    assert (config.num_experts_per_tok, getattr(config, "sites", None)) == READ_AS[name]
    config.save_pretrained(tmp_path)  # saved again: the new names, never the old
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not OLD_NAMES & set(saved) and saved["num_experts_per_tok"] == READ_AS[name][0]


def test_old_names_map_each_of_their_values():
    """A top-k other than the default, and MoLoRA's 0.1.0 top-k both ways (0: every expert; k: k)."""
    pesc = METHODS["pesc"].config_class.from_dict({**old_config("pesc"), "topk": 3})
    moelora = METHODS["moelora"].config_class.from_dict({**old_config("moelora"), "topk": 1, "sites": "v_proj, k_proj"})
    molora = METHODS["molora"].config_class.from_dict({**old_config("molora"), "router_topk": 3,
                                                        "molora_sites": ["down_proj"]})
    assert (pesc.num_experts_per_tok, moelora.num_experts_per_tok, molora.num_experts_per_tok) == (3, 1, 3)
    assert (moelora.sites, molora.sites) == (["v_proj", "k_proj"], ["down_proj"])
    with pytest.raises(ValueError, match="num_experts_per_tok must be num_experts"):
        METHODS["mov"].config_class.from_dict({**old_config("mov"), "num_experts_per_tok": 2})


def test_an_old_config_json_loads_without_pesc_with_todays_files(tmp_path):
    """Each 0.1.0 folder with today's shipped files in place of its own, its config.json as 0.1.0 wrote it, loads
    with plain transformers as the method's class and computes the logits 0.1.0 computed (within
    helpers.LEGACY_ATOL: the same float32 ops, summed in another order on another CPU or thread count)."""
    folders = {}
    for name, method in METHODS.items():
        if name not in READ_AS:
            continue
        folder = folders[name] = tmp_path / name
        shutil.copytree(LEGACY_CHECKPOINTS / name, folder, ignore=shutil.ignore_patterns("*.py"))
        for file in method.shipped_files:
            shutil.copyfile(file, folder / file.name)
    result = run_without_pesc(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM
        result = {{}}
        for name, folder in {({k: str(v) for k, v in folders.items()})!r}.items():
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(input_ids=load_file(folder + "/expected_logits.safetensors")["input_ids"]).logits
            result[name] = {{"class": type(model).__name__, "top_k": config.num_experts_per_tok, "sites": getattr(config, "sites", None),
                            "saved": sorted(config.to_dict()), "logits": logits.tolist()}}
        emit(result)
    """)
    for name, folder in folders.items():
        got = result[name]
        assert got["class"] == METHODS[name].model_class.__name__
        assert (got["top_k"], got["sites"]) == READ_AS[name]
        assert not OLD_NAMES & set(got["saved"])
        expected = load_file(folder / "expected_logits.safetensors")["logits"]
        torch.testing.assert_close(torch.tensor(got["logits"]), expected, atol=LEGACY_ATOL, rtol=0)


@pytest.mark.parametrize("name", list(READ_AS))
def test_inspect_reads_an_old_checkpoint(name, capsys):
    code, out, err = run_cli(capsys, "inspect", LEGACY_CHECKPOINTS / name, "--json")
    assert code == 0, err
    summary = json.loads(out)
    settings = summary.get("settings", summary)  # PESC's summary has its settings at the top level
    top_k, sites = READ_AS[name]
    assert settings.get("top_k", top_k) == top_k and settings.get("sites") == sites


@pytest.mark.parametrize("name", list(METHODS))
def test_every_setting_default_is_the_config_class_default(name):
    """The CLI and YAML defaults are the config class's: declared once (`method_defaults`), and what a config
    built with no settings holds is what `resolve_settings` gives with none."""
    method = METHODS[name]
    config_class = method.config_class
    declared = {**config_class.common_defaults, **config_class.method_defaults}
    for setting in method.settings:
        assert setting.field in declared and setting.default == declared[setting.field], setting.name
    # a field whose absence means an older checkpoint's form (MoV's ffn_site): a config without it holds that form
    absent = {s.name: config_class.absent_defaults[s.field] for s in method.settings
              if s.field in config_class.absent_defaults}
    assert {**method.resolve_settings({}, ""), **absent} == {**method.config_settings(config_class()), "seed": 0}


def test_a_config_check_is_a_one_line_error_naming_the_flag_or_key(tiny_llama_dir, tmp_path, capsys):
    """The config class's range checks run for the CLI and the YAML, in their words (top_k, not
    num_experts_per_tok); no check of the config is repeated beside it."""
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", "--num-experts", 4, "--top-k", 5)
    assert_clean_error(code, err, "top_k (5) cannot exceed num_experts (4)")
    code, _, err = run_cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", "--method", "moelora",
                           "--contrastive-temperature", 0)
    assert_clean_error(code, err, "contrastive_temperature must be a positive number")
    with pytest.raises(PescError, match=r"moe\.top_k \(5\) cannot exceed moe\.num_experts \(4\)"):
        METHODS["molora"].resolve_settings({"num_experts": 4, "top_k": 5})
    assert not (tmp_path / "out").exists()


def test_molora_top_k_zero_still_means_every_expert(tiny_llama_dir):
    """The flag's `--top-k 0` (and a YAML `top_k: 0`) as before: every expert, stored as num_experts."""
    values = METHODS["molora"].resolve_settings({"num_experts": 6, "top_k": 0}, "")
    assert values["top_k"] == 6
    config = METHODS["molora"].config_from_dense(read_config(tiny_llama_dir), values)
    assert config.num_experts_per_tok == 6
