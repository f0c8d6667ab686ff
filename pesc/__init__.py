"""pesc: dense LLM -> sparse PESC Mixture-of-Experts, QLoRA instruction tuning, HF export."""

from pesc.modeling import PescConfig, PescForCausalLM
from pesc.upcycling import upcycle

__version__ = "0.1.0"

__all__ = ["PescConfig", "PescForCausalLM", "upcycle", "__version__"]
