"""Tiny dense T5 checkpoints of the three layouts MoV and MoLoRA have T5 sites for, built locally (no downloads).

- "t5-v1.0": ReLU FFN `wi` / `wo`, LM head tied to the embedding (the decoder output scaled by d_model**-0.5);
- "t5-v1.1": gated-GELU FFN `wi_0` / `wi_1` / `wo` (Flan-T5's layout), an LM head of its own;
- "mt5": mT5's config class and model, gated-GELU, an LM head of its own.
A checkpoint with its own LM head holds `lm_head.weight` apart from `shared.weight`, as the published ones do
(transformers 5 builds those models tied, and unties a head the checkpoint holds apart).
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

T5_VARIANTS = ("t5-v1.0", "t5-v1.1", "mt5")

TINY_T5_SHAPE = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip


def tiny_t5_config(variant: str) -> T5Config:
    """The config of a tiny T5 of `variant` (one of T5_VARIANTS)."""
    if variant == "t5-v1.0":
        return T5Config(feed_forward_proj="relu", tie_word_embeddings=True, **TINY_T5_SHAPE)
    if variant == "t5-v1.1":
        return T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **TINY_T5_SHAPE)
    if variant == "mt5":
        return MT5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **TINY_T5_SHAPE)
    raise ValueError(f"unknown T5 variant {variant!r}: one of {', '.join(T5_VARIANTS)}")


def save_tiny_t5(path: str | Path, variant: str = "t5-v1.1", seed: int = 0) -> Path:
    """Write a randomly initialised tiny dense T5 of `variant` (weights and config) to `path`."""
    path = Path(path)
    config = tiny_t5_config(variant)
    torch.manual_seed(seed)
    model_class = MT5ForConditionalGeneration if variant == "mt5" else T5ForConditionalGeneration
    model = model_class(config).eval()
    model.save_pretrained(path)
    if variant != "t5-v1.0":
        weights = path / "model.safetensors"
        tensors = load_file(weights)
        tensors["lm_head.weight"] = torch.randn(config.vocab_size, config.d_model) * config.d_model**-0.5
        save_file(tensors, weights, metadata={"format": "pt"})
    return path
