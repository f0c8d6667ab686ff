"""The shipped T5 code (moe_seq2seq_lm.py and the methods' seq2seq classes) runs on every transformers release a
user may have (pesc.model_card.TESTED_TRANSFORMERS), where pesc cannot be imported.

Converted tiny T5 v1.0, v1.1 and mT5 checkpoints of MoV and MoLoRA, at init and with perturbed added tensors, are
loaded with `AutoModelForSeq2SeqLM.from_pretrained(..., trust_remote_code=True)` in a cached environment per release
(pesc.testing.compat_envs) and must run their shipped code and give:
- at init, on T5 v1.0 (whose dense config every release reads alike), exactly the dense model's logits there;
- every checkpoint: the greedy tokens (with the cache) that pesc's classes give here, and logits within ATOL of here.
transformers 5 writes a T5 v1.1 / mT5 config with `tie_word_embeddings: true` (it unties a head the checkpoint holds
apart) which 4.x reads as a tied, scaled LM head: the dense checkpoint saved here is wrong there, the converted ones
are not (moe_seq2seq_lm.settle_output_scaling), which this test holds.

ATOL: T5's own code sums in another order in another release (and here with two threads, there with one): the
dense tiny T5 moves by up to 1.1e-6 between 4.46.3 and this release (|logit| < 4), and the perturbed experts (noise
of scale 0.2 on LoRA experts scaled by alpha/r = 4) amplify such roundings inside the blocks, before the norms, to
6.8e-5 at most on the logits (measured on 4.46.3 and 5.12.0). 1e-3 leaves a margin of 15 there and fails on any
change of what is computed (> 1e-1 here: a scaled or tied LM head, a site dropped).
"""


import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from pesc.convert import ConvertSettings, convert
from pesc.methods import register_auto_classes
from pesc.testing.perturbed import save_perturbed_checkpoint
from pesc.testing.tiny_t5 import T5_VARIANTS, save_tiny_t5

from helpers import COMPAT_VERSIONS, probe_releases

SETTINGS = {"mov": {"num_experts": 4},
            "molora": {"num_experts": 4, "sites": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]}}
INPUT_IDS = [[13, 27, 5, 40, 9, 1, 0, 0], [7, 88, 61, 2, 19, 33, 50, 1]]
ATTENTION_MASK = [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8]
NEW_TOKENS = 6
ATOL = 1e-3

PROBE = """
import json, torch, transformers
from transformers import AutoModelForSeq2SeqLM
spec = json.loads(@SPEC@)
ids, mask = torch.tensor(spec["input_ids"]), torch.tensor(spec["attention_mask"])
results = {"transformers": transformers.__version__}
for name, folder in spec["checkpoints"].items():
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=name != "dense-t5-v1.0",
                                                  torch_dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec["new_tokens"],
                                do_sample=False, use_cache=True)
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=tokens).logits
    results[name] = {"module": type(model).__module__, "tokens": tokens.tolist(), "logits": logits.tolist()}
emit(results)
"""


def _outputs(folder) -> tuple[list, torch.Tensor]:
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = torch.tensor(INPUT_IDS), torch.tensor(ATTENTION_MASK)
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                use_cache=True)
        return tokens.tolist(), model(input_ids=ids, attention_mask=mask, decoder_input_ids=tokens).logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: folder} (folder names without dots: transformers 4.x imports the code under the folder's name), and
    what pesc's classes give for each here."""
    root = tmp_path_factory.mktemp("t5-compat")
    folders = {}
    for variant in T5_VARIANTS:
        slug = variant.replace(".", "_")
        dense = save_tiny_t5(root / slug, variant)
        if variant == "t5-v1.0":
            folders["dense-t5-v1.0"] = dense
        for method, settings in SETTINGS.items():
            folders[f"{method}-{slug}"] = root / f"{method}-{slug}"
            convert(dense, folders[f"{method}-{slug}"], ConvertSettings(method, **settings), echo=lambda _: None)
            folders[f"{method}-{slug}-perturbed"] = save_perturbed_checkpoint(
                dense, root / f"{method}-{slug}-perturbed", method, scale=0.2, **settings)
    register_auto_classes()
    return {"folders": folders, "here": {name: _outputs(folder) for name, folder in folders.items()}}


@pytest.fixture(scope="module")
def probes(checkpoints, tmp_path_factory):
    """{release: probe report}."""
    spec = {"checkpoints": {name: str(folder) for name, folder in checkpoints["folders"].items()},
            "input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "new_tokens": NEW_TOKENS}
    return probe_releases(PROBE, spec, tmp_path_factory.mktemp("modules"))


@pytest.mark.slow
@pytest.mark.parametrize("version", COMPAT_VERSIONS)
def test_t5_checkpoints_run_on_transformers(version, probes, checkpoints):
    result = probes[version]
    assert "error" not in result, result.get("error")
    assert result["transformers"] == version
    for name in checkpoints["folders"]:
        if name.startswith("dense"):
            continue
        got = result[name]
        assert got["module"].startswith("transformers_modules."), (name, got["module"])  # the shipped code ran
        tokens, logits = checkpoints["here"][name]
        assert got["tokens"] == tokens, name
        difference = (torch.tensor(got["logits"]) - logits).abs().max().item()
        assert difference <= ATOL, (name, difference)
    for method in SETTINGS:
        assert result[f"{method}-t5-v1_0"]["logits"] == result["dense-t5-v1.0"]["logits"], method
