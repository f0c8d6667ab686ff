"""The shipped model code runs on every transformers release a user may have (pesc.model_card.TESTED_TRANSFORMERS).

In a cached environment per release (pesc.testing.compat_envs) where pesc cannot be
imported, a converted Llama (llama3 rope, which transformers 4.x spells differently), a
converted Qwen2, a converted Gemma (tied embeddings, an init that calls super()), an
exported trained Llama, and a Llama converted with every other method (its added tensors
perturbed, so that the method's own code computes something) are loaded with
`trust_remote_code=True` and must give, against references computed here with this
environment's (newest) transformers:
- the converted models: exactly the dense model's logits;
- the exported model: the trained (unmerged LoRA) model's logits within 1e-5 (the merge
  reorders float32 operations: see tests/checkpoint/test_export.py);
- the other methods' checkpoints: what they are compared with below, pesc's classes here (each
  method's own tests check those against float64 references of its formula);
- all: exactly the same logits and greedy tokens (generated with the cache) as here, and
  `logits_to_keep=1` (4.x names it num_logits_to_keep) gives the last position's logits only;
- all: `AutoModel` (what vLLM's Transformers backend loads) gives the backbone with the shipped
  layers, whose last hidden state through the LM head is exactly the logits, and the experts
  per token read as `num_experts_per_tok`, as here.
An environment that cannot be built skips the test on a developer's machine and fails it in CI.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from pesc.checkpoint.trained_run import load_trained_model
from pesc.cli import main as cli_main
from pesc.convert import ConvertSettings, convert
from pesc.export import export
from pesc.methods import DEFAULT_METHOD, METHODS, get_method, register_auto_classes
from pesc.model_card import TESTED_TRANSFORMERS
from pesc.testing import save_tiny_dense
from pesc.testing.trained_run import save_fake_trained_run

from helpers import COMPAT_VERSIONS, probe_releases

# Llama 3's rope: transformers 5 writes it as `rope_parameters`, 4.x reads `rope_theta` / `rope_scaling`.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
PAD = 3  # the tiny tokenizer's <pad>
INPUT_IDS = [[PAD, PAD, 17, 42, 99, 5, 130, 61], [8, 200, 33, 71, 12, 150, 9, 27]]
ATTENTION_MASK = [[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]
NEW_TOKENS = 8
# The releases checked; PESC_COMPAT_TRANSFORMERS="5.1.0,5.2.0,..." checks others (a sweep by hand).

PROBE = """
import json, torch, transformers
from transformers import AutoModel, AutoModelForCausalLM
spec = json.loads(@SPEC@)
ids, mask = torch.tensor(spec["input_ids"]), torch.tensor(spec["attention_mask"])
results = {"transformers": transformers.__version__}
for name, folder in spec["checkpoints"].items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        logits = full[mask.bool()]
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec["new_tokens"],
                                   do_sample=False, use_cache=True, pad_token_id=spec["pad"])
    # AutoModel (vLLM's Transformers backend loads it): the backbone, whose last hidden state gives the logits
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        backbone_logits = model.lm_head(backbone(input_ids=ids, attention_mask=mask).last_hidden_state)[mask.bool()]
    results[name] = {"module": type(model).__module__, "logits": logits.tolist(),
                     "backbone_runs_shipped_code": any(type(m).__module__.startswith("transformers_modules.")
                                                       for m in backbone.layers[0].modules()),
                     "backbone_logits_equal": torch.equal(backbone_logits, logits),
                     "experts_per_token": backbone.config.num_experts_per_tok,
                     "generated": generated[:, ids.shape[1]:].tolist(), "kept_shape": list(kept.shape),
                     "kept_vs_last": (kept[:, -1] - full[:, -1]).abs().max().item()}
