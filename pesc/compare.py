"""`pesc compare`: are two models the same function? Max |logit difference| on one prompt, in float32.

The check a user runs after `pesc convert` (converted == dense at init) or `pesc export`
(exported == what was trained), on real weights. An encoder-decoder (T5) reads the prompt in its encoder and,
teacher-forced, in its decoder: every decoder position's logits are compared.
"""

from pathlib import Path

import torch

from pesc.errors import PescError
from pesc.generate import check_model_folder, is_encoder_decoder, load_folder_model, load_tokenizer

DEFAULT_PROMPT = "The capital of France is Paris. The capital of Italy is"


def max_logit_difference(path_a: str | Path, path_b: str | Path, prompt: str = DEFAULT_PROMPT,
                         trust_remote_code: bool = False) -> float:
    """Largest absolute difference between the two models' float32 logits on `prompt` (tokenized by A)."""
    if not prompt.strip():
        raise PescError("--prompt is empty: give some text to run both models on")
    for path in (path_a, path_b):  # both, before either loads
        check_model_folder(path, trust_remote_code)
    if is_encoder_decoder(path_a) != is_encoder_decoder(path_b):
        kinds = ["an encoder-decoder" if is_encoder_decoder(path) else "decoder-only" for path in (path_a, path_b)]
        raise PescError(f"{path_a} is {kinds[0]} and {path_b} is {kinds[1]}: they cannot compute the same function; "
                        "compare a model with its own dense base")
    model_a = load_folder_model(path_a, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model_b = load_folder_model(path_b, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if model_a.config.vocab_size != model_b.config.vocab_size:
        raise PescError(
            f"the models have different vocabularies ({model_a.config.vocab_size} vs {model_b.config.vocab_size} "
            "tokens): they cannot compute the same function"
        )
    ids = load_tokenizer(path_a, trust_remote_code)(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = [_finite_logits(model, ids, path) for model, path in ((model_a, path_a), (model_b, path_b))]
    return (logits[0] - logits[1]).abs().max().item()


def _finite_logits(model, ids, path) -> torch.Tensor:
    """The logits, or a one-line error: a NaN would make the difference NaN, which no --atol can judge."""
    if model.config.is_encoder_decoder:
        start = torch.full_like(ids[:, :1], model.config.decoder_start_token_id)
        logits = model(input_ids=ids, decoder_input_ids=torch.cat([start, ids[:, :-1]], dim=1)).logits
    else:
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise PescError(f"{path} computes non-finite logits (NaN or inf) on the prompt: its weights are damaged "
                        "(`pesc inspect` and the tool that wrote them can tell which)")
    return logits
