"""MoLoRA (arXiv 2309.05444): soft-merged LoRA experts on the linears.

Its folder holds all that is its own: `method.py` (the registry entry), the shipped `configuration_molora.py` and
`modeling_molora.py`, and its extras."""

from pesc.methods.molora.method import MOLORA

__all__ = ["MOLORA"]