emit(results)
"""


def _inputs() -> dict:
    return {"input_ids": torch.tensor(INPUT_IDS), "attention_mask": torch.tensor(ATTENTION_MASK)}


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    inputs = _inputs()
    return model(**inputs).logits[inputs["attention_mask"].bool()]


@torch.no_grad()
def _pesc_reference(folder) -> tuple[torch.Tensor, list]:
    """The checkpoint's logits and greedy tokens here (newest transformers, pesc's classes for every method)."""
    from transformers import AutoModelForCausalLM

    register_auto_classes()  # what pesc's commands do before they load; this file may run before any of them
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = _inputs()
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=PAD)
    return _logits(model), out[:, len(INPUT_IDS[0]) :].tolist()


def _converted_with_method(dense: Path, out: Path, method: str) -> Path:
    """`pesc convert --method METHOD`, then every added tensor moved off its initial value (zero B's, unit
    vectors and fresh routers would leave parts of the method's code without effect), in place."""
    cli_main(["convert", str(dense), str(out), "--method", method])
    generator = torch.Generator().manual_seed(len(method))
    perturbed = 0
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        added = [name for name in tensors if get_method(method).is_added(name)]
        for name in added:
            tensors[name] = tensors[name] + 0.3 * torch.randn(tensors[name].shape, generator=generator).to(tensors[name].dtype)
        if added:
            save_file(tensors, shard, metadata={"format": "pt"})
        perturbed += len(added)
    assert perturbed > 0, method
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: folder} of the checkpoints to load, and this environment's reference logits and tokens."""
    root = tmp_path_factory.mktemp("compat")
    settings = ConvertSettings(num_experts=4, top_k=2, adapter_dim=16)
    dense = {
        "llama": save_tiny_dense(root / "dense-llama", "llama", rope_parameters=LLAMA3_ROPE),
        "qwen2": save_tiny_dense(root / "dense-qwen2", "qwen2"),
        "gemma": save_tiny_dense(root / "dense-gemma", "gemma", head_dim=16),
    }
    # A config from an old release: the converted one must record the release that made it instead.
    config = json.loads((dense["llama"] / "config.json").read_text())
    (dense["llama"] / "config.json").write_text(json.dumps({**config, "transformers_version": "4.31.0"}))
    folders = {}
    for family, folder in dense.items():
        folders[f"converted-{family}"] = root / f"converted-{family}"
        convert(folder, folders[f"converted-{family}"], settings, echo=lambda message: None)
    for method in METHODS:
        if method != DEFAULT_METHOD:
            folders[f"method-{method}"] = _converted_with_method(dense["llama"], root / f"method-{method}", method)
    run = root / "run"
    save_fake_trained_run(run, dense["llama"], num_experts=4, top_k=2, adapter_dim=16, final=True)
    folders["exported-llama"] = root / "exported-llama"
    export(run, folders["exported-llama"], dtype="float32", log=lambda message: None)

    from transformers import AutoModelForCausalLM

    logits = {
        f"converted-{family}": _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
        for family, folder in dense.items()
    }
    logits["exported-llama"] = _logits(load_trained_model(run, dtype=torch.float32)[0])
    here = {name: _pesc_reference(folder) for name, folder in folders.items()}
    return {"folders": folders, "logits": logits, "here": here}


@pytest.fixture(scope="module")
def probes(checkpoints, tmp_path_factory):
    """{release: probe report}."""
    spec = {
        "checkpoints": {name: str(folder) for name, folder in checkpoints["folders"].items()},
        "input_ids": INPUT_IDS,
        "attention_mask": ATTENTION_MASK,
        "new_tokens": NEW_TOKENS,
        "pad": PAD,
    }
    return probe_releases(PROBE, spec, tmp_path_factory.mktemp("modules"))


def test_checkpoints_record_the_transformers_that_made_them(checkpoints):
    for name, folder in checkpoints["folders"].items():
        assert json.loads((folder / "config.json").read_text())["transformers_version"] == transformers.__version__, name
        card = (folder / "README.md").read_text()
        assert f"runs on transformers {TESTED_TRANSFORMERS[0]} or newer" in card, name
        assert f"made with transformers {transformers.__version__}." in card, name


@pytest.mark.slow
@pytest.mark.parametrize("version", COMPAT_VERSIONS)
def test_checkpoints_run_exactly_on_transformers(version, probes, checkpoints):
    result = probes[version]
    assert "error" not in result, result.get("error")
    assert result["transformers"] == version
    for name in checkpoints["folders"]:
        got = result[name]
        assert got["module"].startswith("transformers_modules."), (name, got["module"])  # the shipped code ran
        assert got["backbone_runs_shipped_code"] and got["backbone_logits_equal"], name
        assert got["experts_per_token"] == AutoConfig.from_pretrained(checkpoints["folders"][name]).num_experts_per_tok
        logits = torch.tensor(got["logits"])
        if name.startswith("converted"):
            expected = checkpoints["logits"][name]
            assert torch.equal(logits, expected), (name, (logits - expected).abs().max().item())
        elif name.startswith("exported"):
            assert (logits - checkpoints["logits"][name]).abs().max().item() <= 1e-5, name
        # the other methods' checkpoints: against pesc's own classes here (below), their only reference
        here_logits, here_generated = checkpoints["here"][name]
        assert torch.equal(logits, here_logits), (name, (logits - here_logits).abs().max().item())
        assert got["generated"] == here_generated, name
        # logits_to_keep=1: the last position only (lm_head on one row vs all rows: float32 blocking may differ)
        assert got["kept_shape"][1] == 1 and got["kept_vs_last"] <= 1e-5, (name, got["kept_shape"], got["kept_vs_last"])
