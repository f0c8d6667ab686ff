"""pesc: dense LLM -> sparse PESC Mixture-of-Experts, QLoRA instruction tuning, HF export.

The heavy imports (torch, transformers) happen on first use of `pesc.upcycle` or the model
classes, so `pesc --help` and the CLI's argument errors answer at once.
"""

__version__ = "0.1.0"

_LAZY = {
    "PescConfig": "pesc.methods.pesc.configuration_pesc",
    "PescForCausalLM": "pesc.methods.pesc.modeling_pesc",
    "register_auto_classes": "pesc.methods",
    "upcycle": "pesc.methods.pesc.upcycling",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pesc' has no attribute {name!r}")
