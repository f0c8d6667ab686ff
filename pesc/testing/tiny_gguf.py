"""A tiny Llama written as a GGUF file (float32 tensors, byte-level BPE tokenizer), for GGUF input tests."""

import json
from pathlib import Path

import numpy as np
import torch

from pesc.testing.tiny import TINY_SHAPE, build_tiny_tokenizer

_SPECIAL_TOKEN_TYPE, _NORMAL_TOKEN_TYPE = 3, 1  # llama.cpp's token types


def save_tiny_gguf(path: str | Path, seed: int = 0) -> Path:
    """Write a random 2-layer Llama in GGUF's own tensor names, with the tiny ChatML tokenizer embedded."""
    import gguf

    tokenizer = build_tiny_tokenizer()
    hidden, inter = TINY_SHAPE["hidden_size"], TINY_SHAPE["intermediate_size"]
    heads, kv_heads = TINY_SHAPE["num_attention_heads"], TINY_SHAPE["num_key_value_heads"]
    head_dim, vocab = hidden // heads, len(tokenizer)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(TINY_SHAPE["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_block_count(TINY_SHAPE["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_types([_SPECIAL_TOKEN_TYPE if t in special else _NORMAL_TOKEN_TYPE for t in tokens])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    generator = torch.Generator().manual_seed(seed)

    def weight(*shape, offset: float = 0.0):
        return (offset + 0.05 * torch.randn(*shape, generator=generator)).numpy().astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    writer.add_tensor("output_norm.weight", weight(hidden, offset=1.0))
    writer.add_tensor("output.weight", weight(vocab, hidden))
    for layer in range(TINY_SHAPE["num_hidden_layers"]):
        block = f"blk.{layer}."
        writer.add_tensor(block + "attn_norm.weight", weight(hidden, offset=1.0))
        writer.add_tensor(block + "ffn_norm.weight", weight(hidden, offset=1.0))
        writer.add_tensor(block + "attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(block + "attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(block + "attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(block + "attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(block + "ffn_gate.weight", weight(inter, hidden))
        writer.add_tensor(block + "ffn_up.weight", weight(inter, hidden))
        writer.add_tensor(block + "ffn_down.weight", weight(hidden, inter))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
