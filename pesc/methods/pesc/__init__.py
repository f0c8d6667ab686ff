"""PESC (Camelidae, arXiv 2401.02731): the dense FFN shared by every expert, an adapter per expert, a top-k router.

Its folder holds all that is its own: `method.py` (the registry entry), the shipped `configuration_pesc.py` and
`modeling_pesc.py`, and its extras."""

from pesc.methods.pesc.method import PESC, initial_expert_state

__all__ = ["PESC", "initial_expert_state"]
