"""MoELoRA (arXiv 2310.18339): top-k routed LoRA experts with a contrastive loss.

Its folder holds all that is its own: `method.py` (the registry entry), the shipped `configuration_moelora.py` and
`modeling_moelora.py`, and its extras."""

from pesc.methods.moelora.method import MOELORA

__all__ = ["MOELORA"]
