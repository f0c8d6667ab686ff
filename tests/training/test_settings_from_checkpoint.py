"""Training further from a method's checkpoint: the `moe:` section is read against the checkpoint's own settings.

`top_k: 0` means "every expert" for MoLoRA; how many that is comes from the checkpoint (here 4), not from the
config class's default (10)."""

import pytest

from pesc.errors import PescError
from pesc.training.config import validate
from pesc.training.model import resolve_model_config

from helpers import LEGACY_CHECKPOINTS



def _config(name: str, moe: dict) -> dict:
    return validate({"base_model": str(LEGACY_CHECKPOINTS / name), "method": name, "output_dir": "out", "moe": moe,
                     "datasets": [{"path": "unused.jsonl", "type": "messages"}]})


def test_top_k_zero_means_every_expert_of_the_checkpoint():
    model_config, dense = resolve_model_config(_config("molora", {"top_k": 0, "router_jitter": 0.1}))
    assert not dense
    assert (model_config.num_experts, model_config.num_experts_per_tok) == (4, 4)
    assert model_config.router_jitter == 0.1  # a setting that only steers training is taken over


def test_a_structural_setting_that_disagrees_is_refused():
    with pytest.raises(PescError, match=r"moe.top_k=3 \(checkpoint: 2\)"):
        resolve_model_config(_config("pesc", {"top_k": 3}))
