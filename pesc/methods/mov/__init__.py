"""MoV (arXiv 2309.05444): soft-merged (IA)³ vectors.

Its folder holds all that is its own: `method.py` (the registry entry), the shipped `configuration_mov.py` and
`modeling_mov.py`, and its extras."""

from pesc.methods.mov.method import MOV

__all__ = ["MOV"]
