"""`pesc compare`: are two models the same function? Max |logit difference| on one prompt, in float32.

The check a user runs after `pesc convert` (converted == dense at init) or `pesc export`
(exported == what was trained), on real weights.
"""

from pathlib import Path

import torch

from pesc.errors import PescError
from pesc.generate import check_model_folder, load_causal_lm

DEFAULT_PROMPT = "The capital of France is Paris. The capital of Italy is"


def max_logit_difference(path_a: str | Path, path_b: str | Path, prompt: str = DEFAULT_PROMPT) -> float:
    """Largest absolute difference between the two models' float32 logits on `prompt` (tokenized by A)."""
    from transformers import AutoTokenizer

    for path in (path_a, path_b):  # both, before either loads
        check_model_folder(path)
    model_a = load_causal_lm(path_a, dtype=torch.float32)
    model_b = load_causal_lm(path_b, dtype=torch.float32)
    if model_a.config.vocab_size != model_b.config.vocab_size:
        raise PescError(
            f"the models have different vocabularies ({model_a.config.vocab_size} vs {model_b.config.vocab_size} "
            "tokens): they cannot compute the same function"
        )
    ids = AutoTokenizer.from_pretrained(path_a)(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return (model_a(ids).logits - model_b(ids).logits).abs().max().item()
