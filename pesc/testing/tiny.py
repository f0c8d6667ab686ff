"""Build tiny dense checkpoints of real families from configs, and a tokenizer trained in milliseconds."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

TINY_FAMILIES = ("llama", "mistral", "qwen2")

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts routes every token to a few experts.",
    "What is two plus two? Two plus two is four.",
    "Write a function that adds two numbers in Python: def add(a, b): return a + b",
    "System: You are a helpful assistant. Human: Hello! Assistant: Hi, how can I help?",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>=+-*/#_\n",
]


def build_tiny_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, with ChatML special tokens and template."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_t5_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """A SentencePiece-like BPE (spaces as "▁") over the same sentences, with T5's special tokens at T5's ids
    (<pad> 0, </s> 1, <unk> 2) and no chat template: the tokenizer of a tiny T5 (pesc.testing.tiny_t5)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_dense(family: str = "llama", vocab_size: int = 256, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised dense causal LM of `family`, a few hundred thousand parameters."""
    config = AutoConfig.for_model(family, vocab_size=vocab_size, **{**TINY_SHAPE, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_dense(
    path: str | Path, family: str = "llama", max_shard_size: str | int = "5GB", seed: int = 0, **overrides
) -> Path:
    """Write a tiny dense checkpoint (weights, config, tokenizer with chat template) to `path`."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_dense(family, vocab_size=len(tokenizer), seed=seed, **overrides)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    return path
