"""LoRAMoE (arXiv 2312.09979): LoRA experts beside the FFN linears, a dense router, the localized balancing constraint.

Its folder holds all that is its own: `method.py` (the registry entry), the shipped `configuration_loramoe.py` and
`modeling_loramoe.py`, and its extras."""

from pesc.methods.loramoe.method import LORAMOE, site_shapes

__all__ = ["LORAMOE", "site_shapes"]
