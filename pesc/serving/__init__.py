"""Serving pesc exports with vLLM (docs/serving.md)."""
