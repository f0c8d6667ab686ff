"""`pesc compare`: are two models the same function? Max |logit difference| on one prompt, in float32.

The check a user runs after `pesc convert` (converted == dense at init) or `pesc export`
(exported == what was trained), on real weights.
"""

from pathlib import Path

import torch

from pesc.errors import PescError
from pesc.generate import load_model


def load_float32_model(path: str | Path) -> torch.nn.Module:
    """The model alone (no tokenizer needed), in float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise PescError(f"{path} is not a model folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()

DEFAULT_PROMPT = "The capital of France is Paris. The capital of Italy is"


def max_logit_difference(path_a: str | Path, path_b: str | Path, prompt: str = DEFAULT_PROMPT) -> float:
    """Largest absolute difference between the two models' float32 logits on `prompt` (tokenized by A)."""
    model_a, tokenizer = load_model(path_a, device="cpu")
    model_b = load_float32_model(path_b)
    if model_a.config.vocab_size != model_b.config.vocab_size:
        raise PescError(
            f"the models have different vocabularies ({model_a.config.vocab_size} vs {model_b.config.vocab_size} "
            "tokens): they cannot compute the same function"
        )
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_a = model_a.float()(ids).logits
        logits_b = model_b.float()(ids).logits
    return (logits_a - logits_b).abs().max().item()
