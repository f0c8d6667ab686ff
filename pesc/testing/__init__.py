"""Tiny models and tokenizers built locally, for tests, benchmarks and the README demo (no downloads)."""

from pesc.testing.tiny import TINY_FAMILIES, build_tiny_dense, build_tiny_tokenizer, save_tiny_dense

__all__ = ["TINY_FAMILIES", "build_tiny_dense", "build_tiny_tokenizer", "save_tiny_dense"]
